"""The emulator as a raw ASGI app: dispatch on path, bearer check, faults, stats, admin surface.

No framework on the hot path: one dict lookup routes a request, ``orjson`` reads and writes JSON,
and the store's indexes answer in O(1). Order of checks for an API request, as a gateway would do
them: faults → route (404 NotFound; any method but POST is unknown too) → bearer token (401
Unauthorized; the client token is refused on ``/v2/session/*``) → body (400 ValidationError) →
the endpoint. Any answer from an endpoint is counted in the stats, faulted ones included.

Admin surface (no auth; faults never apply): ``POST /emulator/login``, ``POST /emulator/seed``
(bulk sessions for benchmarks, ids from ``store.seeded``), ``POST /emulator/faults``,
``GET /emulator/faults``, ``GET /emulator/stats``, ``POST /emulator/ended`` (how and when the named
sessions ended), ``POST /emulator/reset``, ``POST|GET /emulator/config`` (the rotation rule and the
kind of active token, see ``store``). Its errors are plain ``{"error": "..."}`` bodies with HTTP 400
or 404.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson

from worker.emulator import faults, handlers, jwt, store, validation, wire

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Largest request body read, in bytes; a larger one is a ValidationError.
MAX_BODY = 1 << 20
#: What a ``Malformed`` fault answers with HTTP 200: a proxy's page, not Pangea's envelope.
MALFORMED_BODY = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"
#: What a ``NotJson`` fault answers with HTTP 200, labelled JSON: a proxy's words, not Pangea's.
NOT_JSON_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
#: How a ``Huge`` answer is sent: this many bytes per ASGI message.
HUGE_CHUNK = 1 << 20
_JSON = (b"content-type", b"application/json")


class Emulator:
    """Pangea AuthN in memory: one store, one set of faults and counters per instance."""

    def __init__(
        self,
        *,
        service_token: str,
        client_token: str,
        http_codes: Mapping[str, int] | None = None,
        rotation: str = store.ROTATIONS[0],
        active_tokens: str = store.ACTIVE_TOKENS[0],
        max_size: int | None = None,
        max_filter_ids: int | None = None,
    ) -> None:
        if not service_token or not client_token or service_token == client_token:
            raise ValueError("the service and client tokens must be two different non-empty strings")
        #: HTTP code by status, over wire.ERRORS (the setting; the ``http_codes`` fault goes over it).
        self._http_codes = faults.parse_http_codes(dict(http_codes or {}), "http_codes")
        self._codes = dict(self._http_codes)
        key = jwt.SigningKey.generate()
        self._defaults = {"rotation": rotation, "active_tokens": active_tokens}
        #: List limits (the setting; the ``max_size`` / ``max_filter_ids`` faults go over it).
        self._limits_setting = validation.ListLimits(
            faults.parse_limit(max_size, "max_size"), faults.parse_limit(max_filter_ids, "max_filter_ids")
        )
        self._limits = self._limits_setting
        self.ctx = handlers.Context(
            store=store.Store(rotation=rotation, active_tokens=active_tokens, sign=key.sign),
            service_token=service_token,
            client_token=client_token,
            jwks=key.jwks(),
            started_at=time.time(),
        )
        self.faults = faults.Faults()
        self.stats: dict[str, dict[str, int]] = {}
        #: API requests received and not yet answered, by path (a test can wait for a held one).
        self.in_flight: dict[str, int] = {}
        self._rng = random.Random()
        self._release = asyncio.Event()  # set (then replaced) on reset: frees held Timeout requests
        self._admin: dict[tuple[str, str], Callable[[bytes], tuple[int, Any]]] = {
            ("POST", "/emulator/login"): self._login,
            ("POST", "/emulator/seed"): self._seed,
            ("POST", "/emulator/faults"): self._set_faults,
            ("GET", "/emulator/faults"): lambda _: (200, self.faults.to_json()),
            ("GET", "/emulator/stats"): lambda _: (
                200,
                {
                    "requests": self.stats,
                    "in_flight": {path: n for path, n in self.in_flight.items() if n},
                    "refresh_reused": self.ctx.store.refresh_reused,
                },
            ),
            ("POST", "/emulator/reset"): self._reset,
            ("POST", "/emulator/config"): self._configure,
            ("GET", "/emulator/config"): lambda _: (200, self._config()),
            ("POST", "/emulator/ended"): self._ended,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/emulator/"):
                await self._serve_admin(scope, receive, send, path)
            else:
                await self._serve_api(scope, receive, send, path)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send, on_shutdown=lambda: self._release.set())

    # --- API -----------------------------------------------------------------------------------

    async def _serve_api(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        self.in_flight[path] = self.in_flight.get(path, 0) + 1
        try:
            await self._serve_api_request(scope, receive, send, path)
        finally:
            self.in_flight[path] -= 1

    async def _serve_api_request(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        request_time = time.time()
        raw = await _read_body(receive)
        fault = None
        if self.faults.applies_to(path):
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            fault = self.faults.draw(self._rng)
        rid = wire.request_id()
        if fault == "Malformed":
            self._count(path, 200)
            await _send(send, 200, MALFORMED_BODY, [(b"content-type", b"text/html"), (b"x-request-id", rid.encode())])
            return
        if fault == "NotJson":
            self._count(path, 200)
            await _send(send, 200, NOT_JSON_BODY, [_JSON, (b"x-request-id", rid.encode())])
            return
        if fault == "Huge":
            self._count(path, 200)
            await _send_huge(send, rid)
            return
        if fault == "Timeout":
            self._count(path, 504)
            if await self._hold(receive):
                await self._send_answer(
                    send, rid, request_time, wire.Answer(504, "InternalError", "The request timed out", None)
                )
            return
        if fault in ("InternalError", "TooManyRequests"):
            answer = wire.failure(fault)
        elif fault == "ValidationError":
            answer = wire.validation_error([{"code": "BadState", "detail": "the request was refused", "source": ""}])
        else:
            answer = self._answer(scope, path, raw, time.time())
        code = self._codes.get(answer.status)
        if code is not None:
            answer = answer._replace(http=code)
        self._count(path, answer.http)
        if fault == "Dropped":
            body = wire.envelope(rid, request_time, answer, time.time())
            headers = [_JSON, (b"content-length", str(len(body)).encode()), (b"x-request-id", rid.encode())]
            await send({"type": "http.response.start", "status": answer.http, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            return  # the server closes the connection: the client sees a truncated answer
        content_type = b"text/html; charset=utf-8" if fault == "WrongContentType" else None
        await self._send_answer(send, rid, request_time, answer, content_type=content_type)

    def _answer(self, scope: Scope, path: str, raw: bytes | None, now: float) -> wire.Answer:
        if path not in handlers.ROUTES or scope["method"] != "POST":
            return wire.failure("NotFound")
        if not self._authorized(scope, service_only=path.startswith("/v2/session/")):
            return wire.failure("Unauthorized")
        if raw is None:
            return wire.validation_error([{"code": "AboveMaxLength", "detail": "the body is too large", "source": ""}])
        try:
            return handlers.answer(self.ctx, path, raw, now, limits=self._limits)
        except Exception:  # a bug: still answer with an envelope, and say so loudly
            logger.exception("Emulator failed on %s", path)
            return wire.failure("InternalError")

    def _authorized(self, scope: Scope, *, service_only: bool) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                token = token.strip()
                if hmac.compare_digest(token, self.ctx.service_token.encode()):
                    return True
                return not service_only and hmac.compare_digest(token, self.ctx.client_token.encode())
        return False

    async def _send_answer(
        self, send: Send, rid: str, request_time: float, answer: wire.Answer, *, content_type: bytes | None = None
    ) -> None:
        body = wire.envelope(rid, request_time, answer, time.time())
        headers = [(b"content-type", content_type) if content_type else _JSON, (b"x-request-id", rid.encode())]
        if answer.status == "TooManyRequests":
            headers.append((b"retry-after", str(math.ceil(self.faults.retry_after)).encode()))
        await _send(send, answer.http, body, headers)

    async def _hold(self, receive: Receive) -> bool:
        """Hold a request until the client hangs up, a reset, or HOLD_SECONDS; whether the client is still there."""
        hung_up = asyncio.ensure_future(_wait_disconnect(receive))
        released = asyncio.ensure_future(self._release.wait())
        done, pending = await asyncio.wait(
            {hung_up, released}, timeout=faults.HOLD_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        return hung_up not in done

    def _count(self, path: str, http: int) -> None:
        codes = self.stats.setdefault(path, {})
        codes[str(http)] = codes.get(str(http), 0) + 1

    # --- admin ---------------------------------------------------------------------------------

    async def _serve_admin(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        raw = await _read_body(receive)
        route = self._admin.get((scope["method"], path))
        if route is None:
            http, payload = 404, {"error": f"no admin endpoint {scope['method']} {path}"}
        elif raw is None:
            http, payload = 400, {"error": "the body is too large"}
        else:
            http, payload = route(raw)
        await _send(send, http, orjson.dumps(payload), [_JSON])

    def _login(self, raw: bytes) -> tuple[int, Any]:
        try:
            email, active_ttl, refresh_ttl, profile = _login_fields(_json(raw))
        except ValueError as exc:
            return 400, {"error": str(exc)}
        now = time.time()
        profile = {"Login-Time": wire.isotime(now), "User-Agent": "pangea-authn-emulator"} | profile
        code = self.ctx.store.issue_code(
            email, active_ttl=active_ttl, refresh_ttl=refresh_ttl, profile=profile, now=now
        )
        return 200, {"code": code}

    def _seed(self, raw: bytes) -> tuple[int, Any]:
        try:
            body = _json(raw)
            count, start, active_ttl, refresh_ttl, key = _seed_fields(body)
            now = _seed_time(body, time.time())
            self.ctx.store.seed(count, start=start, active_ttl=active_ttl, refresh_ttl=refresh_ttl, now=now, key=key)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        return 200, {"seeded": count, "start": start, "key": key, "sessions": len(self.ctx.store.sessions)}

    def _set_faults(self, raw: bytes) -> tuple[int, Any]:
        try:
            self.faults = faults.parse(_json(raw), handlers.ROUTES)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        self._codes = self._http_codes | dict(self.faults.http_codes)
        setting = self._limits_setting
        self._limits = validation.ListLimits(
            setting.max_size if self.faults.max_size is None else self.faults.max_size,
            setting.max_filter_ids if self.faults.max_filter_ids is None else self.faults.max_filter_ids,
        )
        return 200, self.faults.to_json()

    def _config(self) -> dict[str, str]:
        return {"rotation": self.ctx.store.rotation, "active_tokens": self.ctx.store.active_tokens}

    def _configure(self, raw: bytes) -> tuple[int, Any]:
        """``{"rotation": ..., "active_tokens": ...}`` (both optional) for sessions minted from now on."""
        try:
            body = _json(raw)
            if not isinstance(body, dict) or set(body) - {"rotation", "active_tokens"}:
                raise ValueError("expected an object with rotation and/or active_tokens")
            self.ctx.store.configure(**(self._config() | body))
        except (TypeError, ValueError) as exc:
            return 400, {"error": str(exc)}
        return 200, self._config()

    def _ended(self, raw: bytes) -> tuple[int, Any]:
        """How and when the sessions named ended: ``{"session_ids": [...]}`` -> ``{id: {"how", "at"}}``."""
        body = _json(raw)
        ids = body.get("session_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return 400, {"error": "expected an object with session_ids, a list of strings"}
        ended = self.ctx.store.ended
        return 200, {i: {"how": ended[i][0], "at": wire.isotime(ended[i][1])} for i in ids if i in ended}

    def _reset(self, raw: bytes) -> tuple[int, Any]:
        self.ctx.store.configure(**self._defaults)
        self.ctx.store.reset()
        self.stats = {}
        self.faults = faults.Faults()
        self._codes = dict(self._http_codes)
        self._limits = self._limits_setting
        self._release.set()
        self._release = asyncio.Event()
        return 200, {}


def create_app(
    *,
    service_token: str,
    client_token: str,
    http_codes: Mapping[str, int] | None = None,
    rotation: str = store.ROTATIONS[0],
    active_tokens: str = store.ACTIVE_TOKENS[0],
    max_size: int | None = None,
    max_filter_ids: int | None = None,
) -> Emulator:
    """A fresh emulator (its own in-memory state) accepting these two bearer tokens.

    ``http_codes`` chooses the HTTP code of answers by status, e.g. ``{"InvalidToken": 401,
    "ExpiredToken": 401}`` for a Pangea that mirrors Unauthorized (default: ``wire.ERRORS``, 400).
    ``rotation`` (:data:`store.ROTATIONS`) and ``active_tokens`` (``opaque`` or ``jwt``) choose how
    it plays the rules Pangea does not document; ``POST /emulator/config`` changes them while it runs,
    and ``POST /emulator/reset`` puts these back.
    ``max_size`` and ``max_filter_ids`` make the session lists refuse larger requests with a
    ValidationError (default: no limit); see ``worker.emulator.faults``.
    """
    return Emulator(
        service_token=service_token,
        client_token=client_token,
        http_codes=http_codes,
        rotation=rotation,
        active_tokens=active_tokens,
        max_size=max_size,
        max_filter_ids=max_filter_ids,
    )


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ValueError("the body is not JSON") from exc


def _login_fields(body: Any) -> tuple[str, float, float, dict[str, str]]:
    if not isinstance(body, dict) or set(body) - {"email", "active_ttl", "refresh_ttl", "profile"}:
        raise ValueError("expected an object with email, active_ttl, refresh_ttl and optionally profile")
    email = body.get("email")
    if not isinstance(email, str) or not email.strip():
        raise ValueError("email must be a non-empty string")
    ttls = body.get("active_ttl", 3600), body.get("refresh_ttl", 86400)
    if not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 10 * 365 * 86400 for t in ttls):
        raise ValueError("active_ttl and refresh_ttl must be seconds, above 0 and at most ten years")
    profile = body.get("profile", {})
    if not isinstance(profile, dict) or not all(isinstance(v, str) for v in profile.values()):
        raise ValueError("profile must be an object of strings")
    return email, float(ttls[0]), float(ttls[1]), profile


#: Most sessions one ``POST /emulator/seed`` creates (seed more with several calls and ``start``).
MAX_SEED = 1_000_000


def _seed_fields(body: Any) -> tuple[int, int, float, float, str]:
    if not isinstance(body, dict) or set(body) - {"count", "start", "active_ttl", "refresh_ttl", "key", "created_at"}:
        raise ValueError("expected an object with count and optionally start, active_ttl, refresh_ttl, key, created_at")
    count, start = body.get("count"), body.get("start", 0)
    if not (isinstance(count, int) and isinstance(start, int)) or isinstance(count, bool) or isinstance(start, bool):
        raise ValueError(f"count must be an integer from 1 to {MAX_SEED}, start an integer from 0")
    if not 0 < count <= MAX_SEED or start < 0:
        raise ValueError(f"count must be an integer from 1 to {MAX_SEED}, start an integer from 0")
    ttls = body.get("active_ttl", 3600), body.get("refresh_ttl", 86400)
    if not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 10 * 365 * 86400 for t in ttls):
        raise ValueError("active_ttl and refresh_ttl must be seconds, above 0 and at most ten years")
    key = body.get("key", "bench")
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty string")
    return count, start, float(ttls[0]), float(ttls[1]), key


def _seed_time(body: dict[str, Any], now: float) -> float:
    """``created_at`` (epoch seconds, within a day of ``now``) or ``now``.

    A benchmark seeds its database with the same times, so a check that finds nothing changed
    (same expiry to the microsecond) is what it measures.
    """
    at = body.get("created_at", now)
    if not isinstance(at, int | float) or isinstance(at, bool) or not abs(at - now) <= 86400:
        raise ValueError("created_at must be epoch seconds within a day of the emulator's clock")
    return float(at)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if it is larger than MAX_BODY."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= MAX_BODY:
            chunks.append(chunk)
    return b"".join(chunks) if size <= MAX_BODY else None


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_huge(send: Send, rid: str) -> None:
    """A well-formed Success envelope of faults.HUGE_BYTES, sent a chunk at a time."""
    head = b'{"request_id":"' + rid.encode() + b'","status":"Success","summary":"","result":{"padding":"'
    tail = b'"}}'
    padding = faults.HUGE_BYTES - len(head) - len(tail)
    headers = [_JSON, (b"x-request-id", rid.encode()), (b"content-length", str(faults.HUGE_BYTES).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": head, "more_body": True})
    chunk = b"x" * HUGE_CHUNK
    while padding > 0:
        piece = chunk if padding >= HUGE_CHUNK else chunk[:padding]
        padding -= len(piece)
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": tail})


async def _lifespan(receive: Receive, send: Send, *, on_shutdown: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
