"""Injected faults: what ``POST /emulator/faults`` sets and how one request draws its fate.

``{"latency_ms", "error_rate", "error", "retry_after", "paths"}``, all optional; ``{}`` clears.
``latency_ms`` delays every request in scope; then, with probability ``error_rate``, ``error``
happens instead of (or, for ``Dropped``, after) the real answer:

- ``InternalError``: HTTP 500 with a proper envelope; nothing performed.
- ``TooManyRequests``: HTTP 429 with a proper envelope and ``Retry-After``; nothing performed.
- ``Malformed``: HTTP 200 whose body is an HTML page, not Pangea's envelope; nothing performed.
- ``Timeout``: no answer for :data:`HOLD_SECONDS` (released early when the client hangs up, or on
  reset); nothing performed.
- ``Dropped``: the request *is performed*, then the connection is cut part-way through the answer.
- ``NotJson``: HTTP 200 labelled ``application/json`` whose body is a proxy's plain-text error;
  nothing performed.
- ``Huge``: HTTP 200, a well-formed envelope of :data:`HUGE_BYTES` (padding in ``result``), far
  larger than any real answer; nothing performed.
- ``WrongContentType``: the request *is performed* and its real envelope sent, labelled
  ``text/html`` as a misconfigured proxy would.
- ``ValidationError``: HTTP 400 ``ValidationError`` whose ``result.errors`` blames the whole body
  (a Pangea refusing a request however small); nothing performed.

``error`` alone means ``error_rate`` 1; ``error_rate`` alone means ``InternalError``. ``paths``
limits faults to those API paths. Faults never touch ``/emulator/*``.

``http_codes`` (``{"InvalidToken": 401, ...}``) changes the HTTP code that answers with a status
come with, on every path, over the emulator's own setting (``create_app(http_codes=...)``,
``EMULATOR_HTTP_CODES``): Pangea documents no code for InvalidToken or ExpiredToken, so a client
must give the same result under any plausible one. Clearing the faults restores the setting.

``max_size`` and ``max_filter_ids`` play a Pangea with list limits (it publishes none): a session
list asking for a larger ``size``, or naming more ids in one ``__in`` filter, is refused with HTTP
400 ``ValidationError`` and ``result.errors`` (``IsTooBig`` at ``/size``, ``AboveMaxItems`` at
``/filter/<key>``). They go over the emulator's settings (``create_app(max_size=...,
max_filter_ids=...)``, ``EMULATOR_MAX_LIST_SIZE``, ``EMULATOR_MAX_FILTER_IDS``) the same way.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The fault kinds ``error`` may name.
KINDS = (
    "InternalError",
    "TooManyRequests",
    "Malformed",
    "Timeout",
    "Dropped",
    "NotJson",
    "Huge",
    "WrongContentType",
    "ValidationError",
)
#: Size of a ``Huge`` answer's body in bytes.
HUGE_BYTES = 32 << 20
#: How long a ``Timeout`` fault holds a request: far longer than any sane client timeout.
HOLD_SECONDS = 60.0
#: Retry-After sent with ``TooManyRequests`` when the fault names none, in seconds.
DEFAULT_RETRY_AFTER = 1.0
#: Statuses whose HTTP code ``http_codes`` may choose (every status the emulator answers with).
CODED_STATUSES = (
    "Success",
    "ValidationError",
    "InvalidToken",
    "ExpiredToken",
    "Unauthorized",
    "NotFound",
    "TooManyRequests",
    "InternalError",
)
_KEYS = frozenset(
    {"latency_ms", "error_rate", "error", "retry_after", "paths", "http_codes", "max_size", "max_filter_ids"}
)


class BadFaults(ValueError):
    """Raised when a fault body is not valid; the message says which key is wrong."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """The faults in force (the default is none)."""

    latency_ms: int = 0
    error_rate: float = 0.0
    error: str | None = None
    retry_after: float = DEFAULT_RETRY_AFTER
    paths: frozenset[str] = frozenset()
    #: HTTP code by envelope status, over the emulator's setting (every path, whatever ``paths`` says).
    http_codes: Mapping[str, int] = field(default_factory=dict)
    #: Largest ``size`` a session list accepts (None: the emulator's setting).
    max_size: int | None = None
    #: Most ids a session list's ``__in`` filter accepts (None: the emulator's setting).
    max_filter_ids: int | None = None

    @property
    def active(self) -> bool:
        """Whether any fault is set at all (the fast path checks this first)."""
        return self.latency_ms > 0 or (self.error is not None and self.error_rate > 0)

    def applies_to(self, path: str) -> bool:
        """Whether a request on ``path`` is in scope."""
        return self.active and (not self.paths or path in self.paths)

    def draw(self, rng: random.Random) -> str | None:
        """The fault kind this request suffers, if any (one draw per request)."""
        if self.error is None or self.error_rate <= 0:
            return None
        return self.error if rng.random() < self.error_rate else None

    def to_json(self) -> dict[str, Any]:
        """The faults as ``POST /emulator/faults`` would take them back."""
        return {
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "error": self.error,
            "retry_after": self.retry_after,
            "paths": sorted(self.paths),
            "http_codes": dict(self.http_codes),
            "max_size": self.max_size,
            "max_filter_ids": self.max_filter_ids,
        }


def parse(body: Any, api_paths: Collection[str]) -> Faults:
    """Faults from a request body; BadFaults names the first bad key."""
    if not isinstance(body, dict):
        raise BadFaults("the body must be a JSON object")
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        raise BadFaults(f"unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_KEYS))}")
    latency = body.get("latency_ms", 0)
    if not _is_number(latency) or latency < 0 or latency > HOLD_SECONDS * 1000:
        raise BadFaults("latency_ms must be a number of milliseconds between 0 and 60000")
    error = body.get("error")
    if error is not None and error not in KINDS:
        raise BadFaults(f"error must be one of {', '.join(KINDS)}")
    rate = body.get("error_rate", 1.0 if error is not None else 0.0)
    if not _is_number(rate) or not 0 <= rate <= 1:
        raise BadFaults("error_rate must be a number between 0 and 1")
    retry_after = body.get("retry_after", DEFAULT_RETRY_AFTER)
    if not _is_number(retry_after) or not 0 <= retry_after <= 86400:
        raise BadFaults("retry_after must be a number of seconds between 0 and 86400")
    paths = body.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BadFaults("paths must be a list of strings")
    strangers = sorted(set(paths) - set(api_paths))
    if strangers:
        raise BadFaults(f"paths must be API paths, not {strangers[0]!r}")
    if error is None and rate > 0:
        error = "InternalError"
    return Faults(
        latency_ms=int(latency),
        error_rate=float(rate),
        error=error,
        retry_after=float(retry_after),
        paths=frozenset(paths),
        http_codes=parse_http_codes(body.get("http_codes", {}), "http_codes"),
        max_size=parse_limit(body.get("max_size"), "max_size"),
        max_filter_ids=parse_limit(body.get("max_filter_ids"), "max_filter_ids"),
    )


def parse_limit(value: Any, name: str) -> int | None:
    """A list limit: an integer from 1, or None for none; BadFaults (naming ``name``) if wrong."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadFaults(f"{name} must be an integer from 1 (or null: no limit)")
    return value


