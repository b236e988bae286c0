"""One outbound request rate per Pangea project, shared by every worker process.

Celery's ``rate_limit`` is per worker, so N workers would send N times the rate. The bucket is
shared in one of three stores (``SESSION_SYNC_RATE_LIMIT_STORE``):

- a Redis URL: one Lua script per request, atomic, on Redis's clock (any Redis, whatever the broker);
- ``database``: one row of ``rate_limit_buckets`` in the worker's own database, taken a grant at a
  time (up to a tenth of a second of the rate), so the database sees about ten writes a second per
  busy process, not one per request, on the database's clock;
- ``local``: a bucket in each process, which is then exact only for a single sender (SQLite, cron).

Unset, it is the broker when that is Redis, else the database when that is PostgreSQL, else local
(:func:`default_store`). A shared store that fails falls back to a local bucket (logged once a minute).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import sqlalchemy as sa

from worker import db

if TYPE_CHECKING:
    from worker.settings import Settings

logger = logging.getLogger(__name__)

#: How often an outage of the shared store is logged while the limiter falls back to its local bucket, in seconds.
OUTAGE_LOG_EVERY = 60.0

#: URL schemes of a Redis store.
REDIS_SCHEMES = ("redis://", "rediss://")

#: Redis key prefix of the shared buckets.
KEY_PREFIX = "session-sync:ratelimit:"

#: ``SESSION_SYNC_RATE_LIMIT_STORE`` value that shares the bucket in the worker's own database.
DATABASE = "database"
#: The database store's table (worker.models.RateLimitBucket).
TABLE = "rate_limit_buckets"
#: A database grant covers at most this many seconds of the rate (at 100/s: 10 tokens): what one
#: process may hold ahead of the others, so a process using the whole rate writes ~10 times a second.
GRANT_SECONDS = 0.1
#: Below that cap a grant covers this many seconds of the process's own pace: a process using a
#: small share of the rate (the usual case) writes about twice a second, whatever its pace.
PACE_SECONDS = 0.5
#: Tokens of a grant not spent this many seconds after it came due are dropped, not kept for a later burst.
GRANT_LIFETIME = 1.0
#: Seconds a process stays on its local bucket after the database store failed, before trying it again.
RETRY_AFTER = 5.0
#: Seconds the database store may take to connect or answer before it counts as failed.
DATABASE_TIMEOUT = 2.0

# KEYS[1] bucket; ARGV: rate per second, burst, tokens wanted. Redis's own clock is the clock, so
# workers on hosts with skewed clocks still share one rate.
# Returns 0 when granted, else the milliseconds to wait before trying again.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= want then
  tokens = tokens - want
else
  wait = math.ceil((want - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait
"""


def from_settings(settings: Settings) -> RateLimiter:
    """The rate limiter ``settings`` name: shared in Redis or the database, else local (:func:`default_store`)."""
    store = settings.rate_limit_store or default_store(settings)
    if store == "local":
        return LocalRateLimiter(settings.rate_limit)
    project = f"{settings.authn_base_url}|{settings.authn_token}"
    if store == DATABASE:
        return DatabaseRateLimiter(settings.database_url, project=project, rate=settings.rate_limit)
    return RedisRateLimiter(store, project=project, rate=settings.rate_limit)


def default_store(settings: Settings) -> str:
    """Where the bucket is shared when ``SESSION_SYNC_RATE_LIMIT_STORE`` is unset.

    The broker when it is Redis (one Lua call per request costs it nothing it cannot take); else the
    database when it is PostgreSQL, which every worker already shares, at a few writes a second; else
    ``local``: SQLite deployments are a single process (its one writer is better left to the sessions).
    """
    if settings.celery_broker_url.startswith(REDIS_SCHEMES):
        return settings.celery_broker_url
    if not settings.is_sqlite:
        return DATABASE
    return "local"


def describe(settings: Settings) -> str:
    """Which store holds the bucket, in words for ``session-sync check`` (no password, no token)."""
    store = settings.rate_limit_store or default_store(settings)
    rate = f"{settings.rate_limit:g} requests/s"
    if store == "local":
        return f"{rate} in each process on its own (local bucket: N workers send up to N times the rate)"
    if store == DATABASE:
        grant = grant_size(settings.rate_limit)
        return f"{rate} shared in the database (table {TABLE}, grants of up to {grant} tokens)"
    url = urlsplit(store)
    return f"{rate} shared in Redis at {url.hostname}:{url.port or 6379}{url.path or '/0'}"


def bucket_name(project: str) -> str:
    """The bucket of a project (base URL + token), hashed: neither a Redis key nor a row may carry the token."""
    return hashlib.sha256(project.encode()).hexdigest()[:16]


