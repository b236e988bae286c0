"""Starlette (and FastAPI): an ``AuthenticationBackend`` for Starlette's own ``AuthenticationMiddleware``.

``request.user`` is a :class:`SessionUser`, ``request.auth`` a :class:`SessionCredentials` carrying the
live session, and ``@requires("authenticated", status_code=401)`` protects a route. A refused credential
leaves the request anonymous (public pages keep working); :func:`exception_handlers` turns the 401 into
the RFC 6750 answer saying why, and :class:`RotatedTokenMiddleware` hands a rotated token back::

    app = Starlette(routes=..., middleware=session_sync.middleware(guard),
                    exception_handlers=session_sync.exception_handlers(guard))

Starlette is imported only here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from starlette import authentication, requests, responses
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from worker import sessions
from worker.web import SCOPE_KEY, Guard, RequestAuth, asgi

__all__ = [
    "AUTHENTICATED",
    "RotatedTokenMiddleware",
    "SessionCredentials",
    "SessionSyncBackend",
    "SessionUser",
    "exception_handlers",
    "middleware",
]

#: The scope a live session grants (``@requires("authenticated")``).
AUTHENTICATED = "authenticated"


class SessionUser(authentication.BaseUser):
    """``request.user`` for a live session: Pangea's user id and email."""

    def __init__(self, session: sessions.Authenticated) -> None:
        self.session = session

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.session.email

    @property
    def identity(self) -> str:
        return self.session.user_id


class SessionCredentials(authentication.AuthCredentials):
    """``request.auth``: the scopes, and the live session itself."""

    def __init__(self, session: sessions.Authenticated, scopes: list[str] | None = None) -> None:
        super().__init__(scopes or [AUTHENTICATED])
        self.session = session


class SessionSyncBackend(authentication.AuthenticationBackend):
    """Authenticates each request locally (one indexed query, no Pangea call) with a :class:`worker.web.Guard`."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def authenticate(
        self, conn: requests.HTTPConnection
    ) -> tuple[authentication.AuthCredentials, authentication.BaseUser] | None:
        auth = RequestAuth(self.guard, conn.headers.get("authorization"), conn.cookies.get(self.guard.cookie))
        conn.scope[SCOPE_KEY] = auth
        if not auth.presented:
            return None
        found = await asyncio.to_thread(lambda: auth.session)
        if found is None:  # refused: anonymous here, the 401 handler says why
            return None
        return SessionCredentials(found), SessionUser(found)


class RotatedTokenMiddleware:
    """Hands the new token back in ``X-Session-Token`` when the backend accepted the one it replaced.

    Place it outside ``AuthenticationMiddleware`` (first in the ``middleware`` list).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        def token() -> str | None:
            auth = scope.get(SCOPE_KEY)
            return auth.rotated_token if isinstance(auth, RequestAuth) else None

        await self.app(scope, receive, asgi.with_token_header(send, token))


def middleware(guard: Guard) -> list[Middleware]:
    """The middleware list for ``Starlette(middleware=...)`` / ``FastAPI(middleware=...)``."""
    return [
        Middleware(RotatedTokenMiddleware),
        Middleware(AuthenticationMiddleware, backend=SessionSyncBackend(guard)),
    ]


def exception_handlers(guard: Guard) -> Mapping[Any, Any]:
    """``exception_handlers`` answering every 401 with the RFC 6750 challenge (why, when a credential was refused)."""

    async def unauthorized(request: requests.Request, exc: Exception) -> responses.Response:
        headers = dict(getattr(exc, "headers", None) or {})
        auth = request.scope.get(SCOPE_KEY)
        refusal = guard.refusal(auth.error if isinstance(auth, RequestAuth) else None)
        headers.setdefault("WWW-Authenticate", refusal.www_authenticate)
        detail = exc.detail if isinstance(exc, HTTPException) and exc.detail != "Unauthorized" else refusal.description
        return responses.PlainTextResponse(detail, 401, headers=headers)

    return {401: unauthorized}
