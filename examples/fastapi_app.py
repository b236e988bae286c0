"""An example FastAPI app: Pangea hosted login, a protected route and logout over ``worker.sessions``.

Run it against the emulator (three shells, or ``&``)::

    session-sync emulator
    session-sync db upgrade
    PANGEA_BASE_URL=http://127.0.0.1:8900 PANGEA_AUTHN_TOKEN=pcl_sessionsyncemulatorclienttoken22 \\
        uvicorn --factory examples.fastapi_app:create_app --port 8000

then get a code as the hosted login page would hand it over, and follow the redirect::

    code=$(curl -s -XPOST localhost:8900/emulator/login -d '{"email":"ann@example.com"}' | jq -r .code)
    curl -c jar "localhost:8000/callback?code=$code" && curl -b jar localhost:8000/me

Routes: ``/callback?code=pmc_...`` (``&style=bearer`` returns the active token instead of setting
the cookie), ``/me`` (protected by the FastAPI dependency), ``/whoami`` (protected by Starlette's own
``AuthenticationMiddleware`` and ``@requires``, with ``worker.web.starlette``'s backend), ``POST /logout``.
The worker (``session-sync worker``) keeps the sessions true to Pangea and delivers the logouts this app queues.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fastapi
from fastapi import responses
from starlette import authentication

from worker import authn, sessions, web
from worker.web import fastapi as session_sync
from worker.web import starlette as starlette_glue

#: Realm in this app's ``WWW-Authenticate`` answers.
REALM = "example"


def create_app(settings: sessions.Settings | None = None) -> fastapi.FastAPI:
    """The app, configured from the environment (the same variables as the worker)."""
    settings = settings or sessions.Settings.from_env()
    maker = sessions.session_factory(sessions.create_engine(settings.database_url))
    cipher = sessions.TokenCipher.from_settings(settings)
    policy = sessions.Policy.from_settings(settings)
    client = authn.AuthnClient.from_settings(settings)  # a client token (pcl_) is enough for userinfo
    guard = web.Guard(db=maker, cipher=cipher, realm=REALM, grace=settings.refresh_grace)
    current = fastapi.Depends(session_sync.dependency(guard))  # a default, not Annotated: routes are local
    app = fastapi.FastAPI(
        title="session-sync example",
        middleware=starlette_glue.middleware(guard),  # request.user / request.auth for @requires
        exception_handlers=starlette_glue.exception_handlers(guard),  # every 401 gets the RFC 6750 challenge
    )

    def record(userinfo: dict[str, Any]) -> sessions.Login:
        with maker.begin() as s:
            return sessions.record_login(s, userinfo, cipher=cipher, policy=policy)

    @app.get("/callback")
    async def callback(request: fastapi.Request, code: str, style: str = "cookie") -> responses.JSONResponse:
        """Where Pangea's hosted login redirects: exchange the code, record the login."""
        try:
            creds = await client.userinfo(code)
        except sessions.AuthnRequestRejected:
            raise fastapi.HTTPException(400, "the login code is not valid") from None
        except sessions.AuthnError:
            raise fastapi.HTTPException(502, "Pangea AuthN did not answer") from None
        login = await asyncio.to_thread(record, creds.to_userinfo())
        body: dict[str, Any] = {"user_id": login.user_id, "email": login.email}
        if style == "bearer":  # the guide's style: the browser keeps Pangea's active token
            return responses.JSONResponse(body | {"access_token": creds.active_token.token, "token_type": "Bearer"})
        answer = responses.JSONResponse(body)  # server-side style: only an opaque handle leaves the server
        secure = request.url.scheme == "https"  # always, behind a TLS-terminating proxy that says so
        answer.set_cookie(guard.cookie, login.handle, httponly=True, samesite="lax", secure=secure)
        return answer

    @app.get("/me")
    def me(session: sessions.Authenticated = current) -> dict[str, Any]:
        """A protected route."""
        checked = session.last_checked_at.isoformat() if session.last_checked_at else None
        return {"user_id": session.user_id, "email": session.email, "last_checked_at": checked}

    @app.get("/whoami")
    @authentication.requires(starlette_glue.AUTHENTICATED, status_code=401)
    def whoami(request: fastapi.Request) -> dict[str, Any]:
        """A route protected by Starlette's own authentication: ``request.user`` and ``request.auth``."""
        return {"user_id": request.user.identity, "email": request.user.display_name, "id": request.auth.session.id}

    @app.post("/logout")
    def logout(session: sessions.Authenticated = current) -> responses.JSONResponse:
        """End the local session; the worker's outbox logs it out at Pangea."""
        with maker.begin() as s:
            sessions.logout(s, session.id)
        answer = responses.JSONResponse({"logged_out": True})
        answer.delete_cookie(guard.cookie)
        return answer

    return app
