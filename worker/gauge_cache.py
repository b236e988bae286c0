"""One reading of the database gauges, reused for a short time by every process that serves ``/metrics``.

Why: the gauges of ``/metrics`` (sessions by state, the due backlog, the outbox, the last sweep,
the guard) are aggregate queries on the app's primary database, a dozen statements per reading.
Prometheus scrapes every worker, so read on every scrape, N workers cost N readings per scrape
interval for the very same numbers (and a pair of Prometheus servers, twice that). So a reading is
kept for ``SESSION_SYNC_METRICS_CACHE`` (default 15 s; ``0`` reads on every scrape):

- **in this process**: scrapes within that time read nothing;
- **in Redis, when the broker is Redis** (the server the rate limit already shares), under a key
  named for the database: the first worker scraped after the reading expired reads the database
  and stores it, and every other worker serves that reading until it expires. The cost of a scrape
  round no longer grows with the number of workers (``docs/benchmarks.md``, "Scrape cost").

Only successful readings are shared. A process that cannot read the database reports it itself
(``session_sync_database_up 0``), and tries again after the same time at most. A process that
serves a shared reading does not touch the database for it, so ``database_up`` says whether the
reading it serves succeeded; one worker cut off from a database the others reach shows in its
failing tasks rather than there. When Redis does not
answer, each process reads for itself (and leaves Redis alone for that long), so ``/metrics``
keeps working while the broker is lost. The shared value holds counts and timestamps, never a
token or an id. Two workers whose readings expire at the same instant may both read: harmless,
and rare, since Prometheus spreads its targets' scrapes over the interval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: The gauges' values as plain JSON types (see :func:`worker.exporter.gauge_reading`).
Reading = dict[str, Any]
#: Prefix of the shared key in Redis; the rest names the database (a hash: the URL may hold a password).
KEY_PREFIX = "session_sync:metrics:gauges:"


@dataclass(frozen=True)
class _Held:
    reading: Reading | None  # None: the database could not be read
    until: float  # on this process's monotonic clock


class GaugeCache:
    """``get()`` answers a reading at most ``ttl`` seconds old, reading the database only when none is."""

    def __init__(
        self,
        read: Callable[[], Reading],
        *,
        ttl: float,
        database_url: str,
        redis_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()  # concurrent scrapes of one process share one reading
        self._held: _Held | None = None
        self._redis_resting_until = 0.0
        self.key = KEY_PREFIX + hashlib.sha256(database_url.encode()).hexdigest()[:32]
        self._redis: Any = None
        if redis_url and ttl > 0:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def get(self) -> Reading | None:
        """The current reading, or None if the database could not be read (then logged once per ``ttl``)."""
        with self._lock:
            now = self._clock()
            if self._held is not None and now < self._held.until:
                return self._held.reading
            shared = self._shared_get(now)
            if shared is not None:
                reading, remaining = shared
                self._held = _Held(reading, now + min(remaining, self._ttl))
                return reading
            try:
                reading = self._read()
            except Exception as exc:
                logger.warning(
                    "Metrics could not read the database: %s",
                    type(exc).__name__,
                    extra={"action": "metrics_db_down"},
                )
                self._held = _Held(None, now + self._ttl)
                return None
            self._held = _Held(reading, now + self._ttl)
            self._shared_put(reading, now)
            return reading

    def close(self) -> None:
        """Close the Redis connection, if any."""
        if self._redis is not None:
            self._redis.close()

    # --- Redis ------------------------------------------------------------------------------------

    def _shared_get(self, now: float) -> tuple[Reading, float] | None:
        """Another process's reading and its seconds left, if Redis holds one."""
        if self._redis is None or now < self._redis_resting_until:
            return None
        try:
            raw, left_ms = self._redis.pipeline().get(self.key).pttl(self.key).execute()
        except self._redis_errors:
            self._rest(now)
            return None
        if raw is None:
            return None
        try:
            reading = json.loads(raw)
        except ValueError:  # not ours, or cut short: read the database instead
            return None
        if not isinstance(reading, dict):
            return None
        return reading, (left_ms / 1000 if left_ms > 0 else self._ttl)

    def _shared_put(self, reading: Reading, now: float) -> None:
        if self._redis is None or now < self._redis_resting_until:
            return
        try:
            self._redis.set(self.key, json.dumps(reading), px=max(1, round(self._ttl * 1000)))
        except self._redis_errors:
            self._rest(now)

    def _rest(self, now: float) -> None:
        """Redis did not answer: read for ourselves for one ``ttl`` instead of waiting on it every scrape."""
        self._redis_resting_until = now + self._ttl
        logger.info(
            "Metrics: Redis unreachable; this process reads the database gauges itself for %.0fs",
            self._ttl,
            extra={"action": "metrics_cache_local"},
        )
