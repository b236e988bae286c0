"""The logout outbox against the emulator (a real server) on SQLite and PostgreSQL.

Each test logs real users in (hosted-login code → userinfo → record_login), logs them out the way
the web app does, delivers, and looks at what Pangea (the emulator) and an operator would see.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests.conftest import RunningEmulator, verdict_codes
from tests.helpers import active_token, env_for, login, requests, row
from worker import cli_outbox, errors, kick, models, operations, runtime, sessions, wire
from worker import outbox_queries as oq
from worker.counts import LogoutCounts

pytestmark = pytest.mark.timeout(120)

CLIENT_LOGOUT = "/v2/client/session/logout"
USER_LOGOUT = "/v2/session/logout"
E = models.LogoutEvent


def events(rt: runtime.Runtime) -> list[models.LogoutEvent]:
    with rt.sessions() as db:
        return list(db.scalars(sa.select(E).order_by(E.id)))


def event(rt: runtime.Runtime, event_id: int) -> models.LogoutEvent:
    with rt.sessions() as db:
        found = db.get(E, event_id)
        assert found is not None
        return found


def log_out(rt: runtime.Runtime, *session_ids: int) -> list[int]:
    """The app logs sessions out and commits; returns the outbox event ids."""
    with rt.sessions.begin() as db:
        for sid in session_ids:
            sessions.logout(db, sid, kick=False)
    with rt.sessions() as db:
        return list(db.scalars(sa.select(E.id).where(E.session_id.in_(session_ids)).order_by(E.id)))


def make_due(rt: runtime.Runtime) -> None:
    """Skip the backoff: every pending event is due now (the clock moving on, in one statement)."""
    with rt.sessions.begin() as db:
        db.execute(sa.update(E).where(E.state == "pending").values(next_attempt_at=datetime.now(UTC)))


def verdict(rt: runtime.Runtime, token: str) -> wire.Verdict:
    return rt.run(rt.client.check_token(token)).verdict


def deliver(rt: runtime.Runtime) -> LogoutCounts:
    return rt.run(rt.delivery.drain())


# --- enqueue in the app's transaction -------------------------------------------------------------


def test_logout_and_its_outbox_row_commit_or_roll_back_together(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "ann@example.com")
    before = row(rt, sid)

    # When the app logs the session out but its transaction rolls back
    with rt.sessions() as db:
        sessions.logout(db, sid, kick=False)
        db.rollback()
    # Then neither the logout nor the outbox row exists
    assert row(rt, sid).state is models.SessionState.ACTIVE
    assert events(rt) == []

    # When it logs out and commits
    with rt.sessions.begin() as db:
        returned = sessions.logout(db, sid, kick=False)
        assert returned.state is models.SessionState.LOGGED_OUT  # the caller sees it before committing
    # Then the session ended and one session logout waits, holding the encrypted active token
    after = row(rt, sid)
    assert (after.state, after.end_reason) == (models.SessionState.LOGGED_OUT, "user_logout")
    assert after.ended_at is not None and after.version == before.version + 1
    assert after.refresh_token_enc is None and after.claim_token is None
    [ev] = events(rt)
    assert (ev.kind, ev.state, ev.session_id, ev.user_id) == (
        models.OutboxKind.SESSION,
        models.OutboxState.PENDING,
        sid,
        before.user_id,
    )
    assert ev.token_enc is not None and rt.cipher.decrypt(ev.token_enc) == active_token(rt, sid)
    # ... and the app refuses the session from now on
    with rt.sessions() as db, pytest.raises(errors.SessionInvalid) as refused:
        sessions.authenticate(db, sid, cipher=rt.cipher)
    assert refused.value.reason == "logged_out"


def test_logout_is_idempotent_and_unknown_ids_are_clear(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "bob@example.com")
    # Given a session logged out once
    log_out(rt, sid)
    version = row(rt, sid).version
    # When it is logged out again, in another transaction
    with rt.sessions.begin() as db:
        again = sessions.logout(db, sid, kick=False)
    # Then nothing changes and nothing more is queued
    assert again.state is models.SessionState.LOGGED_OUT and row(rt, sid).version == version
    assert len(events(rt)) == 1
    # When ids that never existed are logged out, the error says so
    with rt.sessions() as db:
        with pytest.raises(errors.UnknownSession, match="no local session with id 987654"):
            sessions.logout(db, 987654, kick=False)
        with pytest.raises(errors.UnknownSession, match="pui_nobody"):
            sessions.logout_user(db, "pui_nobody", kick=False)


# --- delivery ---------------------------------------------------------------------------------


def test_delivery_logs_out_at_pangea_and_erases_every_token(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given three logins, two of them logged out by the app
    ids = [login(rt, emu, f"c{i}@example.com") for i in range(3)]
    secrets = {active_token(rt, i) for i in ids} | {rt.cipher.decrypt(row(rt, i).refresh_token_enc or "") for i in ids}
    out = log_out(rt, ids[0], ids[1])

    # When the worker delivers
    counts = deliver(rt)

    # Then Pangea ended exactly those two sessions, with one call each
    assert counts.as_dict() == {
        "claimed": 2,
        "delivered": 2,
        "already": 0,
        "retried": 0,
        "paused": 0,
        "held": 0,
        "dead": 0,
        "stopped": False,
    }
    assert [verdict(rt, active_token(rt, i)) for i in ids] == [
        wire.Verdict.INVALID,
        wire.Verdict.INVALID,
        wire.Verdict.VALID,
    ]
    assert emu.admin.stats()["requests"][CLIENT_LOGOUT] == {"200": 2}
    # ... each event is delivered with its token erased
    for ev in map(lambda i: event(rt, i), out):
        assert (ev.state, ev.attempts, ev.token_enc) == (models.OutboxState.DELIVERED, 1, None)
        assert ev.delivered_at is not None and ev.claim_token is None
    # ... and no token is anywhere in the table, encrypted or not
    with rt.sessions() as db:
        dump = repr(db.execute(sa.select(sa.text("*")).select_from(sa.table("logout_outbox"))).all())
    assert not any(secret in dump for secret in secrets)
    assert "gAAAA" not in dump  # no Fernet ciphertext left either
    # ... and the audit trail says when Pangea confirmed it
    report = operations.session_report(rt, ids[0])
    assert report is not None
    assert [e["action"] for e in report["events"]][:2] == ["logout_sent", "logged_out"]
    assert report["events"][0]["request_id"].startswith("prq_")


@verdict_codes
def test_a_session_already_logged_out_at_pangea_counts_as_delivered(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "dan@example.com")
    # Given Pangea already ended the session (the user logged out elsewhere)
    rt.run(rt.client.session_invalidate(row(rt, sid).pangea_session_id or ""))
    [eid] = log_out(rt, sid)
    # When the worker delivers
    counts = deliver(rt)
    # Then Pangea's InvalidToken means "already logged out": delivered, token erased
    assert (counts.delivered, counts.already, counts.retried) == (1, 1, 0)
    ev = event(rt, eid)
    assert (ev.state, ev.token_enc) == (models.OutboxState.DELIVERED, None)
    assert emu.admin.stats()["requests"][CLIENT_LOGOUT] == {str(emu.verdict_code): 1}


@verdict_codes
def test_a_lapsed_active_token_does_not_leave_its_session_alive_at_pangea(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "fay@example.com", active_ttl=1)
    pangea_id = row(rt, sid).pangea_session_id or ""
    # Given a session whose active token lapsed (its refresh never came) but which Pangea still holds
    time.sleep(1.3)
    assert verdict(rt, active_token(rt, sid)) is wire.Verdict.EXPIRED
    [eid] = log_out(rt, sid)
    # When the worker delivers the logout
    counts = deliver(rt)
    # Then Pangea's ExpiredToken is not taken for "already logged out": the session is ended by id
    assert (counts.delivered, counts.already) == (1, 0)
    assert event(rt, eid).state is models.OutboxState.DELIVERED
    assert emu.admin.stats()["requests"]["/v2/session/invalidate"] == {"200": 1}
    gone = rt.run(rt.client.session_list(filter={"id": pangea_id}))
    assert not gone.sessions


def test_transient_failures_back_off_and_honor_retry_after(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(SESSION_SYNC_HTTP_RETRIES="0", SESSION_SYNC_OUTBOX_BACKOFF="2s")
    sid = login(rt, emu, "eve@example.com")
    [eid] = log_out(rt, sid)

    # Given Pangea answers every logout with a server error
    emu.admin.faults(error="InternalError", paths=[CLIENT_LOGOUT])
    started = datetime.now(UTC)
    counts = deliver(rt)
    # Then the event waits for a jittered backoff (at most the first step), one attempt spent
    ev = event(rt, eid)
    assert (counts.retried, ev.state, ev.attempts) == (1, models.OutboxState.PENDING, 1)
    assert started < ev.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=2)
    assert ev.last_error == "AuthnUnavailable: /v2/client/session/logout: HTTP 500"
    assert ev.token_enc is not None and ev.claim_token is None
    backlog = operations.status(rt)["outbox_backlog"]
    assert backlog["leased"] == 0 and backlog["oldest_pending_seconds"] >= 0
    # ... and a delivery run before it is due calls nobody
    calls = requests(emu, CLIENT_LOGOUT)
    if ev.next_attempt_at > datetime.now(UTC) + timedelta(milliseconds=200):
        assert deliver(rt).claimed == 0 and requests(emu, CLIENT_LOGOUT) == calls

    # Given Pangea now says TooManyRequests with Retry-After: 30
    emu.admin.faults(error="TooManyRequests", retry_after=30, paths=[CLIENT_LOGOUT])
    make_due(rt)
    asked = datetime.now(UTC)
    deliver(rt)
    # Then the next attempt is not before Retry-After, though the backoff alone would be sooner
    ev = event(rt, eid)
    assert ev.attempts == 2 and ev.next_attempt_at >= asked + timedelta(seconds=30)
    assert ev.last_error == "AuthnRateLimited: /v2/client/session/logout: TooManyRequests"

    # When Pangea heals and the event is due
    emu.admin.clear_faults()
    make_due(rt)
    counts = deliver(rt)
    # Then it is delivered on the third attempt
    ev = event(rt, eid)
    assert (counts.delivered, ev.state, ev.attempts, ev.token_enc) == (1, models.OutboxState.DELIVERED, 3, None)
    assert verdict(rt, active_token(rt, sid)) is wire.Verdict.INVALID


@verdict_codes
def test_our_wrong_token_pauses_delivery_without_burning_attempts(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    ids = [login(rt, emu, f"f{i}@example.com") for i in range(3)]
    out = log_out(rt, *ids)
    # Given a worker whose PANGEA_AUTHN_TOKEN Pangea refuses
    wrong = make_runtime(PANGEA_AUTHN_TOKEN="pts_" + "x" * 32, SESSION_SYNC_CONCURRENCY="1")
    started = datetime.now(UTC)

    # When it delivers
    counts = wrong.run(wrong.delivery.drain())

    # Then it stops after the first refusal: one call, no attempt counted, everything paused
    assert counts.stopped and counts.paused == 3 and counts.delivered == counts.dead == 0
    assert requests(emu, CLIENT_LOGOUT) == 1
    for ev in (event(rt, i) for i in out):
        assert (ev.state, ev.attempts) == (models.OutboxState.PENDING, 0)
        assert ev.next_attempt_at >= started + timedelta(seconds=59)
        assert ev.last_error is not None and ev.last_error.startswith("AuthnRejectedUs")
    # When the token is fixed (and the pause is over), all three are delivered on their first attempt
    make_due(rt)
    assert deliver(rt).delivered == 3
    assert [event(rt, i).attempts for i in out] == [1, 1, 1]


def test_dead_letters_by_attempts_and_by_age_then_replayed(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(
        SESSION_SYNC_HTTP_RETRIES="0", SESSION_SYNC_OUTBOX_MAX_ATTEMPTS="2", SESSION_SYNC_OUTBOX_MAX_AGE="1h"
    )
    young, old = login(rt, emu, "g1@example.com"), login(rt, emu, "g2@example.com")
    young_ev, old_ev = log_out(rt, young, old)
    with rt.sessions.begin() as db:  # queued two hours ago, during an outage
        db.execute(sa.update(E).where(E.id == old_ev).values(created_at=datetime.now(UTC) - timedelta(hours=2)))
    # Given Pangea keeps failing
    emu.admin.faults(error="InternalError", paths=[CLIENT_LOGOUT])

    # When delivery is attempted, and attempted again
    first = deliver(rt)
    make_due(rt)
    second = deliver(rt)

    # Then the old event died of age at its first failure, the young one after two attempts
    assert (first.dead, first.retried, second.dead) == (1, 1, 1)
    assert (event(rt, old_ev).state, event(rt, old_ev).attempts) == (models.OutboxState.DEAD, 1)
    assert (
        event(rt, old_ev).last_error
        == "gave up: too old; last error: AuthnUnavailable: " + CLIENT_LOGOUT + ": HTTP 500"
    )
    young_row = event(rt, young_ev)
    assert (young_row.state, young_row.attempts) == (models.OutboxState.DEAD, 2)
    assert young_row.last_error is not None and young_row.last_error.startswith("gave up after 2 attempts")
    assert young_row.dead_at is not None and young_row.token_enc is not None  # kept for a replay
    assert operations.status(rt)["outbox"] == {"pending": 0, "delivered": 0, "dead": 2}
    # ... and nothing more is tried
    calls = requests(emu, CLIENT_LOGOUT)
    make_due(rt)
    assert deliver(rt).claimed == 0 and requests(emu, CLIENT_LOGOUT) == calls

    # When Pangea heals and the operator retries the dead letters
    emu.admin.clear_faults()
    with rt.sessions.begin() as db:
        assert oq.retry_dead(db, now=datetime.now(UTC)) == [young_ev, old_ev]
    counts = deliver(rt)
    # Then both are delivered: the old one's age counts from the retry, not from its creation
    assert counts.delivered == 2
    assert [verdict(rt, active_token(rt, i)) for i in (young, old)] == [wire.Verdict.INVALID] * 2


def test_purge_removes_only_old_delivered_events(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    ids = [login(rt, emu, f"h{i}@example.com") for i in range(3)]
    delivered = log_out(rt, ids[0], ids[1])
    deliver(rt)
    [pending] = log_out(rt, ids[2])
    # When the operator purges what was delivered more than an hour ago, nothing goes
    with rt.sessions.begin() as db:
        assert oq.purge_delivered(db, before=datetime.now(UTC) - timedelta(hours=1)) == 0
    # When they purge everything delivered until now
    with rt.sessions.begin() as db:
        assert oq.purge_delivered(db, before=datetime.now(UTC) + timedelta(seconds=1)) == 2
    # Then only the pending event is left
    assert [ev.id for ev in events(rt)] == [pending] and pending not in delivered


def test_a_delivered_event_is_never_sent_again(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "ivy@example.com")
    [eid] = log_out(rt, sid)
    # Given a worker that claimed the event, then stalled past its lease
    with rt.sessions.begin() as db:
        [stale] = oq.claim_due_events(
            db, now=datetime.now(UTC), limit=10, lease=timedelta(minutes=1), claim_token="stale"
        )
    with rt.sessions.begin() as db:  # ... a minute later, its lease has lapsed
        db.execute(sa.update(E).values(claimed_until=datetime.now(UTC) - timedelta(seconds=1)))
    # When another worker delivers it
    assert deliver(rt).delivered == 1
    stats = emu.admin.stats()["requests"]
    # ... and delivery runs again, for everything and for this very event
    assert deliver(rt).claimed == 0
    assert rt.run(rt.delivery.deliver_batch(event_ids=[eid])).claimed == 0
    # ... and the stalled worker finally writes its own (failed) outcome
    with rt.sessions.begin() as db:
        oq.reschedule(
            db,
            [
                {
                    "b_id": stale.id,
                    "b_claim": stale.claim_token,
                    "attempts": 7,
                    "next_attempt_at": datetime.now(UTC),
                    "last_error": "late",
                }
            ],
        )
    # Then Pangea saw no second call, and the delivered row kept its facts
    assert emu.admin.stats()["requests"] == stats
    ev = event(rt, eid)
    assert (ev.state, ev.attempts, ev.last_error) == (models.OutboxState.DELIVERED, 1, None)


def test_claims_take_at_most_their_limit_and_never_the_same_event(make_runtime: Any) -> None:
    rt = make_runtime()
    # Given 300 due events (inserted directly: this is about the claim, not Pangea)
    now = datetime.now(UTC)
    with rt.sessions.begin() as db:
        db.execute(
            sa.insert(E),
            [{"kind": "user", "user_id": f"pui_{i}", "created_at": now, "next_attempt_at": now} for i in range(300)],
        )
    # When four threads claim batches of 25 as fast as they can
    taken: list[list[list[int]]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def claimer(n: int) -> None:
        barrier.wait()
        while True:
            with rt.sessions.begin() as db:
                got = oq.claim_due_events(
                    db, now=datetime.now(UTC), limit=25, lease=timedelta(minutes=5), claim_token=f"c{n}"
                )
            if not got:
                return
            taken[n].append([ev.id for ev in got])

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then no claim took more than its limit (a locking sub-select rescanned by PostgreSQL once took
    # every due row at once), and every event was claimed exactly once
    batches = [batch for part in taken for batch in part]
    assert max(len(b) for b in batches) == 25
    flat = [i for b in batches for i in b]
    assert len(flat) == 300 and len(set(flat)) == 300


def test_user_wide_logout_ends_every_session_of_the_user_at_pangea(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given a user logged in on three devices, and someone else
    mine = [login(rt, emu, "joe@example.com") for _ in range(3)]
    other = login(rt, emu, "kim@example.com")
    user_id = row(rt, mine[0]).user_id
    tokens = [active_token(rt, i) for i in mine]

    # When the app logs the user out everywhere (twice, as a double click would)
    with rt.sessions.begin() as db:
        done = sessions.logout_user(db, user_id, kick=False)
    with rt.sessions.begin() as db:
        again = sessions.logout_user(db, user_id, kick=False)

    # Then all three local sessions ended, and one user logout is queued
    assert done.session_ids == tuple(mine) and again.session_ids == () and again.event_id == done.event_id
    assert all(row(rt, i).state is models.SessionState.LOGGED_OUT for i in mine)
    [ev] = events(rt)
    assert (ev.kind, ev.user_id, ev.session_id, ev.token_enc) == (models.OutboxKind.USER, user_id, None, None)
    # When it is delivered
    assert deliver(rt).delivered == 1
    # Then Pangea ended every one of them with one call, and nobody else's
    assert [verdict(rt, t) for t in tokens] == [wire.Verdict.INVALID] * 3
    assert verdict(rt, active_token(rt, other)) is wire.Verdict.VALID
    assert row(rt, other).state is models.SessionState.ACTIVE
    assert emu.admin.stats()["requests"][USER_LOGOUT] == {"200": 1}


# --- the kick after commit --------------------------------------------------------------------


def test_kick_follows_the_commit_and_never_breaks_it(
    make_runtime: Any, emu: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    rt = make_runtime()
    ids = [login(rt, emu, f"l{i}@example.com") for i in range(3)]
    kicks: list[str] = []

    # When a logout rolls back, then another commits
    with rt.sessions() as db:
        sessions.logout(db, ids[0], kick=lambda: kicks.append("rolled back"))
        assert kicks == []
        db.rollback()
        db.commit()
        sessions.logout(db, ids[1], kick=lambda: kicks.append("committed"))
        assert kicks == []  # nothing before the commit
        db.commit()
        db.commit()
    # Then only the committed one kicked, once
    assert kicks == ["committed"]

    # When the broker is down
    def broken() -> None:
        raise ConnectionError("broker down")

    with caplog.at_level(logging.WARNING, logger="worker.kick"), rt.sessions.begin() as db:
        sessions.logout(db, ids[2], kick=broken)
    # Then the logout still committed, and the failure is logged, not raised
    assert row(rt, ids[2]).state is models.SessionState.LOGGED_OUT
    assert "Could not kick logout delivery (ConnectionError)" in caplog.text


def test_automatic_kick_needs_a_broker() -> None:
    # Given the environment a web app may have, the automatic kick only fires with a real broker
    assert not kick.broker_configured({})
    assert not kick.broker_configured({"CELERY_BROKER_URL": "memory://"})
    assert kick.broker_configured({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"})
    assert not kick.broker_configured({"CELERY_BROKER_URL": "redis://h/0", "SESSION_SYNC_OUTBOX_KICK": "false"})


# --- the operator's commands --------------------------------------------------------------------


def test_operator_commands(make_runtime: Any, emu: RunningEmulator, db_url: str) -> None:
    rt = make_runtime(SESSION_SYNC_HTTP_RETRIES="0", SESSION_SYNC_OUTBOX_MAX_ATTEMPTS="1")
    cli = CliRunner(env=env_for(db_url, emu))
    ids = [login(rt, emu, f"m{i}@example.com") for i in range(3)]
    user_id = row(rt, ids[2]).user_id
    tokens = [active_token(rt, i) for i in ids]

    # When support logs out one session and one user from the shell
    one = cli.invoke(cli_outbox.logout, ["--session", str(ids[0])])
    user = cli.invoke(cli_outbox.logout, ["--user", user_id, "--json"])
    # Then both are ended and queued
    assert one.exit_code == 0, one.output
    assert one.output.strip() == f"session {ids[0]} of {row(rt, ids[0]).user_id}: logged_out (operator_logout)"
    assert user.exit_code == 0 and '"session_ids": [' + str(ids[2]) + "]" in user.output
    assert cli.invoke(cli_outbox.logout, ["--session", "424242"]).exit_code == 1
    assert cli.invoke(cli_outbox.logout, []).exit_code == 2

    # Given Pangea fails once: both events become dead letters (max attempts 1)
    emu.admin.faults(error="InternalError")
    assert deliver(rt).dead == 2
    emu.admin.clear_faults()
    # When the operator lists the outbox
    listing = cli.invoke(cli_outbox.outbox, [])
    as_json = cli.invoke(cli_outbox.outbox, ["--dead", "--json"])
    # Then they see ids, kinds, attempts, errors, and never a token
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert lines[0].split()[:5] == ["id", "state", "kind", "session", "user"] and len(lines) == 3
    assert "dead" in lines[1] and "gave up after 1 attempts" in lines[1]
    assert {e["kind"] for e in json.loads(as_json.output)} == {"session", "user"}
    for text in (listing.output, as_json.output):
        assert not any(t in text for t in tokens) and "gAAAA" not in text

    # When they retry the dead letters and deliver in-process
    retried = cli.invoke(cli_outbox.outbox, ["--retry-dead"])
    delivered = cli.invoke(cli_outbox.outbox, ["--deliver", "--json"])
    # Then both reach Pangea
    assert retried.exit_code == 0 and retried.output.startswith("2 dead letter(s) back to pending")
    assert '"delivered": 2' in delivered.output, delivered.output
    assert [verdict(rt, t) for t in tokens] == [wire.Verdict.INVALID, wire.Verdict.VALID, wire.Verdict.INVALID]
    assert cli.invoke(cli_outbox.outbox, []).output.strip() == "no pending or dead logouts"
    # When they purge delivered events older than a day, then older than nothing
    kept = cli.invoke(cli_outbox.outbox, ["--purge-delivered", "1d"])
    purged = cli.invoke(cli_outbox.outbox, ["--purge-delivered", "0s"])
    assert (kept.output.strip(), purged.output.strip()) == (
        "0 delivered event(s) purged",
        "2 delivered event(s) purged",
    )
    assert cli.invoke(cli_outbox.outbox, ["--purge-delivered", "soon"]).exit_code == 2
    assert operations.status(rt)["outbox"] == {"pending": 0, "delivered": 0, "dead": 0}


def test_a_batch_slower_than_its_lease_keeps_its_events_and_sends_each_once(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    settings = {"SESSION_SYNC_LEASE": "1s", "SESSION_SYNC_CONCURRENCY": "1"}
    rt = make_runtime(**settings)
    ids = [login(rt, emu, f"slow{i}@example.com") for i in range(4)]
    log_out(rt, *ids)
    # Given a Pangea so slow that one batch of logouts, sent one at a time, outlasts its lease fourfold
    emu.admin.faults(latency_ms=1200, paths=[CLIENT_LOGOUT])
    done: list[LogoutCounts] = []
    sending = threading.Thread(target=lambda: done.append(rt.run(rt.delivery.deliver_batch())))
    sending.start()

    # When another worker looks for due logouts while the batch is still being sent
    time.sleep(2.5)
    other = make_runtime(**settings)
    taken = other.run(other.delivery.deliver_batch())
    sending.join(timeout=30)

    # Then it finds none (the first worker renewed its lease), and each logout went out once
    assert taken.claimed == 0
    assert (done[0].claimed, done[0].delivered, done[0].already) == (4, 4, 0)
    assert emu.admin.stats()["requests"][CLIENT_LOGOUT] == {"200": 4}
