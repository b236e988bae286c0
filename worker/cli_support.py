"""What every ``session-sync`` command shares: settings from the environment, one-line errors."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from worker import errors, models, runtime
from worker.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

#: A local row id on the command line (a session, an outbox event): anything else is a usage error.
ROW_ID = click.IntRange(1, models.MAX_ROW_ID)


def seconds_up_to(limit: float) -> Callable[[click.Context, click.Parameter, float], float]:
    """An option callback: a number of seconds above zero and at most ``limit`` (never NaN or infinite)."""

    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if not (math.isfinite(value) and 0 < value <= limit):
            raise click.BadParameter(f"{value:g} is not a number of seconds above 0 and at most {limit:g}")
        return value

    return check


def settings() -> Settings:
    """Settings from the environment (a ConfigError is turned into one line by :func:`clear_errors`)."""
    return Settings.from_env()


def make_runtime() -> runtime.Runtime:
    """A runtime for one command, from the environment; the caller closes it."""
    return runtime.Runtime(settings())


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
        except sa.exc.DBAPIError as exc:
            # The driver's own words, first line only: never the statement or its parameters.
            said = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            click.echo(
                f"session-sync: database error: {said} (check DATABASE_URL; a new database needs `db upgrade`)",
                err=True,
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
