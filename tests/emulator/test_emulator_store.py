"""The store's session rules as data in, data out (the clock is a parameter), and ``serve`` as a real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from worker import emulator
from worker.emulator import listing, store

T0 = 1_700_000_000.0


def new_session(s: store.Store, email: str = "ada@example.com", **ttl: float) -> store.Session:
    ttls = {"active_ttl": 600.0, "refresh_ttl": 3600.0} | ttl
    return s.create_session(email, profile={}, now=T0, **ttls)


def rejected(call: object) -> str:
    with pytest.raises(store.Rejected) as caught:
        call()  # type: ignore[operator]
    return caught.value.status


def test_refresh_rotates_secrets_but_keeps_the_session_id() -> None:
    # Given a session
    s = store.Store()
    session = new_session(s)
    old_refresh, old_active = session.refresh, session.active

    # When it is refreshed
    s.refresh(old_refresh.secret, None, T0 + 10)

    # Then the refresh token's id (the session id) is kept, its secret and the active token are new
    assert session.refresh.id == session.id == old_refresh.id
    assert session.refresh.secret != old_refresh.secret and session.active.id != old_active.id
    assert session.refresh.expire == T0 + 10 + 3600
    # the spent secret is unknown, the previous active token still valid, the index follows the new one
    assert rejected(lambda: s.lookup(old_refresh.secret, T0 + 10)) == store.INVALID
    assert s.lookup(old_active.secret, T0 + 10) is old_active
    assert s.by_active_id == {session.active.id: session}


def test_expired_tokens_are_remembered_for_the_grace_period_only() -> None:
    s = store.Store()
    session = new_session(s, active_ttl=60, refresh_ttl=120)
    refresh = session.refresh.secret

    assert rejected(lambda: s.lookup(refresh, T0 + 120)) == store.EXPIRED
    s.purge(T0 + 120 + store.GRACE - 1)
    assert rejected(lambda: s.lookup(refresh, T0 + 120 + store.GRACE - 1)) == store.EXPIRED

    s.purge(T0 + 120 + store.GRACE)

    assert rejected(lambda: s.lookup(refresh, T0 + 120 + store.GRACE)) == store.INVALID
    assert s.sessions == {} and s.by_secret == {} and s.by_user == {} and s.by_active_id == {}


def test_a_refreshed_session_is_not_purged_by_its_old_expiry() -> None:
    s = store.Store()
    session = new_session(s, refresh_ttl=100)
    s.refresh(session.refresh.secret, None, T0 + 90)

    s.purge(T0 + 100 + store.GRACE)

    assert s.sessions == {session.id: session}


def test_retired_active_tokens_are_pruned_after_the_grace_period() -> None:
    s = store.Store()
    session = new_session(s, active_ttl=10, refresh_ttl=10 * store.GRACE)
    first = session.active
    s.refresh(session.refresh.secret, None, T0 + 5)

    s.refresh(session.refresh.secret, None, T0 + 10 + store.GRACE)

    assert first not in session.retired and first.secret not in s.by_secret
    assert len(session.retired) == 1


def test_codes_work_once_and_expire() -> None:
    s = store.Store()
    code = s.issue_code("ada@example.com", active_ttl=60, refresh_ttl=60, profile={}, now=T0)
    late = s.issue_code("bob@example.com", active_ttl=60, refresh_ttl=60, profile={}, now=T0)

    assert s.exchange_code(code, T0 + 1).email == "ada@example.com"
    assert rejected(lambda: s.exchange_code(code, T0 + 2)) == store.INVALID
    assert s.codes[late].expire == T0 + store.CODE_TTL
    s.purge(T0 + store.CODE_TTL)
    assert rejected(lambda: s.exchange_code(late, T0 + store.CODE_TTL)) == store.INVALID


def test_refresh_refuses_another_sessions_user_token_without_spending() -> None:
    s = store.Store()
    mine, theirs = new_session(s), new_session(s, "bob@example.com")
    secret = mine.refresh.secret

    assert rejected(lambda: s.refresh(secret, theirs.active.secret, T0)) == store.INVALID
    assert s.refresh(secret, "ptu_" + "u" * 32, T0) is mine  # unknown user tokens are tolerated


def test_listing_pages_from_an_index() -> None:
    # Given many sessions
    s = store.Store()
    sessions = [
        s.create_session(f"u{i}@example.com", active_ttl=60, refresh_ttl=60, profile={}, now=T0 + i) for i in range(500)
    ]
    wanted = [x.active.id for x in sessions[::50]]

    # When a page is asked by active token ids
    first = listing.run(s, listing.Query(filter={"active_token_id__in": wanted}, size=6), T0 + 1)
    second = listing.run(s, listing.Query(filter={"active_token_id__in": wanted}, size=6, last=first.last), T0 + 1)

    # Then the ten sessions come in created order, over two pages
    assert [x.email for x in first.sessions + second.sessions] == [f"u{i}@example.com" for i in range(0, 500, 50)]
    assert (first.count, second.count, second.last) == (10, 10, "")
    # and sessions that expired are left out
    assert listing.run(s, listing.Query(filter={}, size=1000), T0 + 60.5).count == 499


def test_serve_runs_the_emulator_until_stopped() -> None:
    # Given `serve` started in its own process on a free port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"from worker.emulator import serve; serve(port={port})"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # When it is up, then it answers with its default development tokens
        deadline = time.monotonic() + 15
        while True:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v2/client/jwks",
                    json={},
                    headers={"Authorization": f"Bearer {emulator.DEFAULT_CLIENT_TOKEN}"},
                )
                break
            except httpx.ConnectError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["result"]["keys"]
    finally:
        process.terminate()
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop


def test_create_app_wants_two_distinct_tokens() -> None:
    with pytest.raises(ValueError):
        emulator.create_app(service_token=emulator.DEFAULT_SERVICE_TOKEN, client_token=emulator.DEFAULT_SERVICE_TOKEN)
    with pytest.raises(ValueError):
        emulator.create_app(service_token="", client_token=emulator.DEFAULT_CLIENT_TOKEN)
