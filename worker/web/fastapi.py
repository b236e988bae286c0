"""FastAPI: a dependency giving a route the live session (``Depends(dependency(guard))``); FastAPI only here."""

from __future__ import annotations

from collections.abc import Callable

import fastapi

from worker import errors, sessions
from worker.web import SCOPE_KEY, TOKEN_HEADER, Guard, RequestAuth

__all__ = [
    "dependency",
]


def dependency(guard: Guard) -> Callable[..., sessions.Authenticated]:
    """A FastAPI dependency: 401 with the RFC 6750 challenge, else the live session (rotated token handed back).

    Behind ``worker.web.starlette``'s backend it reuses the backend's check instead of querying again.
    """

    def current_session(request: fastapi.Request, response: fastapi.Response) -> sessions.Authenticated:
        auth = request.scope.get(SCOPE_KEY)
        if not isinstance(auth, RequestAuth) or auth.guard is not guard:
            auth = RequestAuth(guard, request.headers.get("authorization"), request.cookies.get(guard.cookie))
        try:
            found = auth.require()
        except errors.SessionInvalid as exc:
            headers = {"WWW-Authenticate": exc.www_authenticate}
            raise fastapi.HTTPException(exc.status_code, exc.description, headers=headers) from None
        if found.rotated_token:
            response.headers[TOKEN_HEADER] = found.rotated_token
        return found

    # FastAPI reads the signature; with postponed annotations it would look the names up in this module.
    current_session.__annotations__ = {
        "request": fastapi.Request,
        "response": fastapi.Response,
        "return": sessions.Authenticated,
    }
    return current_session
