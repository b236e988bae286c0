"""Alembic environment: the URL from ``worker.db`` (or the environment), the schema from ``worker.models``."""

from __future__ import annotations

import logging
from typing import Literal

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext

from worker import db, models, settings

config = context.config
target_metadata = models.Base.metadata

#: Key of the PostgreSQL advisory lock that lets one migrator run at a time (``"sessync"`` in ASCII).
MIGRATION_LOCK_KEY = 0x73657373796E63


def render_item(type_: str, obj: object, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render worker.models' column types as the plain SQLAlchemy types they store (no app imports)."""
    if type_ == "type" and isinstance(obj, sa.types.TypeDecorator):
        return f"sa.{obj.impl_instance!r}"
    return False


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate and ``alembic check`` compare only our tables: an app's own tables are not ours to drop."""
    return type_ != "table" or name in target_metadata.tables


def database_url() -> str:
    """The URL set by ``worker.db.alembic_config``, else ``sqlalchemy.url``, else ``DATABASE_URL``."""
    url = config.attributes.get("sqlalchemy.url") or config.get_alembic_option("sqlalchemy.url")
    return db.normalize_url(url or settings.Settings.from_env().database_url)


def run_migrations_offline(url: str) -> None:
    """Print the SQL instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=db.VERSION_TABLE,
        render_as_batch=db.is_sqlite(url),
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations(connection: sa.Connection) -> None:
    """Run the migrations on ``connection``, all in one transaction."""
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        # Our own version table: an app's Alembic history in `alembic_version` is never read or written.
        version_table=db.VERSION_TABLE,
        include_name=include_name,
        render_as_batch=sqlite,  # SQLite alters tables by copying them
        # worker.db makes SQLite DDL transactional too: a failed upgrade leaves no half-built schema.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        ours = {script.revision for script in context.script.walk_revisions()}
        if (moved := db.adopt_legacy_version(connection, ours)) is not None:
            logging.getLogger("alembic.runtime.migration").info(
                "Moved revision %s from %s to %s", moved, db.LEGACY_VERSION_TABLE, db.VERSION_TABLE
            )
        context.run_migrations()
        if sqlite:
            # Foreign keys are off while tables are rebuilt; make sure the result still honours them.
            if connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                raise RuntimeError("migration left rows that violate a foreign key")


def run_migrations_online(url: str) -> None:
    """Run the migrations on a new connection to ``url``."""
    # With foreign keys on, SQLite's DROP TABLE in a batch rebuild would fire ON DELETE actions.
    engine = db.create_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()


if config.cmd_opts is not None and not logging.getLogger().handlers:
    # Run from the `alembic` command line, which has no alembic.ini to configure logging.
    logging.basicConfig(level=logging.INFO, format="%(levelname)-5.5s [%(name)s] %(message)s")

if context.is_offline_mode():
    run_migrations_offline(database_url())
elif (shared := config.attributes.get("connection")) is not None:
    run_migrations(shared)  # a connection handed over by the caller (Alembic's connection sharing)
else:
    run_migrations_online(database_url())
