"""Log output: plain text or one JSON object per line, and a filter that scrubs anything token-shaped.

``SESSION_SYNC_LOG_FORMAT=json`` makes every record one line such as::

    {"time": "2026-11-28T09:15:02.117Z", "level": "INFO", "logger": "worker.operations",
     "message": "Sweep fanned out", "action": "sweep", "slot": "...", "due": 12, "batches": 1}

with the stable ``extra`` keys the code passes (``action``, ``session_id``, ``slot``, ...), the Celery
task's id and name when the record comes from inside a task, and the traceback as ``exception``.

Tokens never reach a log on purpose (design invariant 4). :class:`RedactingFilter` is the last line
of defence if one ever does: on every handler it rewrites the message, the string extras and the
traceback, replacing Pangea tokens and codes (``ptu_``/``ptr_``/``pts_``/``pcl_``/``pmc_`` + 32
base32 characters), JWTs, ``Bearer`` credentials and Fernet ciphertexts with ``[REDACTED]``.

Wired at the edges: :func:`install` on the handlers Celery sets up (``worker.celery``, through
``after_setup_logger``), :func:`configure` for the command line (``worker.cli``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, Literal, TextIO

#: What replaces a secret.
REDACTED = "[REDACTED]"

#: Pangea secrets: user, refresh, service and client tokens, and one-time login codes.
_PANGEA = re.compile(r"\b(ptu|ptr|pts|pcl|pmc)_[a-z2-7]{32,}", re.IGNORECASE)
#: A JWT: three base64url parts, the first a JSON header (``{"`` encodes as ``eyJ``).
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
#: An RFC 6750 credential; ``Bearer realm="..."`` (a WWW-Authenticate challenge) is left alone.
_BEARER = re.compile(r"\b(Bearer)\s+(?!(?:realm|scope|error|error_description)=)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
#: A Fernet token (what tokens look like at rest): version byte 0x80 encodes as ``gAAAAA``.
_FERNET = re.compile(r"\bgAAAAA[A-Za-z0-9_-]{20,}={0,2}")

#: LogRecord attributes that are not ``extra`` keys.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
#: Text lines: time, level, logger, message.
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"

LogFormat = Literal["text", "json"]


def redact(text: str) -> str:
    """``text`` with every token-shaped substring replaced by ``[REDACTED]`` (prefixes kept for context)."""
    text = _BEARER.sub(lambda m: f"{m[1]} {REDACTED}", text)
    text = _PANGEA.sub(lambda m: f"{m[1]}_{REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    return _FERNET.sub(REDACTED, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Scrubs token-shaped strings from a record's message, extras and traceback; never drops a record."""

    _exceptions = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place (the message is rendered once, then its args are dropped)."""
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not hide the record
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exceptions.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD:
                record.__dict__[key] = _redact_value(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the extras, task id/name, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (redacted once more as a whole)."""
        at = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, Any] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        line.update(_task_context(line))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return redact(json.dumps(line, default=str, ensure_ascii=False))


def _task_context(line: dict[str, Any]) -> dict[str, Any]:
    """The running Celery task's id and name, when the record was made inside one."""
    if "task_id" in line or "celery" not in sys.modules:
        return {}
    from celery import current_task

    request = getattr(current_task, "request", None) if current_task else None
    task_id = getattr(request, "id", None)
    return {"task_id": task_id, "task_name": current_task.name} if task_id else {}


def formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter for ``SESSION_SYNC_LOG_FORMAT``."""
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


#: Libraries that log every HTTP request at INFO: under a worker's INFO logging that is one line per
#: Pangea call, costing more than our side of the call. They log at WARNING unless set otherwise.
NOISY_LOGGERS = ("httpx", "httpcore")


def quiet_noisy_loggers() -> None:
    """Raise :data:`NOISY_LOGGERS` to WARNING, unless someone set their level already."""
    for name in NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.WARNING)


def install(handlers: Iterable[logging.Handler], fmt: LogFormat) -> None:
    """Put the redaction filter on each handler (once), and the JSON formatter when ``fmt`` is json.

    In text mode a handler keeps the formatter it has (Celery's own, colours and all).
    """
    quiet_noisy_loggers()
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if fmt == "json":
            handler.setFormatter(JsonFormatter())


class _CliHandler(logging.StreamHandler[TextIO]):
    """The command line's stderr handler (a type of its own, so configuring twice replaces it)."""


def configure(fmt: LogFormat, *, level: int = logging.WARNING) -> None:
    """Log to stderr in ``fmt`` from the command line: warnings and errors by default, as before."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(old)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    install([handler], fmt)  # quiets the noisy loggers too
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
