"""Seeding for benchmarks: a fresh migrated PostgreSQL database filled by COPY, and the emulator filled in bulk.

Both sides derive session ``i`` from :func:`worker.emulator.store.seeded`, so the emulator never sends
secrets back and no user logs in one at a time. Both sides also share the minting time (``Plan.minted``,
whole seconds), so every stored expiry is the one Pangea answers: a routine check finds nothing changed.
The first ``Plan.refreshing`` sessions are inside their refresh margin (``refresh_left`` of their
token left); the rest have ``active_left``. Tokens are encrypted with the real
:class:`~worker.crypto.TokenCipher` (every row its own Fernet ciphertexts and lookup hash), in a pool of
processes because Fernet costs about 20 µs a token.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from worker import crypto
from worker import db as dbmod
from worker.emulator import EmulatorAdmin, store

#: Rows encrypted and formatted per job of the process pool.
CHUNK = 20_000
#: Sessions per ``POST /emulator/seed`` call (each takes a few seconds at most).
EMULATOR_CHUNK = 100_000

_COLUMNS = (
    "user_id",
    "email",
    "pangea_session_id",
    "active_token_id",
    "active_token_enc",
    "active_token_hash",
    "refresh_token_enc",
    "active_expires_at",
    "active_issued_at",
    "refresh_expires_at",
    "state",
    "created_at",
    "updated_at",
    "next_check_at",
    "failures",
    "uncertain",
    "version",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the seeded sessions look like: how many, their token times, when they fall due."""

    count: int
    key: str = "bench"
    #: Active token lifetime and how much of it is left (small: the sessions are inside their refresh margin).
    active_ttl: timedelta = timedelta(hours=1)
    active_left: timedelta = timedelta(minutes=50)
    refresh_ttl: timedelta = timedelta(days=1)
    #: Every session is due this long before the sweep starts (spread over one microsecond each).
    overdue: timedelta = timedelta(seconds=5)
    #: How many sessions (the first ones) are inside their refresh margin, and how much of their token is left.
    refreshing: int = 0
    refresh_left: timedelta = timedelta(minutes=1)
    #: When every token was minted, in whole epoch seconds (both sides use it); 0: when the plan is made.
    minted: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.refreshing <= self.count:
            raise ValueError(f"refreshing must be from 0 to count ({self.count}), not {self.refreshing}")
        if self.minted == 0:
            object.__setattr__(self, "minted", int(time.time()) - 1)

    @property
    def minted_at(self) -> datetime:
        """:attr:`minted` as a datetime."""
        return datetime.fromtimestamp(self.minted, UTC)


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url``, migrate it to head; its URL."""
    engine = sa.create_engine(dbmod.normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    url = sa.make_url(dbmod.normalize_url(admin_url)).set(database=name).render_as_string(hide_password=False)
    dbmod.upgrade(url)
    return url


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (benchmark databases are thrown away after each run)."""
    engine = sa.create_engine(dbmod.normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def _copy_text(keys: list[str], plan: Plan, start: int, stop: int, now: datetime, grouped: bool = False) -> str:
    """COPY text lines for sessions ``start`` … ``stop - 1`` (run in a pool process)."""
    cipher = crypto.TokenCipher(keys)
    minted = plan.minted_at
    lines = {left: _line(plan, minted, minted + left) for left in {plan.active_left, plan.refresh_left}}
    first_due = now - plan.overdue
    out = []
    for i in range(start, stop):
        ids = store.seeded(i, key=plan.key)
        line = lines[plan.refresh_left if i < plan.refreshing else plan.active_left]
        out.append(
            line.format(
                user=store.stable_id("pui_", ids.email),
                email=ids.email,
                sid=ids.session_id,
                aid=ids.active_id,
                aenc=cipher.encrypt(ids.active_secret),
                ahash=cipher.lookup_hash(ids.active_secret),
                renc=cipher.encrypt(ids.refresh_secret),
                # On a schema with check groups (#14) a routine session waits on its group (NULL);
                # before it, every session had a due time of its own.
                due="\\N" if grouped else (first_due + timedelta(microseconds=i)).isoformat(),
            )
        )
    return "".join(out)


def _line(plan: Plan, minted: datetime, expires: datetime) -> str:
    """A COPY line template for a session minted at ``minted`` whose active token expires at ``expires``."""
    issued = expires - plan.active_ttl
    fields = [
        "{user}",
        "{email}",
        "{sid}",
        "{aid}",
        "{aenc}",
        "{ahash}",
        "{renc}",
        expires.isoformat(),
        issued.isoformat(),
        (minted + plan.refresh_ttl).isoformat(),
        "active",
        issued.isoformat(),
        issued.isoformat(),
        "{due}",
        "0",
        "f",
        "0",
    ]
    return "\t".join(fields) + "\n"


def _chunks(count: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, CHUNK):
        yield start, min(count, start + CHUNK)


def seed_database(url: str, keys: list[str], plan: Plan, *, now: datetime | None = None, workers: int = 2) -> float:
    """COPY ``plan.count`` sessions into ``url``, then VACUUM ANALYZE; the seconds it took."""
    import psycopg

    started = time.perf_counter()
    now = now or datetime.now(UTC)
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    copy = f"COPY sessions ({', '.join(_COLUMNS)}) FROM STDIN"
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool,
        psycopg.connect(conninfo) as conn,
    ):
        grouped = _has_check_groups(conn)
        jobs = [pool.submit(_copy_text, keys, plan, start, stop, now, grouped) for start, stop in _chunks(plan.count)]
        with conn.cursor() as cur, cur.copy(copy) as sink:
            for job in jobs:
                sink.write(job.result())
        conn.commit()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) sessions")
    return time.perf_counter() - started


def _has_check_groups(conn: object) -> bool:
    """Whether the migrated schema schedules routine checks by group (``check_groups``, issue #14)."""
    row = conn.execute("SELECT to_regclass('check_groups') IS NOT NULL").fetchone()  # type: ignore[attr-defined]
    return bool(row and row[0])


def seed_emulator(admin: EmulatorAdmin, plan: Plan) -> float:
    """Create the same sessions in the emulator, in calls of :data:`EMULATOR_CHUNK`; the seconds it took."""
    started = time.perf_counter()
    ranges = [(0, plan.refreshing, plan.refresh_left), (plan.refreshing, plan.count, plan.active_left)]
    for first, stop, left in ranges:
        for start in range(first, stop, EMULATOR_CHUNK):
            admin.seed(
                min(EMULATOR_CHUNK, stop - start),
                start=start,
                active_ttl=left.total_seconds(),
                refresh_ttl=plan.refresh_ttl.total_seconds(),
                key=plan.key,
                created_at=plan.minted,
            )
    return time.perf_counter() - started
