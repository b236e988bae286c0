"""One refresh at a time per session, however long refreshes queue behind a slow Pangea (issue #12).

A batch may hold more refreshes than the concurrency bound lets out at once. Before the hold was
taken per refresh, as its request went out, the hold of the refreshes still queued lapsed, another
worker took their rows and presented the same refresh tokens. Two engines, as two workers, on one
database against the emulator (a real server) answering refreshes slowly.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import login, moved_clock, row, wait_in_flight
from worker import models

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

REFRESH = "/v2/client/session/refresh"
LIST = "/v2/session/list"
#: The defaults' shape at a test's scale: a hold of lease + 3 timeouts = 6 s, two refreshes at a time.
SMALL = {"SESSION_SYNC_LEASE": "3s", "SESSION_SYNC_HTTP_TIMEOUT": "1", "SESSION_SYNC_CONCURRENCY": "2"}


def test_refreshes_queued_past_their_hold_are_never_presented_twice(make_runtime: Any, emu: RunningEmulator) -> None:
    first, second = make_runtime(**SMALL), make_runtime(**SMALL)
    clock = moved_clock(first, second)
    # Given 24 sessions whose tokens are due for a refresh (8 s lifetimes: refreshed in their last half)
    ids = [login(first, emu, f"u{i}@example.com", active_ttl=8) for i in range(24)]
    clock.advance(4.5)
    # ... and a Pangea that takes 0.8 s per refresh: 24 at two at a time outlast a 6 s hold twice over
    emu.admin.faults(latency_ms=800, paths=[REFRESH])

    # When one worker takes them all in one batch while another sweeps beside it
    stop = threading.Event()

    def sweep_beside() -> None:
        while not stop.is_set():
            second.run(second.engine.drain())
            time.sleep(0.2)

    results: list[Any] = []
    taking = threading.Thread(target=lambda: results.append(first.run(first.engine.drain())))
    taking.start()
    wait_in_flight(emu, REFRESH)  # the first worker has claimed the batch and is refreshing it two at a time
    beside = threading.Thread(target=sweep_beside)
    beside.start()
    taking.join(timeout=90)
    stop.set()
    beside.join(timeout=60)
    [counts] = results
    emu.admin.clear_faults()

    # Then no refresh token was presented twice, and no session was lost on the way
    stats = emu.admin.stats()
    assert stats["refresh_reused"] == 0
    assert counts.refreshed > 0
    rows = [row(first, i) for i in ids]
    assert all(r.state is models.SessionState.ACTIVE for r in rows), [(r.id, r.end_reason) for r in rows]
    # ... and the audit trail says what was done: one "refreshed" per refresh Pangea performed
    with first.sessions() as db:
        refreshed = db.execute(sa.select(sa.func.count()).where(models.SessionEvent.action == "refreshed")).scalar_one()
    assert refreshed == stats["requests"][REFRESH]["200"]
    assert sum(r.rotated_at is not None for r in rows) >= len(ids) // 2


def test_a_batch_that_outlived_its_lease_never_ends_a_session_another_worker_refreshed(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    # A 30 s margin on 40 s tokens: refreshed from 20-25 s on (the jitter), so at 27 s every one is due
    settings = {"SESSION_SYNC_HTTP_TIMEOUT": "15", "SESSION_SYNC_LEASE": "5s", "SESSION_SYNC_REFRESH_MARGIN": "30s"}
    stale, fresh = make_runtime(**settings), make_runtime(**settings)
    clock = moved_clock(stale, fresh)
    # Given sessions inside their refresh margin whose last refresh had no answer (Pangea never
    # performed it): they are settled before their refresh token goes out again
    ids = [login(stale, emu, f"u{i}@example.com", active_ttl=40) for i in range(4)]
    clock.advance(27)
    with stale.sessions.begin() as db:
        db.execute(
            sa.update(models.LocalSession)
            .where(models.LocalSession.id.in_(ids))
            .values(uncertain=True, next_check_at=clock() - timedelta(seconds=1))
        )
    before = {i: row(stale, i).active_token_id for i in ids}
    # ... and a worker whose settling list Pangea answers slowly: it claimed them, and its lease lapses
    emu.admin.faults(latency_ms=4000, paths=[LIST])
    results: list[Any] = []
    slow = threading.Thread(target=lambda: results.append(stale.run(stale.engine.drain())))
    slow.start()
    wait_in_flight(emu, LIST)  # its list is held (a fixed sleep raced a slow start under load)
    emu.admin.clear_faults()
    clock.advance(6)

    # When another worker takes the rows over meanwhile, settles them (the refresh never happened)
    # and refreshes them, before the slow worker's answer (now "spent": our old token is no longer
    # the session's) arrives
    try:
        taken = fresh.run(fresh.engine.drain())
    finally:
        slow.join(timeout=60)
    assert taken.refreshed == len(ids), taken
    [late] = results

    # Then the slow worker, its lease lost, ends nothing at Pangea: every session lives there with
    # the tokens the other worker stored, and lives here too
    assert emu.admin.ended([row(fresh, i).pangea_session_id or "" for i in ids]) == {}
    rows = [row(fresh, i) for i in ids]
    assert [(r.state, r.uncertain) for r in rows] == [(models.SessionState.ACTIVE, False)] * len(ids)
    assert all(r.active_token_id != before[r.id] for r in rows)
    assert late.revoked == 0 and emu.admin.stats()["refresh_reused"] == 0, late
    # ... and the next check finds them all valid at Pangea
    clock.advance(3600)
    assert fresh.run(fresh.engine.drain()).revoked == 0
    assert all(row(fresh, i).state is models.SessionState.ACTIVE for i in ids)
