"""Framework glue in-process, on SQLite and PostgreSQL: what the example apps' HTTP tests do not reach.

The Flask extension without Flask-SQLAlchemy (its own transactions, configured from ``app.config``
alone), and Starlette's ``AuthenticationMiddleware`` with our backend on a bare Starlette app.
"""

from __future__ import annotations

import asyncio
from typing import Any

import flask
import httpx
from starlette import applications, authentication, requests, responses, routing

from tests.conftest import RunningEmulator
from tests.helpers import KEY, active_token, login
from worker import web
from worker.web import flask as flask_glue
from worker.web import starlette as starlette_glue


def test_flask_extension_on_its_own_transactions(db_url: str, make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()  # the worker's side, to read what the app wrote
    # Given an app configured only through app.config (no Flask-SQLAlchemy), the environment empty
    app = flask.Flask(__name__)
    app.config.update(DATABASE_URL=db_url, SESSION_SYNC_ENCRYPTION_KEYS=KEY, SESSION_SYNC_REALM="flask-app")
    ext = flask_glue.SessionSync()
    ext.init_app(app)
    code = emu.admin.login("ann@example.com")

    @app.post("/login")
    def do_login() -> Any:
        creds = rt.run(rt.client.userinfo(code))
        return {"handle": ext.record_login(creds.to_userinfo()).handle}

    @app.get("/me")
    @ext.session_required
    def me() -> Any:
        assert ext.session is not None
        return {"email": ext.session.email}

    @app.post("/logout")
    @ext.session_required
    def logout() -> Any:
        assert ext.session is not None
        ext.logout(ext.session.id)
        return {"ok": True}

    client = app.test_client()
    # When Ann logs in, reaches /me with her cookie, and logs out
    assert app.extensions["session_sync"].extension is ext
    handle = client.post("/login").json["handle"]  # type: ignore[index]
    client.set_cookie("session", handle)
    mine = client.get("/me")
    assert client.post("/logout").status_code == 200
    after = client.get("/me")

    # Then each write committed on its own (the worker sees the logout queued), with the app's realm
    assert mine.json == {"email": "ann@example.com"}
    assert after.status_code == 401
    assert after.headers["WWW-Authenticate"] == (
        'Bearer realm="flask-app", error="invalid_token", error_description="The session was logged out"'
    )
    assert rt.run(rt.delivery.drain()).delivered == 1


def test_starlette_backend_with_starlettes_own_middleware(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "ann@example.com")
    token = active_token(rt, sid)
    guard = web.Guard(db=rt.sessions, cipher=rt.cipher, realm="star")

    async def public(request: requests.Request) -> responses.Response:
        return responses.PlainTextResponse(f"{request.user.is_authenticated} {request.user.display_name}")

    @authentication.requires("authenticated", status_code=401)
    async def private(request: requests.Request) -> responses.Response:
        return responses.JSONResponse({"email": request.user.display_name, "id": request.auth.session.id})

    app = applications.Starlette(
        routes=[routing.Route("/", public), routing.Route("/private", private)],
        middleware=starlette_glue.middleware(guard),
        exception_handlers=starlette_glue.exception_handlers(guard),
    )

    async def get(path: str, **headers: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get(path, headers=headers)

    # When the private route is asked with the token, with a wrong one, and with none; and the public one
    ok = asyncio.run(get("/private", authorization=f"Bearer {token}"))
    wrong = asyncio.run(get("/private", authorization="Bearer nope"))
    bare = asyncio.run(get("/private"))
    public_wrong = asyncio.run(get("/", authorization="Bearer nope"))

    # Then request.user / request.auth carry the session, refusals get the RFC 6750 challenge,
    # and a refused credential on a public page is just anonymous
    assert ok.json() == {"email": "ann@example.com", "id": sid}
    assert (wrong.status_code, wrong.headers["www-authenticate"]) == (
        401,
        'Bearer realm="star", error="invalid_token", error_description="The token is not recognized"',
    )
    assert (bare.status_code, bare.headers["www-authenticate"]) == (401, 'Bearer realm="star"')
    assert (public_wrong.status_code, public_wrong.text) == (200, "False ")