def grant_size(rate: float) -> int:
    """Most tokens one database grant takes: :data:`GRANT_SECONDS` of the rate, at least one."""
    return max(1, int(rate * GRANT_SECONDS))


class RateLimiter(Protocol):
    """Waits until one more request to Pangea may be sent."""

    async def acquire(self) -> None:
        """Return when a request may go out."""


class LocalRateLimiter:
    """A token bucket in this process: for a single sender (SQLite, ``sweep --once``, tests)."""

    def __init__(self, rate: float, *, burst: float | None = None) -> None:
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self._burst
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Take one token, sleeping as long as the bucket needs to refill."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
                self._at = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


class RedisRateLimiter:
    """A token bucket in Redis, shared by every worker that talks to the same Pangea project.

    If Redis cannot be reached, each process falls back to a bucket of its own at the same rate
    (logged once a minute) instead of failing: a broker outage must not cut short the Pangea
    calls of a batch already claimed, least of all refreshes whose answers would be lost.
    """

    def __init__(self, redis_url: str, *, project: str, rate: float, burst: float | None = None) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._local = LocalRateLimiter(rate, burst=burst)
        self._logged_at = 0.0
        self._script = self._redis.register_script(_TAKE)
        # The project (base URL + token) is hashed: the key must not carry the token.
        self._key = KEY_PREFIX + bucket_name(project)
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate)

    async def acquire(self) -> None:
        """Take one token from the shared bucket, sleeping as Redis says."""
        while True:
            try:
                wait_ms = int(await self._script(keys=[self._key], args=[self._rate, self._burst, 1]))
            except self._errors as exc:
                self._log_outage(exc)
                await self._local.acquire()
                return
            if wait_ms <= 0:
                return
            await asyncio.sleep(wait_ms / 1000)

    def _log_outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._logged_at >= OUTAGE_LOG_EVERY:
            self._logged_at = now
            logger.warning(
                "Rate limit: Redis unreachable (%s); limiting this process on its own meanwhile",
                type(exc).__name__,
                extra={"action": "ratelimit_local"},
            )

    async def aclose(self) -> None:
        """Close the Redis connection pool."""
        await self._redis.aclose()


# Take ``want`` tokens from the bucket, creating it full on first use, on the database's own clock.
# The tokens may go negative: a grant promised ahead, which the caller waits for (-tokens / rate s).
# One statement, atomic: PostgreSQL locks the row (a concurrent taker re-reads it, EvalPlanQual);
# SQLite runs one writer at a time.
_TAKE_POSTGRESQL = """
INSERT INTO rate_limit_buckets AS b (bucket, tokens, refilled_at)
VALUES (:bucket, :burst - :want, extract(epoch FROM clock_timestamp())::float8)
ON CONFLICT (bucket) DO UPDATE SET
    tokens = LEAST(:burst, b.tokens + GREATEST(0, excluded.refilled_at - b.refilled_at) * :rate) - :want,
    refilled_at = GREATEST(b.refilled_at, excluded.refilled_at)
RETURNING tokens
"""
_TAKE_SQLITE = """
INSERT INTO rate_limit_buckets (bucket, tokens, refilled_at)
VALUES (:bucket, :burst - :want, (julianday('now') - 2440587.5) * 86400.0)
ON CONFLICT (bucket) DO UPDATE SET
    tokens = min(:burst, tokens + max(0, excluded.refilled_at - refilled_at) * :rate) - :want,
    refilled_at = max(refilled_at, excluded.refilled_at)
RETURNING tokens
"""


def _retrieved(future: asyncio.Future[float]) -> None:
    """Mark a grant's outcome as seen, so a failure after its caller gave up is not reported again."""
    if not future.cancelled():
        future.exception()


