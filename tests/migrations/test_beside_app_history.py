"""Our migrations beside an app's own Alembic history in the same database: neither side touches the other.

The app here is what a real one has: its own ``env.py``, its own revisions, Alembic's default
``alembic_version`` table. Ours keep to ``session_sync_alembic_version``. Databases migrated by an
older session-sync (our revision in ``alembic_version``) are moved over in place by ``db upgrade``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from tests import app_beside
from tests.app_beside import APP_REVISION
from worker import db


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("empty_pg_url"))


@pytest.fixture
def app_config(tmp_path: Path, url: str) -> Config:
    """The app's own Alembic project (script directory, one revision), on the shared database."""
    return app_beside.alembic_project(tmp_path / "app_migrations", url)


app_versions = app_beside.app_versions


def tables(url: str) -> set[str]:
    engine = db.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_app_first_then_ours_and_back_down(url: str, app_config: Config) -> None:
    # Given an app whose own history is already in the database
    command.upgrade(app_config, "head")
    # When session-sync is installed and migrated, then removed again
    db.upgrade(url)
    # Then each history is in its own table, and both are at head
    assert app_versions(url) == [APP_REVISION]
    assert db.current_revision(url) == db.head_revision()
    assert {"app_users", "sessions", db.VERSION_TABLE} <= tables(url)
    # And the app can still go down and up on its own, without touching ours
    command.downgrade(app_config, "base")
    command.upgrade(app_config, "head")
    assert db.current_revision(url) == db.head_revision()
    # And removing ours leaves the app's table and history exactly as they were
    db.downgrade(url, "base")
    assert app_versions(url) == [APP_REVISION]
    assert tables(url) == {"app_users", "alembic_version", db.VERSION_TABLE}


def test_ours_first_then_the_app(url: str, app_config: Config) -> None:
    # Given session-sync migrated first
    db.upgrade(url)
    # When the app then runs its own migrations (this is what used to fail: "Can't locate revision")
    command.upgrade(app_config, "head")
    # Then both are at head, each in its own table
    assert app_versions(url) == [APP_REVISION]
    assert db.current_revision(url) == db.head_revision()
    # And upgrading ours again is a no-op that leaves the app's history alone
    db.upgrade(url)
    assert app_versions(url) == [APP_REVISION]


def move_to_legacy_table(url: str) -> None:
    """What an older session-sync left: our revision in Alembic's default table."""
    engine = db.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE {db.VERSION_TABLE}"))
            connection.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
            connection.execute(sa.text("INSERT INTO alembic_version VALUES (:v)"), {"v": db.head_revision()})
    finally:
        engine.dispose()


def test_an_older_install_is_moved_in_place_and_the_app_can_then_migrate(url: str, app_config: Config) -> None:
    # Given a database migrated by an older session-sync, our revision in alembic_version
    db.upgrade(url)
    move_to_legacy_table(url)
    assert db.current_revision(url) is None  # the worker would refuse to start: "run db upgrade"
    # When `db upgrade` runs
    db.upgrade(url)
    # Then our revision moved to our own table, the old table is gone, and no migration ran twice
    assert db.current_revision(url) == db.head_revision()
    assert app_versions(url) is None
    # And the app's own migrations now run
    command.upgrade(app_config, "head")
    assert app_versions(url) == [APP_REVISION]


def test_only_our_row_moves_out_of_a_shared_legacy_table(url: str, app_config: Config) -> None:
    # Given an alembic_version holding the app's revision and, beside it, ours (a multi-base history)
    command.upgrade(app_config, "head")
    db.upgrade(url)
    engine = db.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE {db.VERSION_TABLE}"))
            connection.execute(sa.text("INSERT INTO alembic_version VALUES (:v)"), {"v": db.head_revision()})
    finally:
        engine.dispose()
    # When `db upgrade` runs
    db.upgrade(url)
    # Then ours moved and the app's stayed, untouched
    assert app_versions(url) == [APP_REVISION]
    assert db.current_revision(url) == db.head_revision()
