"""The AuthN endpoints: a validated JSON body in, an :class:`~worker.emulator.wire.Answer` out.

Which answer for which unknown, where Pangea publishes none (see ``pangea-authn.md`` §7):

- Unknown, spent or ended tokens, codes and session ids: ``InvalidToken`` (HTTP 400, "The token
  does not exist"); expired ones: ``ExpiredToken`` (HTTP 400, "The token is no longer valid"). The
  guide confirms both bodies for ``/v2/client/token/check``; the same rule is used everywhere.
  Their HTTP code is nowhere documented: ``http_codes`` (``worker.emulator.faults``) changes it.
- A session id of another user on ``/v2/client/session/invalidate``: ``InvalidToken`` (its
  existence is not revealed).
- ``/v2/session/logout`` for a user with no live session: Success (idempotent; Pangea's own
  integration test expects Success there).
- An expired active token on ``/v2/client/session/logout``: ``ExpiredToken``, and the session lives
  on (react-auth reads that answer as "already logged out").
- ``/v2/client/token/check`` result has no ``token`` key: the spec's ``authn-token-info-nocreds``
  forbids extra properties, even though one spec example shows it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from worker.emulator import jwt, listing, store, validation, wire

#: Lifetime reported for the emulator's own service and client tokens, in seconds.
CREDENTIAL_TTL = 365 * 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """What the endpoints work on: the store, the two accepted bearer tokens, the JWKS."""

    store: store.Store
    service_token: str
    client_token: str
    jwks: dict[str, list[dict[str, str]]]
    started_at: float


Handler = Callable[[Context, dict[str, Any], float], wire.Answer]


def make_jwks() -> dict[str, list[dict[str, str]]]:
    """A fresh JWKS with one EC P-256 (ES256) verification key, shaped like Pangea's."""
    return jwt.SigningKey.generate().jwks()


def answer(
    ctx: Context, path: str, raw: bytes, now: float, *, limits: validation.ListLimits | None = None
) -> wire.Answer:
    """The answer to an authorized POST on a known API path with body ``raw``, within list ``limits``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return wire.validation_error([validation.error("BadFormat", "the body is not JSON", "")])
    errors = validation.BODIES[path](body, "")
    if not errors and limits is not None and path in validation.LIST_PATHS:
        errors = validation.list_limits(body, limits)
    if errors:
        return wire.validation_error(errors)
    try:
        return ROUTES[path](ctx, body, now)
    except store.Rejected as exc:
        return wire.failure(exc.status)
    except listing.BadCursor:
        return wire.validation_error([validation.error("BadFormat", "not a cursor from a previous page", "/last")])


def userinfo(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/userinfo: a one-time login code for the new session's tokens."""
    session = ctx.store.exchange_code(body["code"], now)
    return wire.success("Retrieved user login session", wire.creds(session, now))


def token_check(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/token/check: what a token is, if it is live."""
    secret = body["token"]
    for kind, credential in (("service", ctx.service_token), ("client", ctx.client_token)):
        if hmac.compare_digest(secret.encode(), credential.encode()):
            return wire.success("Token validated", _credential_info(ctx, kind, credential, now))
    token = ctx.store.lookup(secret, now)
    return wire.success("Token validated", wire.token_object(token, now, secret=False))


def session_refresh(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/session/refresh: spend the refresh token, mint new tokens."""
    session = ctx.store.refresh(body["refresh_token"], body.get("user_token"), now)
    return wire.success("Session refreshed", wire.creds(session, now))


def client_logout(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/session/logout: end the session of a live active token."""
    token = _user_token(ctx, body["token"], now)
    how = "client/session/logout" + ("" if token is token.session.active else " (a replaced active token)")
    ctx.store.end(token.session, how=how, now=now)
    return wire.success("Logged out the current user login session", {})


def client_session_list(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/session/list: the sessions of the user who holds the token (no ``count``)."""
    identity = _user_token(ctx, body["token"], now).session.identity
    page = listing.run(ctx.store, listing.Query.from_body(body), now, identity=identity)
    return wire.success(
        "Listed sessions", {"sessions": [wire.session_item(s, now) for s in page.sessions], "last": page.last}
    )


def client_session_invalidate(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/session/invalidate: end one session of the user who holds the token."""
    mine = _user_token(ctx, body["token"], now).session
    session = ctx.store.session(body["session_id"], now)
    if session.identity != mine.identity:
        raise store.Rejected(store.INVALID)
    ctx.store.end(session, how="client/session/invalidate", now=now)
    return wire.success("Session invalidated", {})


def jwks(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/client/jwks: the JWT verification keys."""
    return wire.success("Retrieved JWKS", ctx.jwks)


def session_list(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/session/list: one page of the project's live sessions, with the total ``count``."""
    page = listing.run(ctx.store, listing.Query.from_body(body), now)
    sessions = [wire.session_item(s, now) for s in page.sessions]
    return wire.success("Listed sessions", {"sessions": sessions, "last": page.last, "count": page.count})


def session_logout(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/session/logout: end every session of a user (Success even if there is none)."""
    ctx.store.logout_user(body["user_id"], now)
    return wire.success("Logged out all sessions of the user", {})


def session_invalidate(ctx: Context, body: dict[str, Any], now: float) -> wire.Answer:
    """/v2/session/invalidate: end one session by id."""
    ctx.store.end(ctx.store.session(body["session_id"], now), how="session/invalidate", now=now)
    return wire.success("Session invalidated", {})


def _user_token(ctx: Context, secret: str, now: float) -> store.Token:
    token = ctx.store.lookup(secret, now)
    if token.type != "user":
        raise store.Rejected(store.INVALID)
    return token


def _credential_info(ctx: Context, kind: str, credential: str, now: float) -> dict[str, Any]:
    expire = ctx.started_at + CREDENTIAL_TTL
    return {
        "id": store.stable_id("pmt_", credential),
        "type": kind,
        "life": wire.life(expire, now),
        "expire": wire.isotime(expire),
        "enabled": True,
        "identity": f"session-sync emulator {kind} token",
        "email": "",
        "scopes": [],
        "profile": {},
        "created_at": wire.isotime(ctx.started_at),
    }


#: Every API endpoint, by path. ``/v2/session/*`` takes the service token only (see ``app``).
ROUTES: dict[str, Handler] = {
    "/v2/client/userinfo": userinfo,
    "/v2/client/token/check": token_check,
    "/v2/client/session/refresh": session_refresh,
    "/v2/client/session/logout": client_logout,
    "/v2/client/session/list": client_session_list,
    "/v2/client/session/invalidate": client_session_invalidate,
    "/v2/client/jwks": jwks,
    "/v2/session/list": session_list,
    "/v2/session/logout": session_logout,
    "/v2/session/invalidate": session_invalidate,
}
