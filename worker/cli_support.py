"""What every ``session-sync`` command shares: settings from the environment, one-line errors, exit codes.

Exit codes (``worker.checks``): 1 a failure, 2 a bad setting, 3 Pangea refused PANGEA_AUTHN_TOKEN.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from worker import checks, errors, models, runtime
from worker import settings as settings_mod
from worker.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

#: A local row id on the command line (a session, an outbox event): anything else is a usage error.
ROW_ID = click.IntRange(1, models.MAX_ROW_ID)


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click stubs
    """A duration on the command line, as in settings: ``30`` (seconds), ``30s``, ``5m``, ``2h``; above zero.

    Converts to seconds (a float), at most ``limit``.
    """

    name = "duration"

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            try:
                seconds = settings_mod.parse_duration(str(value)).total_seconds()
            except (ValueError, OverflowError):
                self.fail(f"{value!r} is not a duration such as 30s, 5m or 2h", param, ctx)
        if not (math.isfinite(seconds) and 0 < seconds <= self.limit):
            self.fail(f"{value} is not a duration above 0 and at most {self.limit:g} s", param, ctx)
        return seconds


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
            sys.exit(checks.EXIT_CONFIG)
        except errors.AuthnRejectedUs as exc:
            click.echo(f"session-sync: Pangea refused PANGEA_AUTHN_TOKEN; nothing was changed ({exc})", err=True)
            sys.exit(checks.EXIT_TOKEN_REFUSED)
        except errors.SessionSyncError as exc:
            click.echo(f"session-sync: {type(exc).__name__}: {exc}", err=True)
            sys.exit(checks.EXIT_FAILURE)
        except sa.exc.DBAPIError as exc:
            # The driver's own words, first line only: never the statement or its parameters.
            said = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            click.echo(
                f"session-sync: database error: {said} (check DATABASE_URL; a new database needs `db upgrade`)",
                err=True,
            )
            sys.exit(checks.EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
