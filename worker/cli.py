"""The ``session-sync`` command line: an edge, like the Celery app. It reads settings and calls in."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from worker import errors
from worker.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def _settings() -> Settings:
    return Settings.from_env()


def clear_errors(func: F) -> F:
    """Turn our expected errors into one line on stderr and a non-zero exit, never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.ConfigError as exc:
            click.echo(f"session-sync: configuration error: {exc}", err=True)
            sys.exit(2)
        except errors.SessionSyncError as exc:
            click.echo(f"session-sync: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="pangea-session-sync")
def main() -> None:
    """Keep a web app's local sessions true to Pangea AuthN."""


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
@clear_errors
def db_upgrade(revision: str) -> None:
    """Apply the migrations to DATABASE_URL."""
    from worker import db as dbmod

    settings = _settings()
    dbmod.upgrade(settings.database_url, revision)
    click.echo(f"database at revision {dbmod.current_revision(settings.database_url)}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=click.IntRange(1, 65535))
@clear_errors
def emulator(host: str, port: int) -> None:
    """Serve the Pangea AuthN emulator (tokens from EMULATOR_SERVICE_TOKEN / EMULATOR_CLIENT_TOKEN)."""
    from worker import emulator as emu

    service = os.environ.get("EMULATOR_SERVICE_TOKEN") or emu.DEFAULT_SERVICE_TOKEN
    client = os.environ.get("EMULATOR_CLIENT_TOKEN") or emu.DEFAULT_CLIENT_TOKEN
    click.echo(f"AuthN emulator on http://{host}:{port} (PANGEA_BASE_URL=http://{host}:{port})", err=True)
    emu.serve(host=host, port=port, service_token=service, client_token=client)


if __name__ == "__main__":
    main()