class DatabaseRateLimiter:
    """A token bucket in the worker's database, shared by every worker that talks to the same Pangea project.

    For a broker that is not Redis (RabbitMQ). A request does not cost a write: the process takes a
    grant (as many tokens as it has callers waiting or spends in :data:`PACE_SECONDS`, at most
    :func:`grant_size`) in one statement and spends it locally, so a busy process writes about twice
    a second, up to ten times when it spends the whole rate. An unspent grant lapses after
    :data:`GRANT_LIFETIME`, so idle processes cannot hoard a burst. If the database fails, the process
    falls back to a bucket of its own at the same rate (logged once a minute) for :data:`RETRY_AFTER`
    seconds, then tries again.
    """

    def __init__(self, database_url: str, *, project: str, rate: float, burst: float | None = None) -> None:
        url = sa.make_url(db.normalize_url(database_url))
        if url.get_backend_name() == "sqlite":
            self._engine = db.create_engine(url.render_as_string(hide_password=False))
            self._sql = sa.text(_TAKE_SQLITE)
        else:
            # Its own small pool with short timeouts: a database that hangs must not hold up the requests.
            # The URL's own ``options`` (a search_path, say) are kept: connect_args would replace them.
            timeout_ms = int(DATABASE_TIMEOUT * 1000)
            given = url.query.get("options", "")
            options = " ".join([*([given] if isinstance(given, str) else given)])
            connect_args: dict[str, Any] = {
                "connect_timeout": max(1, int(DATABASE_TIMEOUT)),
                "options": f"{options} -c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}".strip(),
            }
            if "application_name" not in url.query:
                connect_args["application_name"] = f"{db.DEFAULT_APPLICATION_NAME} ratelimit"
            self._engine = sa.create_engine(
                url,
                pool_size=1,
                max_overflow=1,
                pool_timeout=DATABASE_TIMEOUT,
                pool_pre_ping=True,
                connect_args=connect_args,
            )
            self._sql = sa.text(_TAKE_POSTGRESQL)
        self._errors: tuple[type[BaseException], ...] = (sa.exc.SQLAlchemyError, OSError, TimeoutError)
        self._bucket = bucket_name(project)
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate)
        self._grant_max = min(grant_size(rate), max(1, int(self._burst)))
        self._local = LocalRateLimiter(rate, burst=burst)
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._stash = 0  # tokens of the current grant not yet spent
        self._due = 0.0  # when (monotonic) the current grant may be spent
        self._lapses = 0.0  # when (monotonic) its unspent tokens lapse
        self._spent: deque[float] = deque()  # when the last second's tokens were spent
        self._retry_at = 0.0
        self._logged_at = 0.0
        self._inflight: asyncio.Future[float] | None = None  # the thread taking the latest grant
        #: Grants taken from the database so far (one write each): what the database pays.
        self.grants = 0

    async def acquire(self) -> None:
        """Take one token from this process's grant, taking a new grant from the database when it is spent."""
        self._waiting += 1
        try:
            async with self._lock:
                await self._take_one()
        finally:
            self._waiting -= 1

    async def _take_one(self) -> None:
        while True:
            now = time.monotonic()
            if self._stash > 0 and now < self._lapses:
                if now < self._due:
                    await asyncio.sleep(self._due - now)
                    continue
                self._stash -= 1
                self._spent.append(now)
                return
            if now < self._retry_at or (self._inflight is not None and not self._inflight.done()):
                await self._local.acquire()  # the database failed a moment ago, or still holds a grant's thread
                return
            want = self._want(now)
            # Bounded here too: a connection whose network went silent answers no server-side timeout. The
            # thread cannot be stopped; it is awaited by aclose() and no second one starts while it runs.
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._take, want))
            self._inflight.add_done_callback(_retrieved)  # a late failure is the outage already logged
            try:
                tokens = await asyncio.wait_for(asyncio.shield(self._inflight), timeout=2 * DATABASE_TIMEOUT)
            except self._errors as exc:
                self._retry_at = time.monotonic() + RETRY_AFTER
                self._log_outage(exc)
                await self._local.acquire()
                return
            self.grants += 1
            self._stash = want
            self._due = time.monotonic() + max(0.0, -tokens) / self._rate
            self._lapses = self._due + GRANT_LIFETIME

    def _want(self, now: float) -> int:
        """A grant's size: what this process is about to spend (callers waiting, or its pace's next half second)."""
        while self._spent and self._spent[0] < now - 1.0:
            self._spent.popleft()
        pace = math.ceil(len(self._spent) * PACE_SECONDS)
        return max(1, min(self._grant_max, max(self._waiting, pace)))

    def _take(self, want: int) -> float:
        """One grant of ``want`` tokens: the bucket's tokens after it (negative: wait that long first)."""
        params = {"bucket": self._bucket, "want": float(want), "burst": float(self._burst), "rate": float(self._rate)}
        with self._engine.begin() as connection:
            return float(connection.execute(self._sql, params).scalar_one())

    def _log_outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._logged_at >= OUTAGE_LOG_EVERY:
            self._logged_at = now
            logger.warning(
                "Rate limit: database store failed (%s); limiting this process on its own meanwhile",
                type(exc).__name__,
                extra={"action": "ratelimit_local"},
            )

    async def aclose(self) -> None:
        """Close the database pool, once a grant still being taken has finished (or timed out)."""
        if self._inflight is not None and not self._inflight.done():
            await asyncio.wait([self._inflight], timeout=2 * DATABASE_TIMEOUT)
        self._engine.dispose()
