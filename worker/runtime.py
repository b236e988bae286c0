"""Per-process resources, built once on first use: DB engine, event loop, AuthN client, sync engine.

Celery tasks and the CLI call :func:`get`; a forked worker child calls :func:`reset` so it never
shares its parent's connections, and :func:`close` runs at process shutdown (arq's
``on_startup``/``on_shutdown``, in Celery's terms).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import orm

from worker import authn, clock, crypto, decisions, engine, guard, outbox, ratelimit
from worker import db as dbmod
from worker.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Runtime:
    """Everything one worker process needs, made lazily from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def db_engine(self) -> sa.Engine:
        """The process's SQLAlchemy engine (one connection pool)."""
        return dbmod.create_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> orm.sessionmaker[orm.Session]:
        """Factory of short-lived ORM sessions."""
        return dbmod.session_factory(self.db_engine)

    @cached_property
    def clock(self) -> Callable[[], datetime]:
        """The time every worker agrees on (the database's clock on PostgreSQL: ``worker.clock``)."""
        return clock.for_engine(self.db_engine)

    @cached_property
    def cipher(self) -> crypto.TokenCipher:
        """Encrypts tokens at rest and hashes them for lookups."""
        return crypto.TokenCipher.from_settings(self.settings)

    @cached_property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The process's event loop; the AuthN client's connections live on it."""
        return asyncio.new_event_loop()

    @cached_property
    def client(self) -> authn.AuthnClient:
        """One pooled AuthN client per process."""
        return authn.AuthnClient.from_settings(self.settings)

    @cached_property
    def limiter(self) -> ratelimit.RateLimiter:
        """The outbound rate limit, shared by every worker (``worker.ratelimit.from_settings``)."""
        return ratelimit.from_settings(self.settings)

    @cached_property
    def policy(self) -> decisions.Policy:
        """The decision knobs from settings."""
        return decisions.Policy.from_settings(self.settings)

    @cached_property
    def engine(self) -> engine.SyncEngine:
        """The sync engine on this process's resources."""
        s = self.settings
        return engine.SyncEngine(
            sessions=self.sessions,
            client=self.client,
            cipher=self.cipher,
            limiter=self.limiter,
            policy=self.policy,
            batch_size=s.batch_size,
            concurrency=s.concurrency,
            lease=s.lease,
            refresh_lease=s.refresh_lease,
            refresh_timeout=s.refresh_timeout,
            bulk=s.bulk_revalidation,
            guard_limits=guard.Limits(share=s.guard_share, minimum=s.guard_minimum),
            batches_in_flight=s.batches_in_flight,
            clock=self.clock,
        )

    @cached_property
    def delivery_client(self) -> authn.AuthnClient:
        """The AuthN client of logout delivery: it never sleeps on Retry-After, the outbox schedules it."""
        return authn.AuthnClient.from_settings(self.settings, max_retry_after=0.0)

    @cached_property
    def delivery(self) -> outbox.Delivery:
        """Logout delivery on this process's resources (the shared rate limit, its own AuthN client)."""
        s = self.settings
        return outbox.Delivery(
            sessions=self.sessions,
            client=self.delivery_client,
            cipher=self.cipher,
            limiter=self.limiter,
            policy=outbox.policy_from_settings(s),
            batch_size=s.outbox_batch_size,
            concurrency=s.concurrency,
            lease=s.lease,
            can_invalidate=s.has_service_token,
            guard_limits=guard.Limits(share=s.guard_share, minimum=s.guard_minimum),
            clock=self.clock,
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine to completion on the process's loop."""
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        """Close what was opened: the HTTP pool, Redis, the event loop, the DB pool."""
        if "client" in self.__dict__:
            self.run(self.client.aclose())
        if "delivery_client" in self.__dict__:
            self.run(self.delivery_client.aclose())
        limiter = self.__dict__.get("limiter")
        if isinstance(limiter, (ratelimit.RedisRateLimiter, ratelimit.DatabaseRateLimiter)):
            self.run(limiter.aclose())
        if "loop" in self.__dict__:
            self.loop.close()
        if "db_engine" in self.__dict__:
            self.db_engine.dispose()


_current: Runtime | None = None


def get() -> Runtime:
    """This process's runtime, made from the environment on first use."""
    global _current
    if _current is None:
        _current = Runtime(Settings.from_env())
    return _current


def install(runtime: Runtime) -> None:
    """Use ``runtime`` for this process (the CLI and tests build theirs from explicit settings)."""
    global _current
    _current = runtime


def reset() -> None:
    """Forget the inherited runtime after a fork, without closing the parent's connections."""
    global _current
    _current = None


def close() -> None:
    """Close this process's runtime, if any."""
    global _current
    if _current is not None:
        _current.close()
        _current = None
