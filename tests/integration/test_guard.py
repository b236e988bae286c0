"""The mass-revocation guard and the staleness policy, against the emulator on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import login, login_many, moved_clock, row
from worker import guard, models, operations, sessions


@pytest.mark.parametrize("revalidation", ["bulk", "per_token"])
def test_wrong_project_trips_the_guard_and_revokes_nothing(
    make_runtime: Any, emu: RunningEmulator, other_project: str, revalidation: str
) -> None:
    limits = {"SESSION_SYNC_REVALIDATION": revalidation, "SESSION_SYNC_GUARD_MIN": "20"}
    rt = make_runtime(**limits)
    ids = [login(rt, emu, f"u{i}@example.com") for i in range(30)]
    # Given a worker pointed at the wrong project, where every session answers InvalidToken
    wrong = make_runtime(PANGEA_BASE_URL=other_project, **limits)

    # When it sweeps
    counts = wrong.run(wrong.engine.resync())

    # Then it revokes nothing: the guard holds all 30, records why, and says so in status
    assert (counts.revoked, counts.held) == (0, 30)
    assert all(row(rt, i).state is models.SessionState.ACTIVE for i in ids)
    report = operations.status(rt)
    assert report["revocation_guard"]["tripped"] is True
    assert "30 of 30" in (report["revocation_guard"].get("reason") or "")
    with rt.sessions() as db:
        held = db.scalars(sa.select(models.SessionEvent.action).where(models.SessionEvent.session_id == ids[0])).all()
    assert held == ["held"]

    # When the right project later finds one session really dead, the tripped guard still holds it
    rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))
    assert rt.run(rt.engine.resync(session_ids=[ids[0]])).held == 1
    assert row(rt, ids[0]).state is models.SessionState.ACTIVE

    # Then the operator confirms: the guard clears and the dead session is revoked, the rest kept
    counts = rt.run(rt.engine.resync(confirm_revocations=True))
    assert (counts.revoked, counts.held, counts.kept) == (1, 0, 29)
    assert row(rt, ids[0]).end_reason == "invalid_token"
    assert operations.status(rt)["revocation_guard"] == {"tripped": False}


def test_a_few_revocations_pass_the_guard(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(SESSION_SYNC_GUARD_MIN="3", SESSION_SYNC_GUARD_SHARE="0.5")
    ids = [login(rt, emu, f"u{i}@example.com") for i in range(8)]
    for sid in ids[:3]:  # 3 of 8: at the minimum count, under half
        rt.run(rt.client.session_invalidate(row(rt, sid).pangea_session_id or ""))
    counts = rt.run(rt.engine.resync())
    assert (counts.revoked, counts.held) == (3, 0)


def test_guard_limits() -> None:
    limits = guard.Limits()
    assert not limits.exceeded(checked=49, would_revoke=49)  # all, but under the minimum count
    assert not limits.exceeded(checked=500, would_revoke=100)  # exactly a fifth
    assert limits.exceeded(checked=500, would_revoke=101)
    assert limits.exceeded(checked=50, would_revoke=50)


@pytest.mark.parametrize(
    ("policy", "state", "reason"), [("keep", "active", None), ("revoke", "revoked", "unverifiable")]
)
def test_staleness_policy(make_runtime: Any, emu: RunningEmulator, policy: str, state: str, reason: str | None) -> None:
    rt = make_runtime(SESSION_SYNC_STALE_POLICY=policy, SESSION_SYNC_MAX_UNVERIFIED="1h")
    fresh, stale = login(rt, emu, "fresh@example.com"), login(rt, emu, "stale@example.com")
    # Given one session Pangea last vouched for two hours ago
    with rt.sessions.begin() as db:
        db.execute(
            sa.update(models.LocalSession)
            .where(models.LocalSession.id == stale)
            .values(last_checked_at=datetime.now(UTC) - timedelta(hours=2))
        )
    # When Pangea is down during a sweep
    emu.admin.faults(error_rate=1.0, error="InternalError")
    rt.run(rt.engine.resync())
    # Then the fresh one is kept either way, and the stale one as the policy says
    assert row(rt, fresh).state is models.SessionState.ACTIVE
    assert (str(row(rt, stale).state), row(rt, stale).end_reason) == (state, reason)


def test_logouts_to_the_wrong_project_are_held_not_counted_as_delivered(
    make_runtime: Any, emu: RunningEmulator, other_project: str
) -> None:
    rt = make_runtime(SESSION_SYNC_GUARD_MIN="10")
    ids = [login(rt, emu, f"out{i}@example.com") for i in range(12)]
    with rt.sessions.begin() as db:
        for sid in ids:
            sessions.logout(db, sid, kick=False)
    # Given a worker pointed at the wrong project, where every logout answers "already logged out"
    wrong = make_runtime(PANGEA_BASE_URL=other_project, SESSION_SYNC_GUARD_MIN="10")

    # When it delivers
    counts = wrong.run(wrong.delivery.drain())

    # Then nothing counts as delivered: the guard trips and holds every logout, and says why
    assert (counts.delivered, counts.held) == (0, 12)
    guard_state = operations.status(rt)["revocation_guard"]
    assert guard_state["tripped"] is True and "12 of 12 logouts" in (guard_state.get("reason") or "")
    with rt.sessions() as db:
        states = db.scalars(sa.select(models.LogoutEvent.state)).all()
    assert set(states) == {models.OutboxState.PENDING}

    # When the operator fixes the setting and confirms, every logout reaches the right project
    operations.resync(rt, confirm_revocations=True)
    counts = rt.run(rt.delivery.drain())
    assert (counts.delivered, counts.already, counts.held) == (12, 0, 0)
    pangea_ids = [row(rt, sid).pangea_session_id for sid in ids]
    assert not rt.run(rt.client.session_list(filter={"id__in": pangea_ids})).sessions


def test_logouts_sent_again_after_their_answers_were_lost_do_not_trip_the_guard(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime(SESSION_SYNC_GUARD_MIN="10")
    ids = [login(rt, emu, f"again{i}@example.com") for i in range(12)]
    with rt.sessions.begin() as db:
        for sid in ids:
            sessions.logout(db, sid, kick=False)
    # Given Pangea performing every logout and then cutting its answer
    emu.admin.faults(error="Dropped", paths=["/v2/client/session/logout"])
    first = rt.run(rt.delivery.drain())
    emu.admin.clear_faults()
    assert (first.delivered, first.retried) == (0, 12)

    # When the retries go out: each is answered "already logged out", which is right this time
    _due_now(rt)
    again = rt.run(rt.delivery.drain())

    # Then they count as delivered (nothing is left at Pangea), and the guard never tripped
    assert (again.delivered, again.already, again.held) == (12, 12, 0)
    with rt.sessions() as db:
        assert not guard.is_tripped(db)


def test_logouts_of_a_worker_killed_mid_delivery_do_not_trip_the_guard(
    make_runtime: Any, emu: RunningEmulator, other_project: str
) -> None:
    rt = make_runtime(SESSION_SYNC_GUARD_MIN="10")
    ids = [login(rt, emu, f"killed{i}@example.com") for i in range(12)]
    with rt.sessions.begin() as db:
        for sid in ids:
            sessions.logout(db, sid, kick=False)
    # Given a worker that claimed the logouts, sent them (Pangea performed them) and died before
    # recording anything: its claim lapses
    tokens = [t for (t,) in _tokens(rt)]
    for token in tokens:
        assert rt.run(rt.client.client_logout(token)).verdict.value == "valid"
    with rt.sessions.begin() as db:
        past = datetime.now(UTC) - timedelta(seconds=1)
        db.execute(sa.update(models.LogoutEvent).values(claim_token="dead-worker", claimed_until=past))

    # When another worker delivers them again
    counts = rt.run(rt.delivery.drain())

    # Then "already logged out" is taken as the delivery it is, and the guard never tripped
    assert (counts.delivered, counts.already, counts.held) == (12, 12, 0)
    with rt.sessions() as db:
        assert not guard.is_tripped(db)

    # But the wrong project still trips it on logouts sent for the first time
    fresh = [login(rt, emu, f"fresh{i}@example.com") for i in range(12)]
    with rt.sessions.begin() as db:
        for sid in fresh:
            sessions.logout(db, sid, kick=False)
    wrong = make_runtime(PANGEA_BASE_URL=other_project, SESSION_SYNC_GUARD_MIN="10")
    held = wrong.run(wrong.delivery.drain())
    assert (held.delivered, held.held) == (0, 12)


def _due_now(rt: Any) -> None:
    with rt.sessions.begin() as db:
        db.execute(sa.update(models.LogoutEvent).values(next_attempt_at=datetime.now(UTC)))


def _tokens(rt: Any) -> list[tuple[str]]:
    """The active tokens the queued session logouts carry (decrypted, as a worker would send them)."""
    with rt.sessions() as db:
        rows = db.scalars(sa.select(models.LogoutEvent.token_enc).order_by(models.LogoutEvent.id)).all()
    return [(rt.cipher.decrypt(enc),) for enc in rows]


def test_sessions_whose_lost_refresh_we_ended_at_pangea_do_not_trip_the_guard(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION="bulk", SESSION_SYNC_GUARD_MIN="5")
    clock = moved_clock(rt)
    ids = login_many(rt, emu, [f"lost{i}@example.com" for i in range(12)], active_ttl=8)
    clock.advance(5.2)  # inside the refresh margin of an 8 s token, as the worker sees it
    # Given Pangea performing every refresh and then cutting its answer
    emu.admin.faults(error_rate=1.0, error="Dropped", paths=["/v2/client/session/refresh"])
    assert rt.run(rt.engine.resync(session_ids=ids)).revoked == 0
    emu.admin.clear_faults()

    # When the worker settles them: each refresh happened, and the tokens it minted reached nobody
    counts = rt.run(rt.engine.resync(session_ids=ids))

    # Then it ends those sessions at Pangea and revokes them here, in one batch, and the guard
    # (five at most) does not read its own clean-up as Pangea saying everyone is gone
    assert counts.reasons == {"refresh_lost": 12} and counts.held == 0
    with rt.sessions() as db:
        assert not guard.is_tripped(db)
    assert all(row(rt, sid).end_reason == "refresh_lost" for sid in ids)
