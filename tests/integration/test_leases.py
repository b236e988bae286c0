"""Leases: a crashed worker's claims lapse and another picks its sessions up; audit retention holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import RunningEmulator
from tests.helpers import login, row
from worker import audit, models, queries


def test_a_crashed_workers_claims_lapse_and_are_taken_over(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(SESSION_SYNC_LEASE="1s")
    ids = [login(rt, emu, f"c{i}@example.com") for i in range(5)]
    with rt.sessions.begin() as db:
        queries.make_due(db, now=datetime.now(UTC), session_ids=ids)
    # Given a worker that claimed the batch and died before writing anything
    with rt.sessions.begin() as db:
        claimed = queries.claim_due_sessions(
            db, now=datetime.now(UTC), limit=10, lease=rt.settings.lease, claim_token="crashed"
        )
    assert sorted(s.id for s in claimed) == ids
    # When another worker looks while the lease holds, it finds nothing to do
    assert rt.run(rt.engine.process_batch()).checked == 0
    # Then once the lease lapsed, it takes the sessions over and checks them
    later = datetime.now(UTC) + timedelta(seconds=1.5)
    with rt.sessions.begin() as db:
        taken = queries.claim_due_sessions(db, now=later, limit=10, lease=rt.settings.lease, claim_token="next")
    assert sorted(s.id for s in taken) == ids
    with rt.sessions.begin() as db:
        assert queries.release(db, claim_token="next") == 5
    assert all(row(rt, i).claim_token is None for i in ids)


def test_audit_events_are_purged_after_retention(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "old@example.com")
    now = datetime.now(UTC)
    with rt.sessions.begin() as db:
        audit.record(db, [audit.Event(session_id=sid, action="kept", outcome="valid")], now=now - timedelta(days=31))
        audit.record(db, [audit.Event(session_id=sid, action="kept", outcome="valid")], now=now - timedelta(days=1))
    with rt.sessions.begin() as db:
        assert audit.purge(db, now=now, retention=timedelta(days=30)) == 1
    with rt.sessions() as db:
        assert [e.at.date() for e in audit.history(db, sid)] == [(now - timedelta(days=1)).date()]
        assert db.get(models.LocalSession, sid) is not None
