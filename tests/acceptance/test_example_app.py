"""The example app (``examples/fastapi_app.py``) over real HTTP, in its own uvicorn process.

A user logs in through the hosted-login callback, reaches protected routes (the FastAPI dependency,
and Starlette's own AuthenticationMiddleware with ``@requires``), is killed at Pangea
and refused after the next sweep with the RFC 6750 answer; a Bearer client keeps working across
a worker refresh (the old token for the grace period, with the new one handed back) and logs out,
and the outbox delivers the logout to Pangea.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.acceptance.harness import ROOT, wait_for
from tests.conftest import RunningEmulator, free_port
from tests.helpers import active_token, env_for, row
from worker import models, runtime, wire

GRACE = 2.0


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/docs", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def app_url(db_url: str, emu: RunningEmulator, tmp_path: Any) -> Iterator[str]:
    """The example app, served by uvicorn in a subprocess, on the test's database and the emulator."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)} | env_for(
        db_url,
        emu,
        token=emu.client_token,  # the app needs only a client token
        broker=None,
        SESSION_SYNC_REFRESH_GRACE=f"{GRACE}s",
        SESSION_SYNC_REFRESH_MARGIN="10s",
    )
    argv = [sys.executable, "-m", "uvicorn", "--factory", "examples.fastapi_app:create_app", "--port", str(port)]
    log = (tmp_path / "app.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or proc.poll() is not None, timeout=30, what="example app up")
        assert proc.poll() is None, (tmp_path / "app.log").read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def session_id_of(rt: runtime.Runtime, email: str) -> int:
    with rt.sessions() as db:
        return int(db.scalars(sa.select(models.LocalSession.id).where(models.LocalSession.email == email)).one())


#: Each database and each verdict code once, not every pair (26-35 s a run): the engine's reading of
#: both codes on both databases is proven by test_engine's ``@verdict_codes`` resync, and the app
#: never sees an HTTP code of Pangea's, only the rows the worker wrote.
@pytest.mark.parametrize(
    ("db_url", "emu"),
    [("sqlite", 400), ("postgresql", 401)],
    indirect=True,
    ids=["sqlite-verdicts400", "postgresql-verdicts401"],
)
def test_example_app_end_to_end(app_url: str, make_runtime: Any, emu: RunningEmulator) -> None:
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

    # When both reach the protected route
    before = emu.admin.stats()
    mine = browser.get("/me")
    theirs = api.get("/me", headers={"Authorization": f"Bearer {old_token}"})

    # Then both are let in, also where Starlette's AuthenticationMiddleware and @requires guard the route
    assert (mine.status_code, mine.json()["email"]) == (200, "ann@example.com")
    assert (theirs.status_code, theirs.json()["email"]) == (200, "bob@example.com")
    whoami = browser.get("/whoami").json()
    assert whoami == {"user_id": row(rt, ann).user_id, "email": "ann@example.com", "id": ann}
    # ... and the app asked Pangea nothing
    assert emu.admin.stats() == before

    # When Pangea kills Ann's session and the worker sweeps, refreshing Bob's token on the way
    # (a token is refreshed in the last half of its life at the earliest: 6 s lifetime, 1.5 s left)
    time.sleep(max(0.0, bob_at + 4.5 - time.monotonic()))
    rt.run(rt.client.session_invalidate(row(rt, ann).pangea_session_id or ""))
    counts = rt.run(rt.engine.resync())
    assert (counts.revoked, counts.refreshed) == (1, 1)

    # Then Ann is refused with exactly the RFC 6750 challenge
    refused = browser.get("/me")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == (
        'Bearer realm="example", error="invalid_token", error_description="The session was revoked"'
    )
    assert browser.get("/whoami").headers["www-authenticate"] == refused.headers["www-authenticate"]
    # ... and a request with no credentials gets the bare challenge (RFC 6750 section 3.1)
    for path in ("/me", "/whoami"):
        bare = httpx.get(f"{app_url}{path}")
        assert (bare.status_code, bare.headers["www-authenticate"]) == (401, 'Bearer realm="example"'), path

    # When Bob, inside the grace period, still sends the token the worker replaced
    new_token = active_token(rt, bob)
    assert new_token != old_token
    within = api.get("/me", headers={"Authorization": f"Bearer {old_token}"})

    # Then he is let in and handed the new token, which works on its own
    assert within.status_code == 200 and within.headers["x-session-token"] == new_token
    via_starlette = api.get("/whoami", headers={"Authorization": f"Bearer {old_token}"})
    assert via_starlette.status_code == 200 and via_starlette.headers["x-session-token"] == new_token
    fresh = api.get("/me", headers={"Authorization": f"Bearer {new_token}"})
    assert fresh.status_code == 200 and "x-session-token" not in fresh.headers

    # When the grace period has passed, the old token is refused
    time.sleep(GRACE + 0.2)
    after = api.get("/me", headers={"Authorization": f"Bearer {old_token}"})
    assert after.status_code == 401
    assert after.headers["www-authenticate"] == (
        'Bearer realm="example", error="invalid_token", error_description="The token was replaced by a refresh"'
    )
    assert old_token not in after.text and new_token not in after.text

    # When Bob logs out and the outbox delivers
    assert api.post("/logout", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200
    delivered = rt.run(rt.delivery.drain())

    # Then the app refuses him, and Pangea no longer knows his token
    assert delivered.delivered == 1
    gone = api.get("/me", headers={"Authorization": f"Bearer {new_token}"})
    assert gone.status_code == 401
    assert gone.headers["www-authenticate"].endswith('error_description="The session was logged out"')
    assert rt.run(rt.client.check_token(new_token)).verdict is wire.Verdict.INVALID
    browser.close()
    api.close()
