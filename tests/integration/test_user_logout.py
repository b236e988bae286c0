"""User-wide logouts reach Pangea whatever the token, and a refusal of one endpoint never pauses the others.

A client token (``pcl_``) may not call ``/v2/session/*``; nor may a service token without that right.
Pangea answers such a call Unauthorized, which is not "our token is wrong" while ``/v2/client/*``
accepts it. Against the emulator, a real server, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import RunningEmulator
from tests.helpers import active_token, login, requests, row
from worker import guard, models, outbox, runtime, sessions, wire

pytestmark = pytest.mark.timeout(120)

USER_LOGOUT = "/v2/session/logout"
USER_LIST = "/v2/session/list"
INVALIDATE = "/v2/session/invalidate"


def verdict(emu: RunningEmulator, rt: runtime.Runtime, token: str) -> wire.Verdict:
    return rt.run(rt.client.check_token(token)).verdict


def delivery(rt: runtime.Runtime, *, service_endpoints: bool) -> outbox.Delivery:
    """Delivery as the runtime builds it, told whether the token is a service token."""
    return outbox.Delivery(
        sessions=rt.sessions,
        client=rt.delivery_client,
        cipher=rt.cipher,
        limiter=rt.limiter,
        policy=outbox.policy_from_settings(rt.settings),
        batch_size=100,
        concurrency=4,
        lease=timedelta(seconds=30),
        can_invalidate=service_endpoints,
    )


def joe_and_kim(rt: runtime.Runtime, emu: RunningEmulator) -> tuple[list[int], int, str]:
    """Joe on three devices, Kim on one; returns Joe's session ids, Kim's, and Joe's user id."""
    joe = [login(rt, emu, "joe@example.com") for _ in range(3)]
    kim = login(rt, emu, "kim@example.com")
    return joe, kim, row(rt, joe[0]).user_id


def log_out_joe_then_kim(rt: runtime.Runtime, joe_id: str, kim: int) -> None:
    with rt.sessions.begin() as db:
        sessions.logout_user(db, joe_id, kick=False)
    with rt.sessions.begin() as db:
        sessions.logout(db, kim, kick=False)


@pytest.mark.parametrize("service_endpoints", [False, True], ids=["client-token", "user-endpoint-refused"])
def test_a_user_logout_is_delivered_without_the_service_endpoint_and_pauses_nothing(
    make_runtime: Any, emu: RunningEmulator, caplog: pytest.LogCaptureFixture, service_endpoints: bool
) -> None:
    # Given a client token (or a token Pangea refuses /v2/session/logout to) and two users
    rt = make_runtime(PANGEA_AUTHN_TOKEN=emu.client_token)
    joe, kim, joe_id = joe_and_kim(rt, emu)
    tokens = [active_token(rt, i) for i in joe]
    kim_token = active_token(rt, kim)
    # When the app logs Joe out everywhere, then Kim out of her one session
    log_out_joe_then_kim(rt, joe_id, kim)
    with caplog.at_level(logging.INFO, logger="worker"):
        counts = rt.run(delivery(rt, service_endpoints=service_endpoints).drain())

    # Then one delivery run ended every session of Joe's at Pangea, and Kim's logout went in the same run
    assert (counts.delivered, counts.paused, counts.dead, counts.retried) == (2, 0, 0, 0), counts
    assert [verdict(emu, rt, t) for t in tokens] == [wire.Verdict.INVALID] * 3
    assert verdict(emu, rt, kim_token) is wire.Verdict.INVALID
    # ... without ever saying our token is wrong
    assert "refused PANGEA_AUTHN_TOKEN" not in caplog.text
    assert not [r for r in caplog.records if getattr(r, "action", "") == "outbox_paused"]
    stats = emu.admin.stats()["requests"]
    service_calls = [stats.get(path, {}) for path in (USER_LIST, USER_LOGOUT, INVALIDATE)]
    if service_endpoints:
        # Pangea refused /v2/session/* once; the fallback was said once, at WARNING, and remembered
        assert sum(calls.get("401", 0) for calls in service_calls) == 1 and sum(map(len, service_calls)) == 1
        fallbacks = [r for r in caplog.records if getattr(r, "action", "") == "outbox_user_logout_fallback"]
        assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING
    else:
        assert service_calls == [{}, {}, {}]


