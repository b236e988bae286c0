"""Engines, ORM session factories and Alembic migrations for SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy import event, orm

if TYPE_CHECKING:  # Alembic is imported where it is used: a web app importing worker.sessions never loads it
    from alembic.config import Config

#: The package directory; an installed wheel carries the migrations here, in ``worker/migrations``.
PACKAGE_DIR = Path(__file__).resolve().parent
#: The repository top level: ``pyproject.toml`` and ``migrations/`` (the source) sit beside the package.
PROJECT_DIR = PACKAGE_DIR.parent
#: Alembic's script directory (``env.py``, ``versions/``): the wheel's copy, else the checkout's source.
MIGRATIONS_DIR = (
    PACKAGE_DIR / "migrations" if (PACKAGE_DIR / "migrations" / "env.py").exists() else PROJECT_DIR / "migrations"
)
#: Our own Alembic version table, so an app's own Alembic history in the same database is never touched.
VERSION_TABLE = "session_sync_alembic_version"
#: Alembic's default version table, where releases before 0.2 recorded our revision.
LEGACY_VERSION_TABLE = "alembic_version"
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
    PostgreSQL: connections are checked before use (``pool_pre_ping``) and speak UTC.
    """
    url = normalize_url(url)
    if not is_sqlite(url):
        parsed = sa.make_url(url)
        connect_args: dict[str, Any] = {}
        if "application_name" not in parsed.query:
            connect_args["application_name"] = DEFAULT_APPLICATION_NAME
        pg = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)

        @event.listens_for(pg, "connect")
        def _in_utc(dbapi_connection: Any, connection_record: Any) -> None:
            # The driver returns timestamps in the connection's time zone. In UTC they are already
            # what models.UtcDateTime hands out, with no conversion per value; any zone reads the
            # same instants, so a server or a pooler that keeps another one changes nothing else.
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SET TIME ZONE 'UTC'")
            finally:
                cursor.close()
                dbapi_connection.autocommit = autocommit

        return pg

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

    ``script_location`` is set to :data:`MIGRATIONS_DIR` so it works from any directory, in a
    checkout or an installed wheel (which has no ``pyproject.toml``); ``migrations/env.py`` reads
    the URL from ``config.attributes["sqlalchemy.url"]``.
    """
    from alembic.config import Config

    pyproject = PROJECT_DIR / "pyproject.toml"
    config = Config(toml_file=pyproject if pyproject.exists() else None)
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["sqlalchemy.url"] = normalize_url(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop everything)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at (None: never migrated), from our version table."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def adopt_legacy_version(connection: sa.Connection, our_revisions: set[str]) -> str | None:
    """Move our revision from Alembic's default ``alembic_version`` table into :data:`VERSION_TABLE`.

    Releases before 0.2 recorded it there, where it breaks the app's own migrations ("Can't locate
    revision"). Only rows naming one of ``our_revisions`` move; an app's own rows stay exactly as
    they are, and the old table is dropped only when nothing of the app's was in it. Returns the
    revision moved (None: nothing to do). Runs inside the migration's transaction.
    """
    inspector = sa.inspect(connection)
    if not inspector.has_table(LEGACY_VERSION_TABLE):
        return None
    legacy = sa.table(LEGACY_VERSION_TABLE, sa.column("version_num", sa.String(32)))
    rows = {str(v) for v in connection.execute(sa.select(legacy.c.version_num)).scalars()}
    ours = rows & our_revisions
    if not ours:
        return None
    if len(ours) > 1:
        raise RuntimeError(f"{LEGACY_VERSION_TABLE} holds more than one session-sync revision: {sorted(ours)}")
    revision = ours.pop()
    target = sa.Table(
        VERSION_TABLE, sa.MetaData(), sa.Column("version_num", sa.String(32), primary_key=True, nullable=False)
    )
    if inspector.has_table(VERSION_TABLE):
        if connection.execute(sa.select(target.c.version_num)).first() is not None:
            raise RuntimeError(f"both {LEGACY_VERSION_TABLE} and {VERSION_TABLE} hold a session-sync revision")
    else:
        target.create(connection)
    connection.execute(target.insert().values(version_num=revision))
    connection.execute(legacy.delete().where(legacy.c.version_num == revision))
    if rows == {revision}:
        connection.execute(sa.text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))
    return revision


def head_revision() -> str:
    """The newest Alembic revision shipped with this code."""
    from alembic.script import ScriptDirectory

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
