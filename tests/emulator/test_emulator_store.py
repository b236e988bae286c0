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


@pytest.mark.parametrize(
    ("rotation", "first_is_session", "kept"),
    [("session-id", True, True), ("new-refresh-id", True, False), ("distinct-session-id", False, False)],
)
def test_each_rotation_rule_names_the_session_as_it_says(rotation: str, first_is_session: bool, kept: bool) -> None:
    s = store.Store(rotation=rotation)
    session = new_session(s)
    first = session.refresh.id
    s.refresh(session.refresh.secret, None, T0 + 10)
    # The session keeps its id under every rule; the refresh token's id follows the rule
    assert s.session(session.id, T0 + 11) is session
    assert (first == session.id) is first_is_session
    assert (session.refresh.id == first) is kept


def test_jwt_active_tokens_are_signed_with_the_key_jwks_serves() -> None:
    import base64
    import json

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from worker.emulator import jwt

    key = jwt.SigningKey.generate()
    s = store.Store(active_tokens="jwt", sign=key.sign)
    token = new_session(s).active

    def part(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    header, payload, signature = token.secret.split(".")
    claims = json.loads(part(payload))
    assert json.loads(part(header)) == {"alg": "ES256", "typ": "JWT", "kid": key.kid}
    assert (claims["jti"], claims["exp"]) == (token.id, int(token.expire))
    assert 800 < len(token.secret) < 2000, "about a kilobyte, as real ones are"
    jwk = key.jwks()["keys"][0]
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(part(jwk["x"]), "big"), int.from_bytes(part(jwk["y"]), "big"), ec.SECP256R1()
    ).public_key()
    raw = part(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if forged
    # ... and the store looks it up like any secret
    assert s.lookup(token.secret, T0 + 1) is token
    with pytest.raises(ValueError, match="rotation must be one of"):
        store.Store(rotation="sometimes")
