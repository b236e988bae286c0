"""The chaos soak (issue #18): everything fails at once, on a seeded schedule, and the users notice nothing.

The short run below is part of the suite: a fixed seed, about a minute of chaos. For a long run
with a new seed each time (its figures go in the README beside the fault table)::

    python -m benchmarks.chaos --minutes 30          # or: SESSION_SYNC_CHAOS_MINUTES=30 pytest tests/chaos

``SESSION_SYNC_CHAOS_SEED`` replays a run. PostgreSQL restarts join the schedule only with
``SESSION_SYNC_CHAOS_POSTGRES=1`` (CI sets it): the machine's cluster may be shared.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import plan
from tests.chaos.soak import Soak
from tests.conftest import RunningEmulator, require
from tests.faults.test_process_faults import RedisServer, _pg_cluster

#: The short run's seed and length: fixed, so CI replays the same schedule every time.
SHORT_SEED = 24
SHORT_SECONDS = 60.0
MINUTES = float(os.environ.get("SESSION_SYNC_CHAOS_MINUTES", "0"))
SECONDS = MINUTES * 60 or SHORT_SECONDS
WORKERS = 3
#: Sessions logged in before the run (more log in and out during it).
SESSIONS = 300

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(SECONDS + 240)]


def _seed() -> int:
    given = os.environ.get("SESSION_SYNC_CHAOS_SEED")
    if given:
        return int(given)
    return random.SystemRandom().randrange(1 << 31) if MINUTES else SHORT_SEED


def _postgres() -> tuple[str, str] | None:
    if os.environ.get("SESSION_SYNC_CHAOS_POSTGRES") != "1":
        return None
    cluster = _pg_cluster()
    require(cluster is not None, "pg_ctlcluster is not available to restart PostgreSQL")
    return cluster


def test_chaos_soak(pg_url: str, emu: RunningEmulator, own_redis: RedisServer, tmp_path: Path, report: Any) -> None:
    # Given a seeded plan: users logging in and out, admins ending sessions at Pangea, and Pangea,
    # workers, beat and Redis (and PostgreSQL, if asked) failing in overlapping windows
    postgres = _postgres()
    the_plan = plan.make(_seed(), SECONDS, workers=WORKERS, postgres=postgres is not None)
    report(f"chaos seed={the_plan.seed} seconds={SECONDS:.0f} (replay: SESSION_SYNC_CHAOS_SEED={the_plan.seed})")
    report(f"chaos plan: {the_plan.summary()}")
    soak = Soak(
        pg_url=pg_url, emu=emu, redis=own_redis, workdir=tmp_path, the_plan=the_plan, workers=WORKERS, postgres=postgres
    )
    try:
        soak.populate(SESSIONS)
        # When it all runs, heals, and the workers are given time to catch up
        figures = soak.run()
        report(figures.line())
        for line in soak.world.explain():
            report(f"  {line}")
    finally:
        soak.close()
    # Then nobody was logged out wrongly, no ended session or logout was missed, no refresh token
    # was presented twice, no Pangea session is left that nobody holds, no live lease was taken,
    # the audit says only what was done, and the worker caught up
    figures.assert_invariants()
    assert (figures.orphaned, figures.notes["leases_taken_live"]) == (0, 0), figures.line()
    assert figures.recovered_in < 60, figures.line()
