"""AuthnClient: httpx in, typed outcomes out.

Pangea's *answers* about a token (Success, InvalidToken, ExpiredToken) come back as values from
``worker.wire``; *failures to get an answer* are raised from ``worker.errors``. Only values can
revoke a session: design invariant 1, expressed in the types.

Retries: transient failures (timeouts, connection errors, 5xx, 429 with a short Retry-After) are
retried with exponential backoff and full jitter. Requests that change state at Pangea and are not
safe to repeat (code exchange, refresh: refresh tokens are one-time use) are retried only when the
request surely never reached Pangea; otherwise the failure is ``AuthnOutcomeUnknown``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import orjson
import tenacity

import worker
from worker import errors, list_limits, metrics, wire
from worker.settings import Settings
from worker.transport import PooledTransport

logger = logging.getLogger(__name__)

#: Our User-Agent, so Pangea (and the emulator's logs) can tell us apart from the SDKs.
USER_AGENT = f"pangea-session-sync/{worker.__version__} httpx/{httpx.__version__}"
#: Longest Retry-After we wait for inside one call; longer ones are raised for the caller to schedule.
DEFAULT_MAX_RETRY_AFTER = 5.0
#: First backoff step in seconds; later steps double, each drawn uniformly from [0, step] (full jitter).
DEFAULT_BACKOFF = 0.25
#: Cap on one backoff step in seconds.
DEFAULT_BACKOFF_CAP = 4.0

#: Largest answer body read, in bytes: a page of a thousand sessions is well under a megabyte, so
#: anything past this is not Pangea's answer and is not held in memory (AuthnProtocolError).
MAX_RESPONSE_BYTES = 8 << 20

#: Errors raised before any byte of the request left: always safe to retry.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class AuthnClient:
    """One pooled async client to Pangea AuthN per process.

    Parameters
    ----------
    base_url:
        ``https://authn.<domain>`` or the emulator's address.
    token:
        The AuthN service token (``pts_``) or a client token (``pcl_``, ``/v2/client/*`` only).
    transport:
        An httpx transport, for tests that must not open sockets (ours use a real emulator).
    bulk_chunk:
        Most ids (and page size) per session-list request; None learns Pangea's limit.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        retries: int = 3,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: float = DEFAULT_BACKOFF,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        bulk_chunk: int | None = None,
    ) -> None:
        self._retries = retries
        # What /v2/session/list accepts, learned by this process (worker.list_limits).
        self._limits = list_limits.Limits.for_endpoint("/v2/session/list", chunk=bulk_chunk)
        self._backoff = backoff
        self._max_retry_after = max_retry_after
        self._timeout = timeout
        # Requests go straight to an httpx transport. Not httpx's single pool: its bookkeeping costs
        # O(connections²) per request (worker.transport). Not through httpx.AsyncClient either: its
        # layers (URL merging, auth flow, redirects, cookie jar) cost a quarter of our CPU per call
        # and do nothing for Pangea's API (docs/benchmarks.md).
        self._transport = transport or PooledTransport(max_connections=max_connections)
        self._base_url = base_url.rstrip("/")
        self._urls: dict[str, httpx.URL] = {}
        self._headers = [
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("User-Agent", USER_AGENT),
        ]
        self._timeouts = httpx.Timeout(timeout, connect=min(timeout, 5.0)).as_dict()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> AuthnClient:
        """A client configured from settings (base URL, token, timeout, retries, concurrency)."""
        options: dict[str, Any] = {
            "base_url": settings.authn_base_url,
            "token": settings.authn_token,
            "timeout": settings.http_timeout,
            "retries": settings.http_retries,
            "max_connections": max(settings.concurrency, 10),
            "bulk_chunk": settings.bulk_chunk,
        }
        options.update(overrides)
        return cls(**options)

    async def __aenter__(self) -> AuthnClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._transport.aclose()

    # --- endpoints ---------------------------------------------------------------------------

    async def userinfo(self, code: str) -> wire.SessionCreds:
        """POST /v2/client/userinfo: exchange a one-time login code for the session's tokens."""
        env = await self._call("/v2/client/userinfo", {"code": code}, idempotent=False)
        return wire.SessionCreds.from_wire(self._expect_success(env, "/v2/client/userinfo"), request_id=env.request_id)

    async def check_token(self, token: str) -> wire.TokenCheck:
        """POST /v2/client/token/check: Pangea's verdict on an active token."""
        path = "/v2/client/token/check"
        env = await self._call(path, {"token": token})
        verdict = self._verdict(env, path)
        if verdict is not wire.Verdict.VALID:
            return wire.TokenCheck(verdict=verdict, request_id=env.request_id)
        info = wire.TokenInfo.from_wire(env.result, where="result")
        return wire.TokenCheck(verdict=verdict, request_id=env.request_id, info=info)

    async def refresh(self, refresh_token: str, *, user_token: str | None = None) -> wire.Refresh:
        """POST /v2/client/session/refresh: rotate the tokens. The old refresh token is spent.

        One attempt, never repeated inside the call, not even after a 429: the caller holds the
        session for a bounded time (worker.engine), and a retry here would outlast that hold. A lost
        answer raises AuthnOutcomeUnknown. The read timeout is three times the usual one, so a slow
        answer is not abandoned early.
        """
        path = "/v2/client/session/refresh"
        body: dict[str, Any] = {"refresh_token": refresh_token}
        if user_token is not None:
            body["user_token"] = user_token
        env = await self._call(path, body, idempotent=False, timeout=self._timeout * 3, retry=False)
        verdict = self._verdict(env, path)
        if verdict is not wire.Verdict.VALID:
            return wire.Refresh(verdict=verdict, request_id=env.request_id)
        creds = wire.SessionCreds.from_wire(env.result, request_id=env.request_id)
        return wire.Refresh(verdict=verdict, request_id=env.request_id, creds=creds)

    async def client_logout(self, token: str) -> wire.Ended:
        """POST /v2/client/session/logout: end the session of an active token (idempotent in effect)."""
        path = "/v2/client/session/logout"
        env = await self._call(path, {"token": token})
        return wire.Ended(verdict=self._verdict(env, path), request_id=env.request_id)

    async def client_session_list(
        self, token: str, *, filter: Mapping[str, Any] | None = None, **paging: Any
    ) -> wire.SessionPage:
        """POST /v2/client/session/list: the sessions of the user who holds ``token``."""
        path = "/v2/client/session/list"
        env = await self._call(path, _list_body(filter, paging) | {"token": token})
        return wire.SessionPage.from_wire(self._expect_success(env, path), request_id=env.request_id)

    async def client_session_invalidate(self, token: str, session_id: str) -> wire.Ended:
        """POST /v2/client/session/invalidate: end one session of the user who holds ``token``."""
        path = "/v2/client/session/invalidate"
        env = await self._call(path, {"token": token, "session_id": session_id})
        return wire.Ended(verdict=self._verdict(env, path), request_id=env.request_id)

    async def session_list(self, *, filter: Mapping[str, Any] | None = None, **paging: Any) -> wire.SessionPage:
        """POST /v2/session/list (service token): one page of the project's sessions.

        ``paging`` takes ``size``, ``last``, ``order`` and ``order_by`` as Pangea names them.
        """
        path = "/v2/session/list"
        env = await self._call(path, _list_body(filter, paging))
        return wire.SessionPage.from_wire(self._expect_success(env, path), request_id=env.request_id)

    async def sessions_by_active_token_ids(
        self, token_ids: Sequence[str], *, pace: Callable[[], Awaitable[None]] | None = None
    ) -> list_limits.Listed:
        """Live sessions whose current active token id is in ``token_ids``, by that id (all pages).

        As many requests as Pangea's limits need (worker.list_limits): what it refuses as too large
        is split, and ids it will not list even alone come back in ``unlisted``. ``pace`` is awaited
        before each request (the shared rate limit).
        """

        path = "/v2/session/list"

        async def fetch(chunk: list[str], size: int, last: str | None) -> wire.ListedPage:
            if pace is not None:
                await pace()
            body = _list_body({"active_token_id__in": chunk}, {"size": size, "last": last})
            env = await self._call(path, body, decode=wire.decode_listed_page)
            result = self._expect_success(env, path)
            if isinstance(result, wire.ListedPage):  # decoded already
                return result
            return wire.ListedPage.from_wire(result, request_id=env.request_id)

        return await list_limits.list_by_ids(token_ids, fetch=fetch, limits=self._limits)

    async def session_of(
        self, user_id: str | None, *, session_id: str | None = None, active_token_id: str | None = None
    ) -> wire.SessionItem | None:
        """The live session with this id (or carrying this active token), of this user if one is named.

        One ``/v2/session/list`` request for at most one result: how the worker confirms an id before
        ending a session by it. None when Pangea lists no such session.
        """
        where: dict[str, str] = {}
        if session_id is not None:
            where["id"] = session_id
        if active_token_id is not None:
            where["active_token_id"] = active_token_id
        if user_id is not None:
            where["identity"] = user_id
        page = await self.session_list(filter=where, size=1)
        return page.sessions[0] if page.sessions else None

    async def sessions_of_user(
        self, user_id: str, *, pace: Callable[[], Awaitable[None]] | None = None
    ) -> wire.SessionPage:
        """Every live session of one user: all pages of ``/v2/session/list`` as one (the last one's request id).

        ``pace`` is awaited before each page after the first (the shared rate limit).
        """
        sessions: list[wire.SessionItem] = []
        last: str | None = None
        while True:
            page = await self.session_list(filter={"identity": user_id}, last=last)
            sessions.extend(page.sessions)
            if not page.last or not page.sessions:
                return dataclasses.replace(page, sessions=tuple(sessions), last="")
            last = page.last
            if pace is not None:
                await pace()

    async def session_logout(self, user_id: str) -> wire.Ended:
        """POST /v2/session/logout (service token): end every session of a user."""
        path = "/v2/session/logout"
        env = await self._call(path, {"user_id": user_id})
        return wire.Ended(verdict=self._verdict(env, path), request_id=env.request_id)

    async def session_invalidate(self, session_id: str) -> wire.Ended:
        """POST /v2/session/invalidate (service token): end one session by its ``pmt_`` id."""
        path = "/v2/session/invalidate"
        env = await self._call(path, {"session_id": session_id})
        return wire.Ended(verdict=self._verdict(env, path), request_id=env.request_id)

    async def jwks(self) -> list[dict[str, Any]]:
        """POST /v2/client/jwks: the keys that sign JWT active tokens."""
        path = "/v2/client/jwks"
        env = await self._call(path, {})
        result = self._expect_success(env, path)
        keys = result.get("keys") if isinstance(result, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise errors.AuthnProtocolError(f"{path}: result.keys is not a list of objects", path=path)
        return keys

    # --- the wire ----------------------------------------------------------------------------

    async def _call(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        idempotent: bool = True,
        timeout: float | None = None,
        retry: bool = True,
        decode: wire.Decode | None = None,
    ) -> wire.Envelope:
        """POST once or more (per the retry policy; once only without ``retry``) and return the envelope.

        ``decode`` reads an HTTP 200 answer of the shape the endpoint expects straight into its result
        (:func:`worker.wire.decode_listed_page`); anything it does not take is parsed the general way.
        """
        retried_ids: list[str] = []
        try:
            # The first attempt runs outside tenacity: nearly every call succeeds at once, and a
            # retry loop built per call cost more CPU than the rest of our side of it.
            return await self._post_once(path, body, retried_ids, idempotent=idempotent, timeout=timeout, decode=decode)
        except errors.AuthnError as exc:
            if (
                not retry
                or not self._retries
                or not _should_retry(exc, idempotent=idempotent, max_retry_after=self._max_retry_after)
            ):
                raise
            await asyncio.sleep(self._delay(exc, attempt=1))
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._retries),
            wait=self._wait,
            retry=tenacity.retry_if_exception(
                lambda exc: _should_retry(exc, idempotent=idempotent, max_retry_after=self._max_retry_after)
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._post_once(
                    path, body, retried_ids, idempotent=idempotent, timeout=timeout, decode=decode
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_once(
        self,
        path: str,
        body: Mapping[str, Any],
        retried_ids: list[str],
        *,
        idempotent: bool,
        timeout: float | None,
        decode: wire.Decode | None = None,
    ) -> wire.Envelope:
        headers = self._headers
        if retried_ids:
            headers = [*headers, ("X-Pangea-Retried-Request-Ids", ",".join(retried_ids))]
        started, status = time.perf_counter(), "error"  # "error": no HTTP response at all
        try:
            response, content = await self._post(path, orjson.dumps(body), headers, timeout)
            status = str(response.status_code)
        except _NOT_SENT as exc:
            raise errors.AuthnUnreachable(f"{path}: {type(exc).__name__}", path=path) from exc
        except httpx.HTTPError as exc:
            # Sent, perhaps performed, answer lost: a timeout, a reset, a cut-off body.
            cls = errors.AuthnUnavailable if idempotent else errors.AuthnOutcomeUnknown
            raise cls(f"{path}: {type(exc).__name__} after sending", path=path) from exc
        finally:
            metrics.observe_pangea(path, status, time.perf_counter() - started)
        header_id = response.headers.get("x-request-id")
        if header_id:
            retried_ids.append(header_id)
        return _classify(response, content, path, header_id, idempotent=idempotent, decode=decode)

    async def _post(
        self, path: str, content: bytes, headers: list[tuple[str, str]], timeout: float | None
    ) -> tuple[httpx.Response, bytes | None]:
        """POST on the transport and read the answer: its body, or None past MAX_RESPONSE_BYTES.

        httpx's own errors are raised. An oversized body is abandoned with its connection.
        """
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base_url + path)
        timeouts = self._timeouts if timeout is None else httpx.Timeout(timeout).as_dict()
        request = httpx.Request("POST", url, headers=headers, content=content, extensions={"timeout": timeouts})
        response = await self._transport.handle_async_request(request)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    return response, None
                chunks.append(chunk)
        finally:
            await response.aclose()
        return response, b"".join(chunks)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        # tenacity counts from the second attempt overall (the first ran before it, in _call).
        exc = state.outcome.exception() if state.outcome else None
        return self._delay(exc, attempt=state.attempt_number + 1)

    def _delay(self, exc: BaseException | None, *, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``: Retry-After, else full-jitter backoff."""
        if isinstance(exc, errors.AuthnRateLimited) and exc.retry_after is not None:
            return exc.retry_after
        step = min(self._backoff * 2 ** (attempt - 1), DEFAULT_BACKOFF_CAP)
        return random.uniform(0, step)

    @staticmethod
    def _verdict(env: wire.Envelope, path: str) -> wire.Verdict:
        """The verdict an envelope carries; a refusal of the request is raised (never a verdict)."""
        verdict = wire.VERDICTS.get(wire.STATUS_OUTCOMES[env.status])
        if verdict is None:
            raise _refused(env, path)
        return verdict

    @staticmethod
    def _expect_success(env: wire.Envelope, path: str) -> Any:
        if env.status != "Success":
            raise _refused(env, path)
        return env.result


def _refused(env: wire.Envelope, path: str) -> errors.AuthnRequestRejected:
    """The error for an answer that is Pangea's but not the one the endpoint needs (``status`` names it).

    A ValidationError, or any answer listing ``result.errors``, speaks of the request's shape.
    """
    message = f"{path}: Pangea answered {env.status}"
    sources = wire.refusal_sources(env.result)
    if env.status == "ValidationError" or sources is not None:
        return errors.AuthnRequestInvalid(
            message, path=path, request_id=env.request_id, status=env.status, sources=sources or ()
        )
    return errors.AuthnRequestRejected(message, path=path, request_id=env.request_id, status=env.status)


def _classify(
    response: httpx.Response,
    content: bytes | None,
    path: str,
    header_id: str | None,
    *,
    idempotent: bool,
    decode: wire.Decode | None = None,
) -> wire.Envelope:
    """The envelope of an answer Pangea gave for itself; every failure to get one raised by class.

    Pangea's envelope decides, whatever the HTTP code (``wire.outcome_of`` holds the table). A body
    that is too large, or not labelled JSON, is not Pangea's answer whatever it holds: a proxy's
    page, or Pangea's words relabelled by something we cannot trust. Then only the HTTP code
    speaks, and it never gives a verdict (a refresh behind it stays ``uncertain``: worker.engine).
    Returns envelopes whose outcome is a verdict or a refusal; the endpoint reads them.
    """
    code = response.status_code
    env: wire.Envelope | None = None
    problem = ""
    if content is None:
        problem = f"{path}: answer larger than {MAX_RESPONSE_BYTES} bytes"
    else:
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            problem = f"{path}: answer labelled {media_type or 'nothing'!r}, not application/json"
        else:
            if decode is not None and code == 200:
                env = decode(content)  # the expected Success, read in one pass; else None
            try:
                env = env or wire.parse_envelope(content, path=path, header_request_id=header_id)
            except errors.AuthnProtocolError as exc:
                problem = str(exc)
    outcome = wire.outcome_of(code, env.status if env else None)
    request_id = env.request_id if env else header_id
    # Messages name what decided: the code for a server error, else the status (audit trail, logs).
    said = f"HTTP {code}" if env is None or code >= 500 else env.status
    if outcome is wire.Outcome.UNAVAILABLE:
        cls = errors.AuthnUnavailable if idempotent else errors.AuthnOutcomeUnknown
        raise cls(f"{path}: {said}", path=path, request_id=request_id)
    if outcome is wire.Outcome.RATE_LIMITED:
        raise errors.AuthnRateLimited(
            f"{path}: TooManyRequests",
            path=path,
            request_id=request_id,
            retry_after=wire.parse_retry_after(response.headers.get("retry-after")),
        )
    if outcome is wire.Outcome.REJECTED_US:
        raise errors.AuthnRejectedUs(
            f"{path}: Unauthorized (check PANGEA_AUTHN_TOKEN)", path=path, request_id=request_id
        )
    if outcome is wire.Outcome.PROTOCOL:
        if env is not None:
            known = env.status == "Success"
            problem = f"{path}: {said} under HTTP {code}" + (", not 200" if known else ", not an answer we know")
        raise errors.AuthnProtocolError(problem, path=path, request_id=request_id)
    if env is None:  # REFUSED without an envelope: a proxy refused the request's size
        raise errors.AuthnRequestInvalid(f"{path}: {said}", path=path, request_id=request_id, status=said)
    return env


def _should_retry(exc: BaseException, *, idempotent: bool, max_retry_after: float) -> bool:
    if isinstance(exc, errors.AuthnRateLimited):
        return exc.retry_after is None or exc.retry_after <= max_retry_after
    if isinstance(exc, errors.AuthnOutcomeUnknown):
        return False
    if isinstance(exc, errors.AuthnUnreachable):
        return True
    return isinstance(exc, errors.AuthnUnavailable) and idempotent


def _list_body(filter: Mapping[str, Any] | None, paging: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {k: v for k, v in paging.items() if v is not None}
    if filter:
        body["filter"] = dict(filter)
    return body
