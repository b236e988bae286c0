"""Fixtures of the chaos tests.

``own_redis``: a ``redis-server`` on a free port only this test uses (the soak kills it), borrowed
from the fault matrix; ``own_postgres``: a PostgreSQL server of the test's own (the soak restarts
it; see :mod:`tests.chaos.postgres`), with the database migrated; ``report``: prints a line past
pytest's capture at once, so a seed shows even if the run hangs. ``SESSION_SYNC_CHAOS_KEEP=1``
leaves the soak's PostgreSQL running after the test (its URL is printed), to read a replay's rows.
"""

from __future__ import annotations

from tests.chaos.postgres import own_postgres
from tests.faults.test_pangea_faults import report
from tests.faults.test_process_faults import own_redis

__all__ = ["own_postgres", "own_redis", "report"]
