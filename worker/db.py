"""Engines, ORM session factories and Alembic migrations for SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, orm

#: The repository top level: ``pyproject.toml`` and ``migrations/`` sit beside the package.
PROJECT_DIR = Path(__file__).resolve().parent.parent
#: Alembic's script directory (``env.py``, ``versions/``).
MIGRATIONS_DIR = PROJECT_DIR / "migrations"
#: How long a SQLite statement waits for another connection's write lock before failing.
DEFAULT_SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option naming how SQLite transactions begin: ``"DEFERRED"`` (default) or ``"IMMEDIATE"``.
SQLITE_BEGIN = "session_sync_sqlite_begin"
#: ``application_name`` shown in ``pg_stat_activity`` unless the URL sets one.
DEFAULT_APPLICATION_NAME = "session-sync"


def normalize_url(url: str) -> str:
    """The URL with a driver SQLAlchemy can load (``postgresql://`` becomes ``postgresql+psycopg://``)."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    """True when ``url`` names a SQLite database."""
    return sa.make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, sqlite_foreign_keys: bool = True) -> sa.Engine:
    """An engine for ``url``, set up for its dialect.

    SQLite: WAL journal, a busy timeout, enforced foreign keys (``sqlite_foreign_keys=False`` is
    for migrations, which rebuild tables), and SQLAlchemy in charge of ``BEGIN`` so that every
    statement, DDL included, runs in a real transaction and ``BEGIN IMMEDIATE`` is available
    through the :data:`SQLITE_BEGIN` execution option (see :func:`session_factory`).
    PostgreSQL: connections are checked before use (``pool_pre_ping``).
    """
    url = normalize_url(url)
    if not is_sqlite(url):
        parsed = sa.make_url(url)
        connect_args: dict[str, Any] = {}
        if "application_name" not in parsed.query:
            connect_args["application_name"] = DEFAULT_APPLICATION_NAME
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    engine = sa.create_engine(url)
    pragmas = [
        f"PRAGMA busy_timeout={DEFAULT_SQLITE_BUSY_TIMEOUT_MS}",  # first: switching to WAL may wait for a lock
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",  # durable across application crashes in WAL mode
        f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}",
    ]

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # sqlite3's legacy transaction control skips BEGIN before SELECT and DDL; take it over.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"{SQLITE_BEGIN} must be DEFERRED, IMMEDIATE or EXCLUSIVE, not {mode!r}")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def session_factory(engine: sa.Engine, *, immediate: bool = False) -> orm.sessionmaker[orm.Session]:
    """A factory of ORM sessions on ``engine`` whose objects stay readable after commit.

    With ``immediate=True``, SQLite transactions start with ``BEGIN IMMEDIATE`` (take the write
    lock up front, so read-then-write transactions wait instead of failing with "database is
    locked"); PostgreSQL ignores it.
    """
    if immediate and engine.dialect.name == "sqlite":
        engine = engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    return orm.sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic's configuration: ``[tool.alembic]`` from ``pyproject.toml``, migrating ``url``.

    ``script_location`` is set to this checkout's ``migrations/`` so it works from any directory;
    ``migrations/env.py`` reads the URL from ``config.attributes["sqlalchemy.url"]``.
    """
    pyproject = PROJECT_DIR / "pyproject.toml"
    config = Config(toml_file=pyproject if pyproject.exists() else None)
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["sqlalchemy.url"] = normalize_url(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop everything)."""
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at (None: never migrated)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest Alembic revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions in {MIGRATIONS_DIR}")
    return head


def rowcount(result: sa.Result[Any]) -> int:
    """Rows matched by an UPDATE/DELETE/INSERT result (typed access to ``CursorResult.rowcount``)."""
    return int(cast("sa.CursorResult[Any]", result).rowcount)


def picked(db: orm.Session, column: orm.InstrumentedAttribute[Any], pick: sa.Select[Any]) -> sa.ColumnElement[bool]:
    """``column IN (pick)`` for a claiming UPDATE, with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL.

    On PostgreSQL the pick runs as a CTE (always materialized, since it locks rows): as a plain
    ``IN (sub-select)`` the planner may rescan the locking sub-select for each outer row; each
    rescan skips the rows this very UPDATE just leased, and ``LIMIT`` stops limiting (one claim of
    25 took a thousand rows). SQLite drops ``FOR UPDATE``; there the conditional UPDATE itself is
    the claim, atomic because SQLite runs one writer at a time.
    """
    if db.get_bind().dialect.name == "postgresql":
        cte = pick.with_for_update(skip_locked=True).cte("picked")
        return column.in_(sa.select(*cte.c))
    return column.in_(pick.scalar_subquery())
