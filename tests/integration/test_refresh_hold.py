"""One refresh at a time per session, however long refreshes queue behind a slow Pangea (issue #12).

A batch may hold more refreshes than the concurrency bound lets out at once. Before the hold was
taken per refresh, as its request went out, the hold of the refreshes still queued lapsed, another
worker took their rows and presented the same refresh tokens. Two engines, as two workers, on one
database against the emulator (a real server) answering refreshes slowly.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import login, row
from worker import models

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

REFRESH = "/v2/client/session/refresh"
#: The defaults' shape at a test's scale: a hold of lease + 3 timeouts = 6 s, two refreshes at a time.
SMALL = {"SESSION_SYNC_LEASE": "3s", "SESSION_SYNC_HTTP_TIMEOUT": "1", "SESSION_SYNC_CONCURRENCY": "2"}


def test_refreshes_queued_past_their_hold_are_never_presented_twice(make_runtime: Any, emu: RunningEmulator) -> None:
    first, second = make_runtime(**SMALL), make_runtime(**SMALL)
    # Given 24 sessions whose tokens are due for a refresh (8 s lifetimes: refreshed in their last half)
    ids = [login(first, emu, f"u{i}@example.com", active_ttl=8) for i in range(24)]
    time.sleep(4.5)
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
    time.sleep(0.5)  # the first worker has claimed the batch and is refreshing it two at a time
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
