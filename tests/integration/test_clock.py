"""Workers agree on the time whatever their hosts' clocks say: leases and due times go by the database.

A host five minutes fast would see every lease of the others as lapsed and take their rows (and the
refresh tokens in flight with them); a slow one would sit on lapsed leases. ``worker.clock`` reads
the database server's clock. The real-process version (``faketime``) is in the chaos soak.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import RunningEmulator
from tests.helpers import login
from worker import clock, queries

pytestmark = pytest.mark.timeout(60)

SKEW = 300.0


@pytest.mark.parametrize("skew", [SKEW, -SKEW], ids=["fast", "slow"])
def test_a_skewed_host_reads_the_databases_time(pg_url: str, skew: float) -> None:
    from worker import db as dbmod

    engine = dbmod.create_engine(pg_url)
    try:
        skewed = clock.DatabaseClock(engine, host=lambda: time.time() + skew)
        assert abs((skewed() - datetime.now(UTC)).total_seconds()) < 1.0
        assert abs(skewed.offset + skew) < 1.0
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_fast_host_never_takes_a_live_lease(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    ids = [login(rt, emu, f"u{i}@example.com") for i in range(5)]
    # Given a worker on a correct host holds these sessions for a minute
    with rt.sessions.begin() as db:
        queries.make_due(db, now=rt.clock(), session_ids=ids)
        held = queries.claim_due_sessions(
            db, now=rt.clock(), limit=10, lease=timedelta(minutes=1), claim_token=secrets.token_hex(8)
        )
    assert sorted(s.id for s in held) == ids
    fast_host = datetime.now(UTC) + timedelta(seconds=SKEW)
    # Then a worker whose host runs five minutes fast, telling time by the database, takes none of them
    skewed = clock.DatabaseClock(rt.db_engine, host=lambda: time.time() + SKEW)
    with rt.sessions.begin() as db:
        taken = queries.claim_due_sessions(
            db, now=skewed(), limit=10, lease=timedelta(minutes=1), claim_token=secrets.token_hex(8)
        )
    assert taken == []
    # ... while going by its own clock it would have taken every one (the hazard is real)
    with rt.sessions() as db:
        raw = queries.claim_due_sessions(
            db, now=fast_host, limit=10, lease=timedelta(minutes=1), claim_token=secrets.token_hex(8)
        )
        db.rollback()
    assert sorted(s.id for s in raw) == ids
