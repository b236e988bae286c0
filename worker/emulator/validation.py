"""Request validation with Pangea's error codes: each endpoint's body, as the OpenAPI spec declares it.

A :data:`Check` takes a decoded JSON value and its JSON pointer and returns the list of errors,
each ``{"code", "detail", "source"}`` as in the spec's ``pangea-validation-errors``. Every error is
reported, not only the first. Codes used: ``FieldRequired``, ``UnexpectedProperty``,
``DoesNotMatchPattern``, ``NotEnumMember``, ``BadFormatDateTime``, ``IsTooSmall`` and the type codes
(``InvalidString``, ``InvalidInteger``, ``InvalidBool``, ``InvalidArray``, ``InvalidObject``).

The emulator is stricter than the spec in one place: ``/v2/session/list`` and its ``filter`` are
open objects in the spec, but unknown keys are refused here too (``UnexpectedProperty``), so that a
client's typo fails loudly in tests instead of silently listing every session.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.emulator import listing

Error = dict[str, str]
Check = Callable[[Any, str], list[Error]]

TOKEN = re.compile(r"^(p(ti|tr|ts|tu|cl)_[a-z2-7]{32})|([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$")
USER_TOKEN = re.compile(r"^(ptu_[a-z2-7]{32})|([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$")
REFRESH_TOKEN = re.compile(r"^ptr_[a-z2-7]{32}$")
TOKEN_ID = re.compile(r"^pmt_[a-z2-7]{32}$")
TICKET = re.compile(r"^p[a-z][a-z2]_[a-z2-7]{32}$")
FLOW_ID = re.compile(r"^pfl_[a-z2-7]{32}$")
IDENTITY = re.compile(r"^[a-zA-Z0-9 '.:/_-]+$")
#: ``profile_<name>``, ``profile_<name>__contains``, ``profile_<name>__exists`` (names may hold ``_``).
PROFILE_KEY = re.compile(r"^profile_([A-Za-z](?:_?[A-Za-z0-9])*)(__contains|__exists)?$")


def error(code: str, detail: str, source: str) -> Error:
    """One entry of ``result.errors``."""
    return {"code": code, "detail": detail, "source": source}


def pointer(base: str, key: str) -> str:
    """The JSON pointer of ``key`` inside the object at ``base`` (RFC 6901 escaping)."""
    return f"{base}/{key.replace('~', '~0').replace('/', '~1')}"


def string(pattern: re.Pattern[str] | None = None) -> Check:
    """A string, matching ``pattern`` if given (searched, not anchored: JSON Schema's semantics)."""

    def check(value: Any, at: str) -> list[Error]:
        if not isinstance(value, str):
            return [error("InvalidString", "must be a string", at)]
        if pattern is not None and pattern.search(value) is None:
            return [error("DoesNotMatchPattern", f"does not match pattern {pattern.pattern}", at)]
        return []

    return check


def boolean(value: Any, at: str) -> list[Error]:
    """A JSON boolean."""
    return [] if isinstance(value, bool) else [error("InvalidBool", "must be a boolean", at)]


def integer(minimum: int) -> Check:
    """An integer (2.0 counts, as in JSON Schema) not below ``minimum``."""

    def check(value: Any, at: str) -> list[Error]:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [error("InvalidInteger", "must be an integer", at)]
        if isinstance(value, float) and not value.is_integer():
            return [error("InvalidInteger", "must be an integer", at)]
        if value < minimum:
            return [error("IsTooSmall", f"must be at least {minimum}", at)]
        return []

    return check


def enum(*values: str) -> Check:
    """One of ``values``."""

    def check(value: Any, at: str) -> list[Error]:
        if not isinstance(value, str):
            return [error("InvalidString", "must be a string", at)]
        if value not in values:
            return [error("NotEnumMember", f"must be one of {', '.join(values)}", at)]
        return []

    return check


def date_time(value: Any, at: str) -> list[Error]:
    """An ISO-8601 date-time string."""
    if not isinstance(value, str):
        return [error("InvalidString", "must be a string", at)]
    try:
        listing.parse_micros(value)
    except (ValueError, OverflowError, OSError):
        return [error("BadFormatDateTime", "must be an ISO-8601 date-time", at)]
    return []


def array_of(item: Check) -> Check:
    """A JSON array whose every item passes ``item``."""

    def check(value: Any, at: str) -> list[Error]:
        if not isinstance(value, list):
            return [error("InvalidArray", "must be an array", at)]
        return [e for i, v in enumerate(value) for e in item(v, f"{at}/{i}")]

    return check


def obj(
    fields: Mapping[str, Check],
    *,
    required: tuple[str, ...] = (),
    extra: Callable[[str], Check | None] | None = None,
) -> Check:
    """A JSON object with these ``fields``; ``extra`` may accept more keys by name (else UnexpectedProperty)."""

    def check(value: Any, at: str) -> list[Error]:
        if not isinstance(value, dict):
            return [error("InvalidObject", "must be an object", at)]
        errors = [
            error("FieldRequired", f"'{name}' is required", pointer(at, name)) for name in required if name not in value
        ]
        for key, item in value.items():
            rule = fields.get(key) or (extra(key) if extra is not None else None)
            if rule is None:
                errors.append(error("UnexpectedProperty", f"'{key}' is not allowed", pointer(at, key)))
            else:
                errors.extend(rule(item, pointer(at, key)))
        return errors

    return check


def _filter_fields() -> dict[str, Check]:
    strings = array_of(string())
    rules: dict[str, Check] = {"enabled": boolean, "scopes": strings}
    for name in ("active_token_id", "email", "username", "id", "identity", "type"):
        rules |= {name: string(), f"{name}__contains": strings, f"{name}__in": strings}
    for name in ("created_at", "expire"):
        rules |= {name: date_time} | {f"{name}__{op}": date_time for op in ("gt", "gte", "lt", "lte")}
    return rules


def _profile_rule(key: str) -> Check | None:
    found = PROFILE_KEY.match(key)
    if found is None:
        return None
    return {None: string(), "__contains": array_of(string()), "__exists": boolean}[found.group(2)]


#: The ``filter``, ``order``, ``order_by``, ``size`` and ``last`` fields shared by both session lists.
LIST_FIELDS: dict[str, Check] = {
    "filter": obj(_filter_fields(), extra=_profile_rule),
    "last": string(),
    "order": enum("asc", "desc"),
    "order_by": enum("id", "created_at", "type", "identity", "email", "expire", "active_token_id"),
    "size": integer(1),
}

#: Each endpoint's request body, keyed by path.
BODIES: dict[str, Check] = {
    "/v2/client/userinfo": obj({"code": string(TICKET), "flow_id": string(FLOW_ID)}, required=("code",)),
    "/v2/client/token/check": obj({"token": string(TOKEN)}, required=("token",)),
    "/v2/client/session/refresh": obj(
        {"refresh_token": string(REFRESH_TOKEN), "user_token": string(USER_TOKEN)}, required=("refresh_token",)
    ),
    "/v2/client/session/logout": obj({"token": string(USER_TOKEN)}, required=("token",)),
    "/v2/client/session/list": obj(LIST_FIELDS | {"token": string(USER_TOKEN)}, required=("token",)),
    "/v2/client/session/invalidate": obj(
        {"token": string(USER_TOKEN), "session_id": string(TOKEN_ID)}, required=("token", "session_id")
    ),
    "/v2/client/jwks": obj({}),
    "/v2/session/list": obj(LIST_FIELDS),
    "/v2/session/logout": obj({"user_id": string(IDENTITY)}, required=("user_id",)),
    "/v2/session/invalidate": obj(
        {"session_id": string(TOKEN_ID), "user_initiated": boolean}, required=("session_id",)
    ),
}


#: The endpoints whose requests :class:`ListLimits` bounds.
LIST_PATHS = frozenset({"/v2/session/list", "/v2/client/session/list"})


@dataclass(frozen=True, slots=True)
class ListLimits:
    """Limits a Pangea might set on list requests (it publishes none); None: no limit."""

    max_size: int | None = None
    max_filter_ids: int | None = None


def list_limits(body: Mapping[str, Any], limits: ListLimits) -> list[Error]:
    """The errors of a valid list request that breaks ``limits``: ``size`` too big, a ``__in`` list too long."""
    found: list[Error] = []
    size = body.get("size")
    if limits.max_size is not None and size is not None and size > limits.max_size:
        found.append(error("IsTooBig", f"must be at most {limits.max_size}", "/size"))
    if limits.max_filter_ids is not None:
        for key, value in (body.get("filter") or {}).items():
            if key.endswith("__in") and len(value) > limits.max_filter_ids:
                detail = f"must hold at most {limits.max_filter_ids} items"
                found.append(error("AboveMaxItems", detail, pointer("/filter", key)))
    return found
