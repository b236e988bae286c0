"""Fixtures of the chaos tests, borrowed from the fault matrix (one home each).

``own_redis``: a ``redis-server`` on a free port only this test uses (the soak kills it);
``report``: prints a line past pytest's capture at once, so a seed shows even if the run hangs.
"""

from __future__ import annotations

from tests.faults.test_pangea_faults import report
from tests.faults.test_process_faults import own_redis

__all__ = ["own_redis", "report"]
