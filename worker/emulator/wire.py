"""Pangea's wire format, emulator side: the six-key envelope and the token and session objects.

Every API answer is ``{"request_id", "request_time", "response_time", "status", "summary",
"result"}``, exactly those keys (the official Python SDK refuses a seventh), with the request id
repeated in the ``x-request-id`` header. Token objects carry every required field of the spec's
``authn-token-info-creds`` / ``-nocreds``; profile values are strings; ``life`` is the whole seconds
left until ``expire``, at least 1.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from worker.emulator import store

#: The six keys of every Pangea response, no more, no fewer.
ENVELOPE_KEYS = ("request_id", "request_time", "response_time", "status", "summary", "result")

#: HTTP code and summary of each non-Success status the emulator answers with. The codes are defaults:
#: ``create_app(http_codes=...)`` and the ``http_codes`` fault choose others (Pangea documents few).
ERRORS: dict[str, tuple[int, str]] = {
    "ValidationError": (400, "Request failed validation"),
    "InvalidToken": (400, "The token does not exist"),
    "ExpiredToken": (400, "The token is no longer valid"),
    "Unauthorized": (401, "Not authorized to access this resource"),
    "NotFound": (404, "Not found"),
    "TooManyRequests": (429, "Too many requests"),
    "InternalError": (500, "Internal server error"),
}


class Answer(NamedTuple):
    """What an endpoint answers: HTTP code, envelope status and summary, and ``result``."""

    http: int
    status: str
    summary: str
    result: Any


def success(summary: str, result: Any) -> Answer:
    """HTTP 200, status Success."""
    return Answer(200, "Success", summary, result)


def failure(status: str, result: Any = None, *, summary: str | None = None) -> Answer:
    """A non-Success answer with its usual HTTP code and summary (``result`` null unless given)."""
    http, default = ERRORS[status]
    return Answer(http, status, summary or default, result)


def validation_error(errors: list[dict[str, str]]) -> Answer:
    """HTTP 400 ValidationError with ``result.errors``."""
    return failure("ValidationError", {"errors": errors})


def isotime(t: float) -> str:
    """Epoch seconds as ISO-8601 UTC with microseconds and ``Z``, e.g. ``2024-05-24T04:18:17.645214Z``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


#: :func:`isotime` for token and session times, which are shown again and again (request times are not cached).
token_time = functools.lru_cache(maxsize=1 << 16)(isotime)


def request_id() -> str:
    """A fresh ``prq_`` request id."""
    return store.new_id("prq_")


def envelope(rid: str, request_time: float, answer: Answer, now: float) -> bytes:
    """The response body: exactly the six envelope keys, as JSON bytes."""
    return orjson.dumps(
        {
            "request_id": rid,
            "request_time": isotime(request_time),
            "response_time": isotime(now),
            "status": answer.status,
            "summary": answer.summary,
            "result": answer.result,
        }
    )


def life(expire: float, now: float) -> int:
    """Whole seconds left until ``expire``, never below 1 (the spec's minimum)."""
    return max(1, math.ceil(expire - now))


def token_object(token: store.Token, now: float, *, secret: bool) -> dict[str, Any]:
    """``authn-token-info-creds`` (with the secret) or ``authn-token-info-nocreds`` (without)."""
    session = token.session
    expire = token.expire
    obj: dict[str, Any] = {
        "id": token.id,
        "type": token.type,
        "life": max(1, math.ceil(expire - now)),  # life(), inline: a session list makes one per session
        "expire": token_time(expire),
        "enabled": True,
        "identity": session.identity,
        "email": session.email,
        "scopes": [],
        "profile": session.profile,
        "created_at": token_time(token.created_at),
    }
    return {"token": token.secret} | obj if secret else obj


def creds(session: store.Session, now: float) -> dict[str, Any]:
    """``authn-session-info-creds``: the session's current active and refresh tokens, secrets included."""
    return {
        "active_token": token_object(session.active, now, secret=True),
        "refresh_token": token_object(session.refresh, now, secret=True),
    }


def session_item(session: store.Session, now: float) -> dict[str, Any]:
    """``authn-session-info-nocreds``: a session in a list, with its current active token (no secrets)."""
    expire = session.refresh.expire
    return {
        "id": session.id,
        "type": "session",
        "life": max(1, math.ceil(expire - now)),
        "expire": token_time(expire),
        "identity": session.identity,
        "email": session.email,
        "scopes": [],
        "profile": session.profile,
        "created_at": token_time(session.created_at),
        "active_token": token_object(session.active, now, secret=False),
    }
