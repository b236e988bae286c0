"""One outbound request rate per Pangea project, shared by every worker process.

Celery's ``rate_limit`` is per worker, so N workers would send N times the rate. The bucket lives
in Redis (one Lua script, atomic): the one ``SESSION_SYNC_RATE_LIMIT_STORE`` names, whatever the
broker (a RabbitMQ deployment points it at any Redis), else the broker when that is Redis. Only
``local`` (or no Redis at all: SQLite, cron) keeps it in the process, which is then the only sender.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from worker.settings import Settings

logger = logging.getLogger(__name__)

#: How often a Redis outage is logged while the limiter falls back to its local bucket, in seconds.
OUTAGE_LOG_EVERY = 60.0

#: URL schemes of a Redis store.
REDIS_SCHEMES = ("redis://", "rediss://")

#: Redis key prefix of the shared buckets.
KEY_PREFIX = "session-sync:ratelimit:"

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
    """The rate limiter ``settings`` name: shared in Redis (the store, else a Redis broker), else local."""
    store = settings.rate_limit_store
    if store is None:
        store = settings.celery_broker_url if settings.celery_broker_url.startswith(REDIS_SCHEMES) else "local"
    if store == "local":
        return LocalRateLimiter(settings.rate_limit)
    project = f"{settings.authn_base_url}|{settings.authn_token}"
    return RedisRateLimiter(store, project=project, rate=settings.rate_limit)


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
        self._key = KEY_PREFIX + hashlib.sha256(project.encode()).hexdigest()[:16]
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
