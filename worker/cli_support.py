"""What every ``session-sync`` command shares: settings from the environment, one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from worker import errors, runtime
from worker.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


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

    return wrapper  # type: ignore[return-value]
