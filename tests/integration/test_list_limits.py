"""Pangea's unknown list limits: a list request refused as too large splits, never fails the batch.

The emulator plays a Pangea that refuses session-list requests above a page size or a number of
filter ids with its validation envelope (HTTP 400, ValidationError, ``result.errors``), as Pangea
refuses any request that breaks its schema. The engine runs against it on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import RunningEmulator
from tests.helpers import login_many, moved_clock, requests, row
from worker import models

pytestmark = pytest.mark.timeout(120)

LIST = "/v2/session/list"
CHECK = "/v2/client/token/check"


def refused(emu: RunningEmulator) -> int:
    return int(emu.admin.stats()["requests"].get(LIST, {}).get("400", 0))


def test_a_batch_larger_than_pangeas_limits_is_answered_in_one_run(
    make_runtime: Any, emu: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a batch of 250 sessions, 25 of them ended at Pangea, and a Pangea that refuses list
    # requests above 100 results or 100 filter ids
    rt = make_runtime(SESSION_SYNC_BATCH_SIZE="250", SESSION_SYNC_REVALIDATION="bulk")
    ids = login_many(rt, emu, [f"u{i}@example.com" for i in range(250)])
    dead = ids[::10]
    for sid in dead:
        rt.run(rt.client.session_invalidate(row(rt, sid).pangea_session_id or ""))
    emu.admin.faults(max_size=100, max_filter_ids=100)

    # When support resyncs everything (the log is read from here on: the limit may be learned at once)
    caplog.set_level(logging.WARNING, logger="worker.list_limits")
    counts = rt.run(rt.engine.resync())

    # Then every session got Pangea's answer in that one run: 25 revoked, the rest kept, none failed
    assert (counts.checked, counts.revoked, counts.kept, counts.failed) == (250, 25, 225, 0)
    assert all(row(rt, sid).state is models.SessionState.REVOKED for sid in dead)
    assert requests(emu, CHECK) == 25  # only the sessions the list did not show were checked one by one
    assert refused(emu) > 0  # the refused requests were split, not failed

    # When resyncs go on, the worker homes in on the limit (a few refused probes, every session answered
    # each time), says it once with a stable action, and from then on no request is refused
    def learned() -> list[dict[str, Any]]:
        return [r.__dict__ for r in caplog.records if getattr(r, "action", None) == "list_limit_learned"]

    for _ in range(8):  # bisection: a handful of runs, however the batches happen to be cut
        if learned():
            break
        counts = rt.run(rt.engine.resync())
        assert (counts.checked, counts.kept, counts.failed) == (225, 225, 0)
    assert [(r["kind"], r["limit"]) for r in learned()] == [("ids", 100)]
    before = refused(emu)
    rt.run(rt.engine.resync())
    assert refused(emu) == before


def test_a_fixed_chunk_is_never_refused(make_runtime: Any, emu: RunningEmulator) -> None:
    # Given an operator who knows the project's limit, and a batch larger than it
    rt = make_runtime(SESSION_SYNC_BATCH_SIZE="30", SESSION_SYNC_REVALIDATION="bulk", SESSION_SYNC_BULK_CHUNK="10")
    login_many(rt, emu, [f"f{i}@example.com" for i in range(30)])
    emu.admin.faults(max_size=10, max_filter_ids=10)
    # When everything is resynced, then requests of ten answer for all, none refused (three, or four when
    # the groups' rounds split the thirty over two batches: chunks do not cross batches)
    counts = rt.run(rt.engine.resync())
    assert (counts.checked, counts.kept, counts.failed) == (30, 30, 0)
    listed = emu.admin.stats()["requests"][LIST]
    assert set(listed) == {"200"} and listed["200"] in (3, 4)


def test_a_list_refused_however_small_falls_back_to_one_check_per_token(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    # Given a Pangea whose session list refuses every request as invalid, and one dead session
    rt = make_runtime(SESSION_SYNC_REVALIDATION="bulk")
    ids = login_many(rt, emu, [f"r{i}@example.com" for i in range(4)])
    rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))
    emu.admin.faults(error="ValidationError", paths=[LIST])
    # When everything is resynced, then each token is checked on its own: nothing fails
    counts = rt.run(rt.engine.resync())
    assert (counts.checked, counts.revoked, counts.kept, counts.failed) == (4, 1, 3, 0)
    assert requests(emu, CHECK) == 4


def test_settling_uncertain_refreshes_splits_what_pangea_refuses(make_runtime: Any, emu: RunningEmulator) -> None:
    # Given five sessions whose refresh failed before Pangea performed it (each stays uncertain)
    rt = make_runtime(SESSION_SYNC_REVALIDATION="bulk")
    clock = moved_clock(rt)
    ids = login_many(rt, emu, [f"s{i}@example.com" for i in range(5)], active_ttl=8)
    clock.advance(5.2)  # inside the refresh margin
    emu.admin.faults(error="InternalError", paths=["/v2/client/session/refresh"])
    rt.run(rt.engine.resync())
    assert all(row(rt, sid).uncertain for sid in ids)
    # When Pangea heals but lists at most two ids at a time
    emu.admin.faults(max_filter_ids=2)
    counts = rt.run(rt.engine.resync())
    # Then the list settles every one (the refresh never happened), and each is refreshed
    assert (counts.refreshed, counts.revoked, counts.failed) == (5, 0, 0)
    assert all(not row(rt, sid).uncertain for sid in ids)
    assert refused(emu) > 0 and emu.admin.stats()["refresh_reused"] == 0
