"""A pure ASGI middleware for any ASGI app: no framework imported, nothing but the scope and two callables."""

from __future__ import annotations

import asyncio
import http.cookies
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from worker import errors
from worker.web import TOKEN_HEADER, Guard

__all__ = [
    "SessionSyncMiddleware",
    "request_credentials",
    "with_token_header",
]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


def request_credentials(scope: _Scope, cookie_name: str) -> tuple[str | None, str | None]:
    """An HTTP scope's ``Authorization`` header and the value of its ``cookie_name`` cookie."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    jar = http.cookies.SimpleCookie(headers.get("cookie", ""))
    return headers.get("authorization"), jar[cookie_name].value if cookie_name in jar else None


def with_token_header(send: _Send, token: Callable[[], str | None]) -> _Send:
    """``send``, adding ``X-Session-Token`` to the response start when ``token()`` has one by then (and no
    inner glue, e.g. the FastAPI dependency, set it already)."""
    name = TOKEN_HEADER.lower().encode()

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start" and (value := token()):
            headers = list(message.get("headers", []))
            if all(key.lower() != name for key, _ in headers):
                message["headers"] = [*headers, (name, value.encode())]
        await send(message)

    return sending


class SessionSyncMiddleware:
    """Requests under ``protect`` need a live session, found in ``scope["state"]["session"]``; others pass.

    Formerly ``worker.web.SessionMiddleware``, renamed: Starlette has a ``SessionMiddleware`` of its own.
    """

    def __init__(self, app: _ASGIApp, guard: Guard, *, protect: tuple[str, ...] = ("/",)) -> None:
        self.app, self.guard, self.protect = app, guard, protect

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith(self.protect):
            return await self.app(scope, receive, send)
        authorization, cookie = request_credentials(scope, self.guard.cookie)
        try:
            found = await asyncio.to_thread(self.guard.check, authorization, cookie)
        except errors.SessionInvalid as exc:
            challenge = [(b"www-authenticate", exc.www_authenticate.encode()), (b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": exc.status_code, "headers": challenge})
            return await send({"type": "http.response.body", "body": exc.description.encode()})
        scope.setdefault("state", {})["session"] = found
        await self.app(scope, receive, with_token_header(send, lambda: found.rotated_token))
