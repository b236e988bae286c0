"""A small existing app to install session-sync beside: its own Alembic history and its own Celery app.

What a real app brings to the shared database and broker: an ``env.py`` and revisions using
Alembic's default ``alembic_version`` table, and a Celery app on Celery's default ``celery`` queue.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config

from worker import db

#: The app's one Alembic revision.
APP_REVISION = "a1b2c3d4e5f6"

APP_ENV = """
import sqlalchemy as sa
from alembic import context

engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

APP_REVISION_FILE = f"""
import sqlalchemy as sa
from alembic import op

revision = "{APP_REVISION}"
down_revision = None


def upgrade():
    op.create_table("app_users", sa.Column("id", sa.Integer, primary_key=True), sa.Column("email", sa.Text))


def downgrade():
    op.drop_table("app_users")
"""

#: The app's Celery tasks: its own app, on Celery's default queue, knowing nothing of ours.
APP_TASKS = """
import os

from celery import Celery

app = Celery("shop", broker=os.environ["SHOP_BROKER_URL"], backend=os.environ["SHOP_BROKER_URL"])


@app.task(name="shop.add")
def add(x, y):
    return x + y
"""


def alembic_project(scripts: Path, url: str) -> Config:
    """Write the app's Alembic project into ``scripts`` and return its configuration for ``url``."""
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(textwrap.dedent(APP_ENV))
    (scripts / "versions" / f"{APP_REVISION}_create_app_users.py").write_text(textwrap.dedent(APP_REVISION_FILE))
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", db.normalize_url(url))
    return config


def write_celery_app(directory: Path) -> None:
    """Write the app's Celery module (``shop_tasks``) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shop_tasks.py").write_text(textwrap.dedent(APP_TASKS))


def app_versions(url: str) -> list[str] | None:
    """The rows of the app's ``alembic_version`` table (None: no such table)."""
    engine = db.create_engine(url)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            return [str(v) for v in connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()]
    finally:
        engine.dispose()
