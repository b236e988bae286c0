"""One clock for every worker: the database's.

Leases, due times, sweep slots and expiry decisions compare times written by one host with the
clock of another. A host whose clock runs minutes fast would take rows from live leases (and
present a refresh token another worker is still presenting); a slow one would refresh too late.
So on PostgreSQL the workers tell time by the database server: the offset between this host's
clock and ``clock_timestamp()`` is measured (half the round trip is the error bound) and refreshed
every :data:`REFRESH_EVERY` seconds, and "now" is the host's clock plus that offset. A reading costs
nothing; a measurement one round trip. SQLite lives on the worker's own host: its clock is the
host's, so there the host clock is used as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa

logger = logging.getLogger(__name__)

#: Seconds between two measurements of the offset to the database's clock.
REFRESH_EVERY = 30.0
#: An offset larger than this is logged (once per measurement) as a clock to fix.
WARN_OFFSET = 5.0


class DatabaseClock:
    """``now()`` as the database server tells it, read from this host's clock plus a measured offset."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        refresh_every: float = REFRESH_EVERY,
        host: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._refresh_every = refresh_every
        self._host = host
        self._monotonic = monotonic
        self._offset = 0.0
        self._measured_at: float | None = None

    @property
    def offset(self) -> float:
        """Seconds to add to this host's clock to read the database's (0 until measured)."""
        return self._offset

    def __call__(self) -> datetime:
        if self._measured_at is None or self._monotonic() - self._measured_at >= self._refresh_every:
            self.measure()
        return datetime.fromtimestamp(self._host() + self._offset, UTC)

    def measure(self) -> None:
        """Measure the offset now; on failure keep the last one (the database may be restarting)."""
        self._measured_at = self._monotonic()
        try:
            with self._engine.connect() as conn:
                before = self._host()
                server = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
                after = self._host()
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("Could not read the database's clock: %s", type(exc).__name__, extra={"action": "clock"})
            return
        self._offset = server.timestamp() - (before + after) / 2
        if abs(self._offset) > WARN_OFFSET:
            logger.warning(
                "This host's clock is %.1f s off the database's; the worker goes by the database's",
                -self._offset,
                extra={"action": "clock_skew", "offset_seconds": round(self._offset, 3)},
            )


def for_engine(engine: sa.Engine) -> Callable[[], datetime]:
    """The clock workers on ``engine`` share: the database's on PostgreSQL, the host's on SQLite."""
    if engine.dialect.name == "postgresql":
        return DatabaseClock(engine)
    return lambda: datetime.now(UTC)