def test_a_lapsed_session_that_this_token_cannot_end_by_id_is_a_visible_dead_letter(
    make_runtime: Any, emu: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a token that may not call /v2/session/invalidate, and a session whose active token lapsed
    rt = make_runtime(PANGEA_AUTHN_TOKEN=emu.client_token)
    lapsed = login(rt, emu, "ann@example.com", active_ttl=1)
    fine = login(rt, emu, "bob@example.com")
    time.sleep(1.5)
    with rt.sessions.begin() as db:
        sessions.logout(db, lapsed, kick=False)
        sessions.logout(db, fine, kick=False)
    counts = rt.run(delivery(rt, service_endpoints=True).drain())

    # Then the lapsed one is a dead letter saying why, at once, and the other was delivered in the same run
    assert (counts.delivered, counts.dead, counts.paused) == (1, 1, 0), counts
    with rt.sessions() as db:
        dead = db.query(models.LogoutEvent).filter_by(session_id=lapsed).one()
    assert dead.state is models.OutboxState.DEAD
    assert "may not end a session by its id" in (dead.last_error or "")
    assert emu.admin.stats()["requests"][USER_LIST] == {"401": 1}


def test_with_a_service_token_one_call_ends_the_user_everywhere(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    joe, kim, joe_id = joe_and_kim(rt, emu)
    tokens = [active_token(rt, i) for i in joe]
    log_out_joe_then_kim(rt, joe_id, kim)
    counts = rt.run(rt.delivery.drain())
    assert (counts.delivered, counts.already, counts.paused) == (2, 0, 0), counts
    assert [verdict(emu, rt, t) for t in tokens] == [wire.Verdict.INVALID] * 3
    assert emu.admin.stats()["requests"][USER_LOGOUT] == {"200": 1}


def test_a_user_logout_at_the_wrong_project_is_not_taken_for_a_delivery(
    make_runtime: Any, emu: RunningEmulator, other_project: str
) -> None:
    # Given users logged in at our project, and a worker deployed against another one
    rt = make_runtime()
    users = [login(rt, emu, f"u{i}@example.com") for i in range(3)]
    tokens = [active_token(rt, i) for i in users]
    wrong = make_runtime(PANGEA_BASE_URL=other_project, SESSION_SYNC_GUARD_MIN="2")
    # When the app logs each of them out everywhere
    for sid in users:
        with rt.sessions.begin() as db:
            sessions.logout_user(db, row(rt, sid).user_id, kick=False)
    counts = wrong.run(wrong.delivery.drain())

    # Then "Success" from a project that knew none of their sessions is no delivery: the guard holds them
    assert (counts.delivered, counts.held) == (0, 3), counts
    assert [verdict(emu, rt, t) for t in tokens] == [wire.Verdict.VALID] * 3
    assert requests(emu, USER_LOGOUT) == 0
    with rt.sessions() as db:
        assert guard.is_tripped(db)


def test_a_login_after_a_user_logout_was_asked_for_outlives_its_late_delivery(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime()
    # Given Joe on three devices, logged out everywhere while Pangea was out of reach (queued)
    joe, kim, joe_id = joe_and_kim(rt, emu)
    pangea_ids = [row(rt, sid).pangea_session_id or "" for sid in [*joe, kim]]
    with rt.sessions.begin() as db:
        sessions.logout_user(db, joe_id, kick=False)
    # ... who logs in again on one of them before the logout reaches Pangea
    again = login(rt, emu, "joe@example.com")

    # When the logout is delivered
    counts = rt.run(rt.delivery.drain())

    # Then the three sessions it was asked for are ended at Pangea, the new login is not, nor is Kim's
    assert (counts.delivered, counts.already, counts.held) == (1, 0, 0)
    journal = emu.admin.ended([*pangea_ids, row(rt, again).pangea_session_id or ""])
    assert sorted(journal) == sorted(pangea_ids[:3])
    assert verdict(emu, rt, active_token(rt, again)) is wire.Verdict.VALID
    # ... and the worker keeps the new login: Pangea still vouches for it
    assert rt.run(rt.engine.drain()).revoked == 0
    assert row(rt, again).state is models.SessionState.ACTIVE and row(rt, kim).state is models.SessionState.ACTIVE

    # And with no login since, a user-wide logout is still the one call that ends the user everywhere
    with rt.sessions.begin() as db:
        sessions.logout_user(db, joe_id, kick=False)
    assert rt.run(rt.delivery.drain()).delivered == 1
    assert emu.admin.ended([row(rt, again).pangea_session_id or ""])[row(rt, again).pangea_session_id or ""]["how"] == (
        "session/logout"
    )
