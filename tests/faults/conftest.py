"""Fixtures of the fault matrix: ``own_postgres``, a PostgreSQL server of the test's own (the
PostgreSQL-restart scenario stops and starts it; see :mod:`tests.chaos.postgres`)."""

from __future__ import annotations

from tests.chaos.postgres import own_postgres

__all__ = ["own_postgres"]