def limit_from_text(text: str, name: str) -> int | None:
    """A list limit from an environment variable's text ("" or unset: no limit)."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise BadFaults(f"{name} must be an integer from 1 (or empty: no limit)")
    return parse_limit(int(text), name)


def parse_http_codes(value: Any, name: str) -> dict[str, int]:
    """HTTP codes by status from ``{"InvalidToken": 401, ...}``; BadFaults (naming ``name``) if wrong."""
    if not isinstance(value, dict):
        raise BadFaults(f"{name} must be an object of status: HTTP code")
    for status, code in value.items():
        if status not in CODED_STATUSES:
            raise BadFaults(f"{name}: {status!r} is not one of {', '.join(CODED_STATUSES)}")
        if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599:
            raise BadFaults(f"{name}: the code for {status} must be an integer from 200 to 599")
    return dict(value)


def http_codes_from_text(text: str, name: str) -> dict[str, int]:
    """HTTP codes by status from ``InvalidToken=401,ExpiredToken=401`` (an environment variable's form)."""
    pairs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        status, sep, code = item.partition("=")
        if not sep or not code.strip().isdigit():
            raise BadFaults(f"{name}: expected Status=code pairs separated by commas, e.g. InvalidToken=401")
        pairs[status.strip()] = int(code)
    return parse_http_codes(pairs, name)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
