"""The example Flask app (examples/flask_app.py), driven over real HTTP, on SQLite and PostgreSQL.

The ``SessionSync`` extension on Flask-SQLAlchemy and Flask-Login: Ann logs in with the cookie, Bob
as a Bearer client; Pangea kills Ann's session and after the next sweep Flask-Login's unauthorized
handler answers with the RFC 6750 challenge; Bob keeps working across a worker refresh; his logout
rolls back with the app's own write when the request fails, and once committed the outbox delivers it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.acceptance.example_server import GRACE, app_env, require_modules, serve
from tests.conftest import RunningEmulator, free_port
from tests.helpers import active_token, row
from worker import models, runtime, wire

COOKIE = "session_sync"


@pytest.fixture
def app_url(db_url: str, emu: RunningEmulator, tmp_path: Path) -> Iterator[str]:
    """The example app, served by Flask's development server in a subprocess."""
    require_modules("flask_login", "flask_sqlalchemy")
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", "examples.flask_app:create_app", "run", "--port", str(port)]
    with serve(argv, app_env(db_url, emu, tmp_path), port, tmp_path / "app.log") as url:
        yield url


def count(rt: runtime.Runtime, statement: str) -> int:
    with rt.sessions() as s:
        return int(s.execute(sa.text(statement)).scalar_one())


def test_flask_example_end_to_end(app_url: str, make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    browser = httpx.Client(base_url=app_url)
    api = httpx.Client(base_url=app_url)

    # Given Ann logging in with a cookie session and Bob, a Bearer client, whose token is near expiry
    answer = browser.get("/callback", params={"code": emu.admin.login("ann@example.com")})
    assert answer.status_code == 200 and browser.cookies[COOKIE].startswith("lss_")
    bob_code, bob_at = emu.admin.login("bob@example.com", active_ttl=6), time.monotonic()
    old_token = api.get("/callback", params={"code": bob_code, "style": "bearer"}).json()["access_token"]
    with rt.sessions() as s:
        ids = {email: sid for email, sid in s.execute(sa.select(models.LocalSession.email, models.LocalSession.id))}
    ann, bob = ids["ann@example.com"], ids["bob@example.com"]
    bearer = {"Authorization": f"Bearer {old_token}"}

    # When both reach the views protected by Flask-Login and by the extension
    before = emu.admin.stats()
    mine, theirs = browser.get("/me"), api.get("/session", headers=bearer)

    # Then both are let in (Flask-Login found the app's user through the session), without asking Pangea
    assert mine.json() == {"email": "ann@example.com", "logouts": 0}
    assert theirs.json() == {"id": bob, "user_id": row(rt, bob).user_id, "email": "bob@example.com"}
    assert emu.admin.stats() == before

    # When Pangea kills Ann's session and the worker sweeps, refreshing Bob's token on the way
    time.sleep(max(0.0, bob_at + 4.5 - time.monotonic()))
    rt.run(rt.client.session_invalidate(row(rt, ann).pangea_session_id or ""))
    counts = rt.run(rt.engine.resync())
    assert (counts.revoked, counts.refreshed) == (1, 1)

    # Then Ann is refused with exactly the RFC 6750 challenge, and no credentials get the bare one
    revoked = 'Bearer realm="example", error="invalid_token", error_description="The session was revoked"'
    for path in ("/me", "/session"):
        refused = browser.get(path)
        assert (refused.status_code, refused.headers["www-authenticate"]) == (401, revoked), path
    bare = httpx.get(f"{app_url}/me")
    assert (bare.status_code, bare.headers["www-authenticate"]) == (401, 'Bearer realm="example"')

    # When Bob sends the replaced token within the grace period, it works and the new one comes back
    new_token = active_token(rt, bob)
    within = api.get("/me", headers=bearer)
    assert within.status_code == 200 and within.headers["x-session-token"] == new_token
    bearer = {"Authorization": f"Bearer {new_token}"}
    assert "x-session-token" not in api.get("/me", headers=bearer).headers
    time.sleep(GRACE + 0.2)
    after = api.get("/session", headers={"Authorization": f"Bearer {old_token}"})
    assert after.headers["www-authenticate"].endswith('error_description="The token was replaced by a refresh"')

    # When his logout fails before the commit, nothing is ended, queued, or written by the app
    assert api.post("/logout", params={"fail": "1"}, headers=bearer).status_code == 500
    assert api.get("/me", headers=bearer).json() == {"email": "bob@example.com", "logouts": 0}
    assert count(rt, "SELECT count(*) FROM logout_outbox") == 0

    # When he logs out for real and the outbox delivers
    assert api.post("/logout", headers=bearer).status_code == 200
    assert count(rt, "SELECT logouts FROM example_users WHERE email = 'bob@example.com'") == 1
    assert rt.run(rt.delivery.drain()).delivered == 1

    # Then the app refuses him, and Pangea no longer knows his token
    gone = api.get("/me", headers=bearer)
    assert gone.headers["www-authenticate"].endswith('error_description="The session was logged out"')
    assert rt.run(rt.client.check_token(new_token)).verdict is wire.Verdict.INVALID
    browser.close()
    api.close()
