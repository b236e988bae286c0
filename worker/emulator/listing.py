"""Session lists: filters, ordering and the opaque ``last`` cursor of ``/v2/session/list``.

The request body has been validated (``worker.emulator.validation``) before it gets here, so this
module only turns it into a :class:`Query` and runs it. Filters that name ids (``active_token_id``,
``id``, ``identity`` and their ``__in`` forms) start from an index instead of scanning every session.

Semantics, from the spec's descriptions: a bare key means *equals*; ``__in`` *equals one of*;
``__contains`` *includes each substring* (for ``profile_<name>__contains``: *one of*); ``__gt``,
``__gte``, ``__lt``, ``__lte`` compare times. ``username`` is the user's email here (the emulator has
no separate usernames). Sessions whose refresh token expired are never listed.

The cursor is keyset-based (the sort key and id of the last item sent, base64url JSON), so a page
is neither skipped nor repeated when sessions end between two calls.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from worker.emulator import store

#: Page size when the request names none (Pangea publishes no default).
DEFAULT_SIZE = 20
#: Sort field when the request names none.
DEFAULT_ORDER_BY = "created_at"

Predicate = Callable[[store.Session], bool]
SortKey = tuple[str | int, str]

#: String fields of a session item, as filters and ``order_by`` name them.
TEXT_FIELDS: dict[str, Callable[[store.Session], str]] = {
    "id": lambda s: s.id,
    "identity": lambda s: s.identity,
    "email": lambda s: s.email,
    "username": lambda s: s.email,
    "type": lambda s: "session",
    "active_token_id": lambda s: s.active.id,
}
#: Time fields, compared in whole microseconds.
TIME_FIELDS: dict[str, Callable[[store.Session], float]] = {
    "created_at": lambda s: s.created_at,
    "expire": lambda s: s.refresh.expire,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TIME_OPS: dict[str, Callable[[int, int], bool]] = {
    "": lambda a, b: a == b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


class BadCursor(ValueError):
    """Raised when ``last`` is not a cursor this emulator handed out."""


def micros(t: float) -> int:
    """Epoch seconds (from 0 on) as whole microseconds, exactly as ``wire.isotime`` shows them.

    ``datetime.fromtimestamp`` rounds the same way (whole seconds, then the fraction times 10⁶
    rounded half to even), without building a datetime and a timedelta for every session listed.
    """
    whole = int(t)
    return whole * 1_000_000 + round((t - whole) * 1e6)


def parse_micros(text: str) -> int:
    """Whole epoch microseconds of an ISO-8601 date-time (``Z`` or an offset; naive is UTC); ValueError if bad."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _MICROSECOND


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """One list request: the filter (validated JSON), order, page size and cursor."""

    filter: Mapping[str, Any]
    order_by: str = DEFAULT_ORDER_BY
    descending: bool = False
    size: int = DEFAULT_SIZE
    last: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Query:
        """A Query from a validated list request body."""
        size = body.get("size")
        return cls(
            filter=body.get("filter") or {},
            order_by=body.get("order_by") or DEFAULT_ORDER_BY,
            descending=body.get("order") == "desc",
            size=int(size) if size is not None else DEFAULT_SIZE,
            last=body.get("last") or None,
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of sessions, the cursor to the next page (``""`` on the last) and the total count."""

    sessions: list[store.Session]
    last: str
    count: int


def run(state: store.Store, query: Query, now: float, *, identity: str | None = None) -> Page:
    """The page of live sessions (of ``identity`` only, if given) that ``query`` asks for.

    Raises BadCursor if ``last`` is not a cursor from a previous page.
    """
    predicates = [_predicate(key, value) for key, value in query.filter.items()]
    matching = [
        s
        for s in _candidates(state, query.filter, identity)
        if s.refresh.expire > now and all(p(s) for p in predicates)
    ]
    sort_key = _sort_key(query.order_by)
    ordered = sorted(((sort_key(s), s) for s in matching), key=lambda pair: pair[0])
    keys = [k for k, _ in ordered]
    if query.last is None:
        rest = ordered[::-1] if query.descending else ordered
    else:
        cursor = decode_cursor(query.last, time_field=query.order_by in TIME_FIELDS)
        rest = ordered[: bisect_left(keys, cursor)][::-1] if query.descending else ordered[bisect_right(keys, cursor) :]
    page = rest[: query.size]
    last = encode_cursor(page[-1][0]) if len(rest) > query.size else ""
    return Page([s for _, s in page], last, len(matching))


def encode_cursor(key: SortKey) -> str:
    """The opaque ``last`` value for a sort key."""
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode("ascii").rstrip("=")


def decode_cursor(text: str, *, time_field: bool) -> SortKey:
    """The sort key inside a ``last`` value; BadCursor if it is not one of ours."""
    try:
        value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise BadCursor(str(exc)) from exc
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], str)):
        raise BadCursor("not a cursor")
    key = value[0]
    if time_field and not (isinstance(key, int) and not isinstance(key, bool)):
        raise BadCursor("not a cursor for a time field")
    if not time_field and not isinstance(key, str):
        raise BadCursor("not a cursor for a text field")
    return (key, value[1])


def _sort_key(order_by: str) -> Callable[[store.Session], SortKey]:
    if order_by in TIME_FIELDS:
        get_time = TIME_FIELDS[order_by]
        return lambda s: (micros(get_time(s)), s.id)
    get_text = TEXT_FIELDS[order_by]
    return lambda s: (get_text(s), s.id)


def _candidates(state: store.Store, flt: Mapping[str, Any], identity: str | None) -> Iterable[store.Session]:
    """The smallest index slice that can hold every match (the predicates still decide)."""
    if identity is not None:
        return list(state.by_user.get(identity, {}).values())
    for key, index in (("active_token_id", state.by_active_id), ("id", state.sessions)):
        if key in flt:
            return _pick(index, [flt[key]])
        if f"{key}__in" in flt:
            return _pick(index, flt[f"{key}__in"])
    if "identity" in flt or "identity__in" in flt:
        users = [flt["identity"]] if "identity" in flt else flt["identity__in"]
        return [s for user in dict.fromkeys(users) for s in state.by_user.get(user, {}).values()]
    return list(state.sessions.values())


def _pick(index: Mapping[str, store.Session], wanted: Iterable[str]) -> list[store.Session]:
    found = (index.get(key) for key in dict.fromkeys(wanted))
    return list({id(s): s for s in found if s is not None}.values())


def _predicate(key: str, value: Any) -> Predicate:
    """The test one filter entry applies to a session (keys were validated upstream)."""
    if key.startswith("profile_"):
        return _profile_predicate(key.removeprefix("profile_"), value)
    name, _, op = key.partition("__")
    if name in TIME_FIELDS:
        get_time, compare, bound = TIME_FIELDS[name], _TIME_OPS[op], parse_micros(value)
        return lambda s: compare(micros(get_time(s)), bound)
    if name == "enabled":
        return lambda s: value is True
    if name == "scopes":
        return lambda s: not value  # sessions carry no scopes: only "no scopes required" matches
    get_text = TEXT_FIELDS[name]
    if op == "in":
        wanted = frozenset(value)
        return lambda s: get_text(s) in wanted
    if op == "contains":
        return lambda s: all(part in get_text(s) for part in value)
    return lambda s: get_text(s) == value


def _profile_predicate(key: str, value: Any) -> Predicate:
    name, _, op = key.partition("__")
    if op == "exists":
        return lambda s: (name in s.profile) is value
    if op == "contains":
        return lambda s: name in s.profile and any(part in s.profile[name] for part in value)
    return lambda s: s.profile.get(name) == value
