"""The example Django project (examples/django_project), driven over real HTTP, on SQLite and PostgreSQL.

Ann logs in through the hosted-login callback (cookie) and Bob as a Bearer client; both reach the
protected views (decorator, mixin, Django REST framework). Pangea kills Ann's session: after the next
sweep she is refused with the RFC 6750 answer. Bob keeps working across a worker refresh (the old
token for the grace period, the new one handed back). His logout fails once inside its
``transaction.atomic()``: nothing is ended, noted or queued; then it commits, and the outbox delivers
it to Pangea. A second test reads the rows the Django path wrote against the README's database contract.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.acceptance.example_server import GRACE, app_env, require_modules, serve
from tests.acceptance.harness import ROOT
from tests.conftest import RunningEmulator, free_port
from tests.helpers import KEY, active_token, row
from worker import crypto, db, models, runtime, wire

SETTINGS = "examples.django_project.settings"


@pytest.fixture
def app_url(db_url: str, emu: RunningEmulator, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """The example project: migrated (its own tables), then served by Django's runserver, kicking through Redis."""
    require_modules("django", "rest_framework")
    port = free_port()
    env = app_env(db_url, emu, tmp_path, DJANGO_SETTINGS_MODULE=SETTINGS, CELERY_BROKER_URL=redis_url)
    subprocess.run([sys.executable, "-m", "django", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    argv = [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}", "--noreload", "--skip-checks"]
    with serve(argv, env, port, tmp_path / "app.log") as url:
        yield url


def kicks(redis_url: str) -> int:
    """Delivery kicks waiting in the broker: Celery messages in any queue (each a Redis list)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(int(client.llen(key)) for key in client.scan_iter() if client.type(key) == b"list")
    finally:
        client.close()


def session_id_of(rt: runtime.Runtime, email: str) -> int:
    with rt.sessions() as s:
        return int(s.scalars(sa.select(models.LocalSession.id).where(models.LocalSession.email == email)).one())


def count(rt: runtime.Runtime, table: str, where: str = "1 = 1") -> int:
    with rt.sessions() as s:
        return int(s.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {where}")).scalar_one())


def test_django_example_end_to_end(app_url: str, make_runtime: Any, emu: RunningEmulator, redis_url: str) -> None:
    rt = make_runtime()  # the worker's side, on the same database and keys
    browser = httpx.Client(base_url=app_url)
    api = httpx.Client(base_url=app_url)

    # Given Ann logging in with a cookie session and Bob, a Bearer client, whose token is near expiry
    answer = browser.get("/callback", params={"code": emu.admin.login("ann@example.com")})
    assert answer.status_code == 200 and answer.json()["email"] == "ann@example.com"
    handle = browser.cookies["session"]
    assert handle.startswith("lss_") and len(handle) == 36
    bob_code, bob_at = emu.admin.login("bob@example.com", active_ttl=6), time.monotonic()
    answer = api.get("/callback", params={"code": bob_code, "style": "bearer"})
    old_token = answer.json()["access_token"]
    assert "set-cookie" not in answer.headers
    ann, bob = session_id_of(rt, "ann@example.com"), session_id_of(rt, "bob@example.com")
    bearer = {"Authorization": f"Bearer {old_token}"}

    # When both reach the protected views: decorator, mixin (the app's own profile row) and DRF
    before = emu.admin.stats()
    mine, profile = browser.get("/me"), browser.get("/profile")
    theirs, drf = api.get("/me", headers=bearer), api.get("/api/me", headers=bearer)

    # Then all are let in, the login wrote the app's profile too, and the app asked Pangea nothing
    assert (mine.status_code, mine.json()["email"]) == (200, "ann@example.com")
    assert profile.json() == {"email": "ann@example.com", "logins": 1}
    assert (theirs.status_code, theirs.json()["email"]) == (200, "bob@example.com")
    assert drf.json() == {"user_id": row(rt, bob).user_id, "email": "bob@example.com"}
    assert emu.admin.stats() == before

    # When Pangea kills Ann's session and the worker sweeps, refreshing Bob's token on the way
    time.sleep(max(0.0, bob_at + 4.5 - time.monotonic()))
    rt.run(rt.client.session_invalidate(row(rt, ann).pangea_session_id or ""))
    counts = rt.run(rt.engine.resync())
    assert (counts.revoked, counts.refreshed) == (1, 1)

    # Then Ann is refused with exactly the RFC 6750 challenge, by the decorator, the mixin and DRF
    revoked = 'Bearer realm="example", error="invalid_token", error_description="The session was revoked"'
    for path in ("/me", "/profile", "/api/me"):
        refused = browser.get(path)
        assert (refused.status_code, refused.headers["www-authenticate"]) == (401, revoked), path
    # ... and a request with no credentials gets the bare challenge (RFC 6750 section 3.1)
    for path in ("/me", "/api/me"):
        bare = httpx.get(f"{app_url}{path}")
        assert (bare.status_code, bare.headers["www-authenticate"]) == (401, 'Bearer realm="example"'), path

    # When Bob, inside the grace period, still sends the token the worker replaced
    new_token = active_token(rt, bob)
    assert new_token != old_token
    within, within_drf = api.get("/me", headers=bearer), api.get("/api/me", headers=bearer)

    # Then he is let in and handed the new token, which works on its own
    assert within.status_code == 200 and within.headers["x-session-token"] == new_token
    assert within_drf.status_code == 200 and within_drf.headers["x-session-token"] == new_token
    bearer = {"Authorization": f"Bearer {new_token}"}
    fresh = api.get("/me", headers=bearer)
    assert fresh.status_code == 200 and "x-session-token" not in fresh.headers

    # When the grace period has passed, the old token is refused
    time.sleep(GRACE + 0.2)
    after = api.get("/me", headers={"Authorization": f"Bearer {old_token}"})
    assert after.status_code == 401
    assert after.headers["www-authenticate"].endswith('error_description="The token was replaced by a refresh"')

    # When Bob's logout fails after ending the session, inside its transaction.atomic()
    failed = api.post("/logout", params={"fail": "1"}, headers=bearer)

    # Then everything rolled back: he is still in, nothing is queued or kicked, the app noted nothing
    assert failed.status_code == 500
    assert api.get("/me", headers=bearer).status_code == 200
    assert count(rt, "logout_outbox") == 0
    assert count(rt, "django_project_logoutnote") == 0
    assert kicks(redis_url) == 0

    # When he logs out for real and the outbox delivers
    assert api.post("/logout", headers=bearer).status_code == 200
    assert count(rt, "logout_outbox", "state = 'pending'") == 1
    assert count(rt, "django_project_logoutnote") == 1
    assert kicks(redis_url) == 1  # sent on commit, so the worker delivers it at once
    delivered = rt.run(rt.delivery.drain())

    # Then the app refuses him, and Pangea no longer knows his token
    assert delivered.delivered == 1
    gone = api.get("/me", headers=bearer)
    assert gone.status_code == 401
    assert gone.headers["www-authenticate"].endswith('error_description="The session was logged out"')
    assert rt.run(rt.client.check_token(new_token)).verdict is wire.Verdict.INVALID
    browser.close()
    api.close()


def test_django_path_writes_the_database_contract(app_url: str, db_url: str, emu: RunningEmulator) -> None:
    cipher = crypto.TokenCipher(crypto.parse_keys(KEY))
    engine = db.create_engine(db_url)
    client = httpx.Client(base_url=app_url)

    # When Ann logs in (Bearer style, so the test holds the token) through the Django project
    login = client.get("/callback", params={"code": emu.admin.login("ann@example.com"), "style": "bearer"})
    token = login.json()["access_token"]
    with engine.connect() as conn:
        written = conn.execute(sa.text("SELECT * FROM sessions")).mappings().one()

    # Then the row is the README's contract: found by keyed hash, encrypted at rest, active, due for a check
    assert written["active_token_hash"] == cipher.lookup_hash(token)
    assert cipher.decrypt(written["active_token_enc"]) == token
    assert written["refresh_token_enc"] is not None and token not in str(dict(written))
    assert written["handle_hash"] is not None and written["state"] == "active"
    assert written["user_id"] == login.json()["user_id"] and written["email"] == "ann@example.com"
    assert str(written["pangea_session_id"]).startswith("pmt_") and str(written["active_token_id"]).startswith("pmt_")
    assert written["bucket"] is not None and written["end_reason"] is None and written["ended_at"] is None

    # When she logs out through the Django project
    assert client.post("/logout", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    with engine.connect() as conn:
        ended = conn.execute(sa.text("SELECT * FROM sessions")).mappings().one()
        queued = conn.execute(sa.text("SELECT * FROM logout_outbox")).mappings().one()
        trail = conn.execute(sa.text("SELECT * FROM session_events")).mappings().all()

    # Then the session ended as the contract says, with one outbox row and one audit row
    assert (ended["state"], ended["end_reason"]) == ("logged_out", "user_logout")
    assert ended["ended_at"] is not None and ended["refresh_token_enc"] is None
    assert ended["claimed_until"] is None and ended["claim_token"] is None
    assert ended["version"] == written["version"] + 1
    assert (queued["kind"], queued["state"], queued["session_id"]) == ("session", "pending", written["id"])
    assert queued["user_id"] == written["user_id"] and queued["token_enc"] == written["active_token_enc"]
    assert queued["next_attempt_at"] is not None
    events = [(e["session_id"], e["action"], e["reason"]) for e in trail]
    assert events == [(written["id"], "logged_out", "user_logout")]

    # When Bob, logged in twice, logs out everywhere
    codes = [emu.admin.login("bob@example.com") for _ in range(2)]
    tokens = [client.get("/callback", params={"code": c, "style": "bearer"}).json()["access_token"] for c in codes]
    everywhere = client.post("/logout/everywhere", headers={"Authorization": f"Bearer {tokens[0]}"})
    with engine.connect() as conn:
        bobs = conn.execute(sa.text("SELECT * FROM sessions WHERE email = 'bob@example.com'")).mappings().all()
        user_event = conn.execute(sa.text("SELECT * FROM logout_outbox WHERE kind = 'user'")).mappings().one()

    # Then both sessions ended, and one user logout is queued, without a token
    assert sorted(everywhere.json()["logged_out"]) == sorted(b["id"] for b in bobs)
    assert {(b["state"], b["end_reason"]) for b in bobs} == {("logged_out", "user_logout")}
    assert (user_event["user_id"], user_event["session_id"]) == (bobs[0]["user_id"], None)
    assert user_event["token_enc"] is None and user_event["state"] == "pending"
    engine.dispose()
    client.close()
