"""Framework glue over :mod:`worker.sessions`: a FastAPI dependency, an ASGI middleware, a Flask decorator.

Each is a few lines: find the credential (``Authorization: Bearer <token>`` first, else the
session cookie holding an ``lss_`` handle), call :func:`worker.sessions.authenticate`, answer
401 with its RFC 6750 ``WWW-Authenticate`` value, and hand a refreshed token back in
``X-Session-Token``. FastAPI and Flask are imported inside the functions that need them, so
importing ``worker`` (or this module) never requires either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import http.cookies
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from sqlalchemy import orm

from worker import crypto, errors, sessions

#: Cookie holding the opaque session handle (server-side style).
DEFAULT_COOKIE = "session"
#: Response header handing the new active token to a Bearer client after a worker refresh.
TOKEN_HEADER = "X-Session-Token"

_F = TypeVar("_F", bound=Callable[..., Any])
_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Guard:
    """How requests carry their credential and how it is checked; shared by every glue below."""

    db: orm.sessionmaker[orm.Session]
    cookie: str = DEFAULT_COOKIE
    realm: str = sessions.DEFAULT_REALM
    cipher: crypto.TokenCipher | None = None

    def check(self, authorization: str | None, cookie: str | None) -> sessions.Authenticated:
        """The live session for a request's ``Authorization`` header or cookie; else ``SessionInvalid``."""
        credential = bearer_token(authorization) or cookie or ""
        with self.db() as db:
            return sessions.authenticate(db, credential, cipher=self.cipher, realm=self.realm)


def fastapi_dependency(guard: Guard) -> Callable[..., sessions.Authenticated]:
    """A FastAPI dependency: ``Depends(fastapi_dependency(guard))`` gives the route the live session."""
    import fastapi

    def current_session(request: fastapi.Request, response: fastapi.Response) -> sessions.Authenticated:
        try:
            found = guard.check(request.headers.get("authorization"), request.cookies.get(guard.cookie))
        except errors.SessionInvalid as exc:
            headers = {"WWW-Authenticate": exc.www_authenticate}
            raise fastapi.HTTPException(exc.status_code, exc.description, headers=headers) from None
        if found.rotated_token:
            response.headers[TOKEN_HEADER] = found.rotated_token
        return found

    # FastAPI reads the signature; with postponed annotations it could not resolve the local import.
    current_session.__annotations__ = {
        "request": fastapi.Request,
        "response": fastapi.Response,
        "return": sessions.Authenticated,
    }
    return current_session


class SessionMiddleware:
    """Pure ASGI middleware: requests under ``protect`` need a live session (``scope["state"]["session"]``)."""

    def __init__(self, app: _ASGIApp, guard: Guard, *, protect: tuple[str, ...] = ("/",)) -> None:
        self.app, self.guard, self.protect = app, guard, protect

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith(self.protect):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        jar = http.cookies.SimpleCookie(headers.get("cookie", ""))
        cookie = jar[self.guard.cookie].value if self.guard.cookie in jar else None
        try:
            found = await asyncio.to_thread(self.guard.check, headers.get("authorization"), cookie)
        except errors.SessionInvalid as exc:
            challenge = [(b"www-authenticate", exc.www_authenticate.encode()), (b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": exc.status_code, "headers": challenge})
            return await send({"type": "http.response.body", "body": exc.description.encode()})
        scope.setdefault("state", {})["session"] = found
        token = found.rotated_token

        async def send_with_token(message: MutableMapping[str, Any]) -> None:
            if token and message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (TOKEN_HEADER.lower().encode(), token.encode())]
            await send(message)

        await self.app(scope, receive, send_with_token)


def flask_login_required(guard: Guard) -> Callable[[_F], _F]:
    """A Flask view decorator: 401 with the RFC 6750 header, else the session in ``flask.g.session``."""
    import flask

    def decorate(view: _F) -> _F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = flask.request
            try:
                found = guard.check(request.headers.get("Authorization"), request.cookies.get(guard.cookie))
            except errors.SessionInvalid as exc:
                return flask.Response(exc.description, exc.status_code, {"WWW-Authenticate": exc.www_authenticate})
            flask.g.session = found
            if (token := found.rotated_token) is not None:
                flask.after_this_request(lambda response: _with_header(response, token))
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _with_header(response: Any, token: str) -> Any:
    response.headers[TOKEN_HEADER] = token
    return response
