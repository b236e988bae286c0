"""The sync engine against the emulator (a real server) on SQLite and PostgreSQL.

Each test seeds real logins (hosted-login code → userinfo → record_login), does something to
them at "Pangea", runs the engine, and looks at what a user of the web app would notice.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator, verdict_codes
from tests.helpers import active_token, login, moved_clock, requests, row
from worker import audit, models, queries, sessions, wire
from worker.counts import SyncCounts

pytestmark = pytest.mark.timeout(120)


@verdict_codes
@pytest.mark.parametrize("revalidation", ["bulk", "per_token"])
def test_resync_revokes_the_dead_refreshes_the_expiring_and_leaves_the_healthy(
    make_runtime: Any, emu: RunningEmulator, revalidation: str
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION=revalidation)
    clock = moved_clock(rt)
    # Given healthy sessions, sessions killed at Pangea, one about to expire, one expired for good
    healthy = [login(rt, emu, f"ok{i}@example.com") for i in range(3)]
    killed = [login(rt, emu, f"dead{i}@example.com") for i in range(2)]
    # (a token is refreshed in the last half of its life at the earliest: 4 s lifetime, 1 s left)
    expiring = login(rt, emu, "soon@example.com", active_ttl=4)
    gone = login(rt, emu, "gone@example.com", active_ttl=1, refresh_ttl=1)
    rt.run(rt.client.session_invalidate(row(rt, killed[0]).pangea_session_id or ""))
    rt.run(rt.client.session_logout(row(rt, killed[1]).user_id))
    old_token = active_token(rt, expiring)
    time.sleep(1.3)  # Pangea's clock: the 1 s tokens lapse
    clock.advance(1.7)  # the worker's: 3 s after the logins, the 4 s token is inside its margin

    # When support resyncs everything
    counts = rt.run(rt.engine.resync())
    checks, lists = requests(emu, "/v2/client/token/check"), requests(emu, "/v2/session/list")

    # Then each group ends where it should
    assert counts.as_dict() | {"revoked_by_reason": None} == {
        "checked": 7,
        "refreshed": 1,
        "revoked": 3,
        "failed": 0,
        "kept": 3,
        "held": 0,
        "dropped": 0,
        "stopped": False,
        "revoked_by_reason": None,
    }
    assert counts.reasons == {"invalid_token": 2, "expired": 1}
    for sid in healthy:
        # (healthy: back on their groups' schedule, next checked by their group's next round)
        assert row(rt, sid).state is models.SessionState.ACTIVE and row(rt, sid).next_check_at is None
    for sid in killed:
        assert (row(rt, sid).state, row(rt, sid).end_reason) == (models.SessionState.REVOKED, "invalid_token")
    assert (row(rt, gone).state, row(rt, gone).end_reason) == (models.SessionState.REVOKED, "expired")
    refreshed = row(rt, expiring)
    assert refreshed.state is models.SessionState.ACTIVE and not refreshed.uncertain
    assert active_token(rt, expiring) != old_token
    assert refreshed.active_expires_at > datetime.now(UTC) + timedelta(seconds=2)
    # ... the new token works at Pangea, and the app finds the session by it
    assert rt.run(rt.client.check_token(active_token(rt, expiring))).verdict is wire.Verdict.VALID
    with rt.sessions() as db:
        assert sessions.authenticate(db, active_token(rt, expiring), cipher=rt.cipher).id == expiring
    if revalidation == "bulk":
        # one list per batch: the short-lived sessions due on their own, and the groups' round (small groups
        # are taken together); checks only to confirm the three that bulk missed
        assert (lists, checks) == (2, 3)
    else:
        assert (lists, checks) == (0, 6)


def test_no_answer_never_revokes(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION="per_token")
    ids = [login(rt, emu, f"u{i}@example.com") for i in range(4)]
    rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))
    for fault in ("InternalError", "Malformed", "TooManyRequests", "Timeout"):
        # Given Pangea failing in one way
        emu.admin.faults(error_rate=1.0, error=fault, retry_after=1)
        # When a resync runs
        counts = rt.run(rt.engine.resync())
        # Then nothing is revoked, not even the session Pangea would call invalid
        assert counts.revoked == 0 and counts.failed == 4, fault
        assert all(row(rt, i).state is models.SessionState.ACTIVE for i in ids)
    assert row(rt, ids[1]).failures == 4
    # When Pangea heals, the dead session is revoked and the failure counts reset
    emu.admin.clear_faults()
    counts = rt.run(rt.engine.resync())
    assert counts.revoked == 1 and row(rt, ids[0]).end_reason == "invalid_token"
    assert row(rt, ids[1]).failures == 0


@pytest.mark.parametrize("revalidation", ["bulk", "per_token"])
def test_success_under_another_code_is_no_verdict_and_retried(
    make_runtime: Any, emu: RunningEmulator, revalidation: str
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION=revalidation)
    ids = [login(rt, emu, f"u{i}@example.com") for i in range(3)]
    rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))
    # Given something between us and Pangea that answers Success with HTTP 201
    emu.admin.faults(http_codes={"Success": 201})
    # When a resync runs, then no answer counts: nothing revoked or kept as checked, all retried later
    counts = rt.run(rt.engine.resync())
    # (per token, the dead session's InvalidToken is still a verdict: it never was a Success)
    bulk = revalidation == "bulk"
    assert (counts.revoked, counts.kept, counts.failed, counts.stopped) == (
        0 if bulk else 1,
        0,
        3 if bulk else 2,
        False,
    )
    assert all(row(rt, i).state is models.SessionState.ACTIVE and row(rt, i).failures == 1 for i in ids[1:])
    # When Pangea answers 200 again, the next resync gets every verdict
    emu.admin.clear_faults()
    counts = rt.run(rt.engine.resync())
    assert (counts.revoked, counts.kept, counts.failed) == (1 if bulk else 0, 2, 0)
    assert row(rt, ids[0]).state is models.SessionState.REVOKED


@verdict_codes
def test_wrong_service_token_stops_and_changes_nothing(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    ids = [login(rt, emu, f"u{i}@example.com") for i in range(3)]
    rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))  # an InvalidToken due too
    before = [(row(rt, i).version, row(rt, i).next_check_at) for i in ids]
    wrong = make_runtime(PANGEA_AUTHN_TOKEN="pts_" + "x" * 32)
    counts = wrong.run(wrong.engine.resync())
    assert counts.stopped and counts.checked == 0
    after = [row(rt, i) for i in ids]
    assert all(r.state is models.SessionState.ACTIVE and r.claim_token is None for r in after)
    assert [r.failures for r in after] == [0, 0, 0]
    assert [r.version for r in after] == [v for v, _ in before]


@pytest.mark.parametrize("revalidation", ["bulk", "per_token"])
def test_a_lost_refresh_answer_is_settled_never_replayed_and_its_orphan_ended(
    make_runtime: Any, emu: RunningEmulator, revalidation: str
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION=revalidation)
    clock = moved_clock(rt)
    sid = login(rt, emu, "lost@example.com", active_ttl=8)
    token = active_token(rt, sid)
    clock.advance(5.2)  # 2.8 s left: inside the refresh margin (at least 3 s of an 8 s token)
    # Given Pangea performs refreshes but the answer never arrives
    emu.admin.faults(error_rate=1.0, error="Dropped", paths=["/v2/client/session/refresh"])
    counts = rt.run(rt.engine.resync(session_ids=[sid]))
    # Then the session is kept, marked uncertain, not revoked
    assert counts.revoked == 0
    assert row(rt, sid).state is models.SessionState.ACTIVE and row(rt, sid).uncertain
    # When the fault heals and the worker looks at the session again
    emu.admin.clear_faults()
    counts = rt.run(rt.engine.resync(session_ids=[sid]))
    # Then it learns from the session list that the refresh happened, and never sends the spent
    # refresh token again
    assert requests(emu, "/v2/client/session/refresh") == 1
    assert emu.admin.stats()["refresh_reused"] == 0
    r = row(rt, sid)
    pangea_id = r.pangea_session_id or ""
    if revalidation == "bulk":
        # ... and with a service token it ends at Pangea the session those lost tokens keep alive
        # (no one holds them), and says why the user must sign in again
        assert counts.revoked == 1 and counts.reasons == {"refresh_lost": 1}
        assert (r.state, r.end_reason) == (models.SessionState.REVOKED, "refresh_lost")
        assert not rt.run(rt.client.session_list(filter={"id": pangea_id}, size=1)).sessions
        with rt.sessions() as db:
            assert next(e.outcome for e in audit.history(db, sid)) == "orphan_ended"
    else:
        # ... while with a client token, which cannot end a session by id, the session is kept
        # until the active token it holds lapses
        assert counts.revoked == 0
        assert r.state is models.SessionState.ACTIVE and r.refresh_token_enc is None and r.uncertain
        assert rt.run(rt.client.check_token(token)).verdict is wire.Verdict.VALID


@pytest.mark.parametrize("revalidation", ["bulk", "per_token"])
def test_a_refresh_that_never_happened_is_settled_and_retried(
    make_runtime: Any, emu: RunningEmulator, revalidation: str
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION=revalidation)
    clock = moved_clock(rt)
    sid = login(rt, emu, "retry@example.com", active_ttl=8)
    clock.advance(5.2)  # inside the refresh margin
    # Given a refresh that failed before Pangea performed it (the row stays uncertain)
    emu.admin.faults(error_rate=1.0, error="InternalError", paths=["/v2/client/session/refresh"])
    rt.run(rt.engine.resync(session_ids=[sid]))
    assert row(rt, sid).uncertain and row(rt, sid).refresh_token_enc is not None
    # When the fault heals and the worker looks again
    emu.admin.clear_faults()
    counts = rt.run(rt.engine.resync(session_ids=[sid]))
    # Then the list shows our active token is still current, so the refresh goes ahead once
    assert counts.refreshed == 1 and counts.revoked == 0
    r = row(rt, sid)
    assert not r.uncertain and r.refresh_token_enc is not None
    assert rt.run(rt.client.check_token(active_token(rt, sid))).verdict is wire.Verdict.VALID
    assert emu.admin.stats()["refresh_reused"] == 0


def test_two_claimers_never_take_the_same_row(make_runtime: Any, emu: RunningEmulator, db_url: str) -> None:
    rt = make_runtime()
    # Given 400 due sessions (inserted directly: this is about the claim, not Pangea)
    now = datetime.now(UTC)
    with rt.sessions.begin() as db:
        db.execute(
            sa.insert(models.LocalSession),
            [
                {
                    "user_id": f"pui_{i}",
                    "email": "x@example.com",
                    "active_token_id": f"pmt_{i}",
                    "active_token_enc": "x",
                    "active_token_hash": f"h{i}",
                    "active_expires_at": now + timedelta(hours=1),
                    "next_check_at": now - timedelta(seconds=1),
                }
                for i in range(400)
            ],
        )
    # When one claim asks for 25, it gets 25 (PostgreSQL must not re-run the locking pick per row)
    with rt.sessions.begin() as db:
        one = queries.claim_due_sessions(
            db, now=datetime.now(UTC), limit=25, lease=timedelta(minutes=5), claim_token="one"
        )
        assert len(one) == 25
        assert queries.release(db, claim_token="one") == 25
    # When four threads claim batches of 30 as fast as they can
    taken: list[list[int]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def claimer(n: int) -> None:
        factory = rt.sessions
        barrier.wait()
        while True:
            with factory.begin() as db:
                got = queries.claim_due_sessions(
                    db, now=datetime.now(UTC), limit=30, lease=timedelta(minutes=5), claim_token=f"c{n}"
                )
            if not got:
                return
            taken[n].extend(s.id for s in got)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every row was claimed exactly once
    flat = [i for part in taken for i in part]
    assert len(flat) == 400 and len(set(flat)) == 400
    assert sum(1 for part in taken if part) >= 2


def test_concurrent_refreshes_spend_the_refresh_token_once(make_runtime: Any, emu: RunningEmulator) -> None:
    a, b = make_runtime(), make_runtime()
    clock = moved_clock(a, b)
    ids = [login(a, emu, f"r{i}@example.com", active_ttl=4) for i in range(10)]
    clock.advance(2.6)  # 1.4 s left: inside the refresh margin (at least 1.5 s of a 4 s token)

    # When two workers (each with its own pools and loop) resync them at the same moment
    results: list[SyncCounts] = []
    threads = [
        threading.Thread(target=lambda rt=rt: results.append(rt.run(rt.engine.resync(session_ids=ids))))
        for rt in (a, b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then no refresh token was used twice (Pangea answered every refresh, none revoked), and each session
    # was refreshed at least once (the moved clock makes a token the other worker just minted look 2.6 s
    # old, so a worker that reads the row after the first refresh finished may rightly refresh it again)
    refreshed = sum(c.refreshed for c in results)
    assert sum(c.revoked for c in results) == 0
    assert 10 <= refreshed <= 20 and requests(emu, "/v2/client/session/refresh") == refreshed
    assert set(emu.admin.stats()["requests"]["/v2/client/session/refresh"]) == {"200"}
    assert all(row(a, i).state is models.SessionState.ACTIVE for i in ids)


def test_audit_trail_explains_a_revocation(make_runtime: Any, emu: RunningEmulator) -> None:
    from worker import operations

    rt = make_runtime()
    sid = login(rt, emu, "why@example.com")
    rt.run(rt.client.session_invalidate(row(rt, sid).pangea_session_id or ""))
    rt.run(rt.engine.resync(session_ids=[sid]))
    report = operations.session_report(rt, sid)
    assert report is not None and report["state"] == "revoked" and report["end_reason"] == "invalid_token"
    [event] = report["events"]
    assert event["action"] == "revoked" and event["outcome"] == "invalid"
    assert event["request_id"] and event["request_id"].startswith("prq_")


def test_batches_in_flight_share_the_work_without_overlap(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(
        SESSION_SYNC_REVALIDATION="per_token", SESSION_SYNC_BATCH_SIZE="2", SESSION_SYNC_BATCHES_IN_FLIGHT="3"
    )
    # Given 9 sessions, one of them killed at Pangea
    ids = [login(rt, emu, f"lane{i}@example.com") for i in range(9)]
    rt.run(rt.client.session_invalidate(row(rt, ids[4]).pangea_session_id or ""))
    # When a resync drains them in batches of 2, three batches at a time
    counts = rt.run(rt.engine.resync())
    # Then every session was checked exactly once, and each lease was given back
    assert (counts.checked, counts.kept, counts.revoked) == (9, 8, 1)
    assert requests(emu, "/v2/client/token/check") == 9
    assert all(row(rt, i).claim_token is None for i in ids)
    assert row(rt, ids[4]).end_reason == "invalid_token"


def test_a_session_logged_out_while_its_refresh_is_in_flight_leaves_nothing_alive_at_pangea(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime()
    clock = moved_clock(rt)
    sid = login(rt, emu, "late@example.com", active_ttl=8)
    pangea_id = row(rt, sid).pangea_session_id or ""
    clock.advance(5.2)  # inside the refresh margin of an 8 s token, as the worker sees it
    # Given a refresh that takes three seconds to come back
    emu.admin.faults(latency_ms=3000, paths=["/v2/client/session/refresh"])
    version = row(rt, sid).version  # read first: a worker quick to take its hold must not be missed
    refreshing = threading.Thread(target=lambda: rt.run(rt.engine.resync(session_ids=[sid])))
    refreshing.start()

    # When the user logs out in the app meanwhile (once the worker took the refresh hold, which
    # moves the row's version, and the request is on its way)
    deadline = time.monotonic() + 20
    while row(rt, sid).version == version and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    with rt.sessions.begin() as db:
        sessions.logout(db, sid, kick=False)
    refreshing.join(timeout=30)
    emu.admin.clear_faults()

    # Then the tokens that refresh minted are logged out too (the audit trail says so), and once the
    # outbox delivered, Pangea has nothing left of the session (on PostgreSQL the audit row must fit)
    with rt.sessions() as db:
        trail = [e.action for e in audit.history(db, sid)]
    assert "late_refresh" in trail, trail
    rt.run(rt.delivery.drain())
    assert not rt.run(rt.client.session_list(filter={"id": pangea_id}, size=1)).sessions


def test_an_orphan_that_could_not_be_ended_is_ended_at_the_next_settling(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION="bulk")
    clock = moved_clock(rt)
    sid = login(rt, emu, "orphan@example.com", active_ttl=8)
    clock.advance(5.2)  # inside the refresh margin of an 8 s token, as the worker sees it
    # Given a refresh Pangea performed and whose answer was lost
    emu.admin.faults(error_rate=1.0, error="Dropped", paths=["/v2/client/session/refresh"])
    rt.run(rt.engine.resync(session_ids=[sid]))
    pangea_id = row(rt, sid).pangea_session_id or ""
    # When settling proves it, but ending the orphan at Pangea fails
    emu.admin.faults(error_rate=1.0, error="InternalError", paths=["/v2/session/invalidate"])
    counts = rt.run(rt.engine.resync(session_ids=[sid]))
    assert counts.revoked == 0 and row(rt, sid).uncertain
    assert rt.run(rt.client.session_list(filter={"id": pangea_id}, size=1)).sessions
    # Then the next settling, with Pangea well again, ends it and says why
    emu.admin.clear_faults()
    counts = rt.run(rt.engine.resync(session_ids=[sid]))
    assert counts.reasons == {"refresh_lost": 1}
    assert not rt.run(rt.client.session_list(filter={"id": pangea_id}, size=1)).sessions
    assert emu.admin.stats()["refresh_reused"] == 0
