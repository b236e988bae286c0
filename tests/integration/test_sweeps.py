"""Sweep slots: a duplicate beat is a no-op, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from worker import db as dbmod
from worker import sweeps
from worker.counts import SyncCounts


def test_second_sweep_in_a_slot_is_a_duplicate(engine: sa.Engine) -> None:
    factory = dbmod.session_factory(engine)
    now = datetime(2026, 11, 28, 12, 0, 7, 500_000, tzinfo=UTC)
    slot = sweeps.slot_of(now, timedelta(seconds=15))
    assert slot == datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    with factory.begin() as db:
        assert sweeps.claim_slot(db, slot=slot, now=now) is True
    with factory.begin() as db:
        assert sweeps.claim_slot(db, slot=slot, now=now + timedelta(seconds=1)) is False
    with factory.begin() as db:
        assert sweeps.claim_slot(db, slot=slot + timedelta(seconds=15), now=now) is True
        sweeps.add_counts(db, slot=slot, counts=SyncCounts(checked=3, revoked=1).as_dict(), now=now)
        sweeps.add_counts(db, slot=slot, counts=SyncCounts(checked=2, stopped=True).as_dict(), now=now)
    with factory() as db:
        last = sweeps.last_sweep(db)
        assert last is not None and last["slot"] == (slot + timedelta(seconds=15)).isoformat()
        row = db.get(sweeps.W, slot)
        assert row is not None and (row.checked, row.revoked, row.stopped) == (5, 1, True)
