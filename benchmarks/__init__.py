"""Benchmarks, run on demand and never by pytest: one sweep over N seeded sessions, and the matrix.

The matrix is what ``docs/benchmarks.md`` reports.

``python -m benchmarks.sweep --sessions 10000 --path bulk`` measures one run; ``python -m benchmarks.matrix``
runs every path and size, each in a fresh process, and writes the report.
"""

from __future__ import annotations
