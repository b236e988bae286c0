"""Pangea AuthN's wire format: the response envelope, parsed strictly, and typed results.

Pure data in, data out: no I/O here. ``worker.authn`` sends requests and hands the raw answer to
:func:`parse_envelope`; everything that is not Pangea's envelope becomes ``AuthnProtocolError``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import msgspec
import orjson

from worker import errors, frozen

T = TypeVar("T")

#: The six keys of every Pangea response, no more, no fewer.
ENVELOPE_KEYS = frozenset({"request_id", "request_time", "response_time", "status", "summary", "result"})

_FRACTION = re.compile(r"\.(\d{6})\d+")


class Verdict(enum.StrEnum):
    """Pangea's answer about a user token: the only values that may revoke a local session."""

    VALID = "valid"  #: Success
    EXPIRED = "expired"  #: ExpiredToken
    INVALID = "invalid"  #: InvalidToken


class Outcome(enum.StrEnum):
    """What one answer from Pangea means, before any endpoint looks at its ``result``."""

    VALID = "valid"  #: Success (under HTTP 200 only): a verdict
    EXPIRED = "expired"  #: ExpiredToken: a verdict about the token we sent
    INVALID = "invalid"  #: InvalidToken: a verdict about the token we sent
    REFUSED = "refused"  #: Pangea refused the request itself (ValidationError, NotFound): never a verdict
    REJECTED_US = "rejected_us"  #: Unauthorized: our own PANGEA_AUTHN_TOKEN; the only answer that stops a sweep
    RATE_LIMITED = "rate_limited"  #: TooManyRequests, or a bare HTTP 429: a throttle
    UNAVAILABLE = "unavailable"  #: a server error: no answer, retried
    PROTOCOL = "protocol"  #: not Pangea's answer, or a status we do not know: no answer, retried


#: The one table of Pangea's statuses. The official SDKs branch on ``status`` alone, and the HTTP
#: codes of InvalidToken / ExpiredToken are documented nowhere (400? 401 "to mirror Unauthorized"?),
#: so the envelope decides whatever the HTTP code: see :func:`outcome_of` for the three exceptions.
#: A status missing here is no answer (PROTOCOL), never a verdict. Keep in step with the README's
#: "How the sync decides".
STATUS_OUTCOMES: Mapping[str, Outcome] = {
    "Success": Outcome.VALID,
    "ExpiredToken": Outcome.EXPIRED,
    "InvalidToken": Outcome.INVALID,
    "ValidationError": Outcome.REFUSED,
    "NotFound": Outcome.REFUSED,
    "Unauthorized": Outcome.REJECTED_US,
    "TooManyRequests": Outcome.RATE_LIMITED,
    "InternalError": Outcome.UNAVAILABLE,
    "ServiceNotAvailable": Outcome.UNAVAILABLE,
    "NoCredit": Outcome.UNAVAILABLE,
    "ServiceNotEnabled": Outcome.UNAVAILABLE,
}

#: HTTP codes that refuse a request for its size even without an envelope (a proxy's 413, 414, 431).
SHAPE_CODES = frozenset({413, 414, 431})

#: The verdict each verdict outcome stands for.
VERDICTS: Mapping[Outcome, Verdict] = {
    Outcome.VALID: Verdict.VALID,
    Outcome.EXPIRED: Verdict.EXPIRED,
    Outcome.INVALID: Verdict.INVALID,
}


def outcome_of(http: int, status: str | None) -> Outcome:
    """What an answer means, from its HTTP code and its envelope's ``status`` (None: no envelope).

    The envelope decides (:data:`STATUS_OUTCOMES`), with three exceptions:

    - HTTP 5xx is a server error whatever its body says: a verdict needs a server that worked
      (design invariant 1: a 5xx never revokes);
    - ``Success`` counts only under HTTP 200 (as the Go SDK requires); under any other code the
      answer is not plainly Pangea's (PROTOCOL: retried, never a verdict);
    - without an envelope (a proxy's page, a body that is not Pangea's) only the HTTP code can
      speak: 429 is a throttle, 413/414/431 a refusal of the request's size (:data:`SHAPE_CODES`),
      anything else is no answer.
    """
    if http >= 500:
        return Outcome.UNAVAILABLE
    if status is None:
        if http in SHAPE_CODES:
            return Outcome.REFUSED
        return Outcome.RATE_LIMITED if http == 429 else Outcome.PROTOCOL
    outcome = STATUS_OUTCOMES.get(status, Outcome.PROTOCOL)
    if outcome is Outcome.VALID and http != 200:
        return Outcome.PROTOCOL
    return outcome


def refusal_sources(result: object) -> tuple[str, ...] | None:
    """The JSON pointers a refusal blames (``result.errors[*].source``); None if it lists no errors."""
    found = result.get("errors") if isinstance(result, dict) else None
    if not isinstance(found, list) or not found:
        return None
    return tuple(e["source"] for e in found if isinstance(e, dict) and isinstance(e.get("source"), str))


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed Pangea response envelope."""

    status: str
    summary: str
    result: Any
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenInfo:
    """A token object (``authn-token-info-creds``/``-nocreds``); ``token`` is the secret, when sent."""

    id: str
    type: str
    identity: str
    email: str
    expire: datetime
    life: int
    created_at: datetime
    profile: Mapping[str, str]
    scopes: tuple[str, ...] = ()
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_wire(cls, data: object, *, where: str) -> TokenInfo:
        """A TokenInfo from a decoded JSON object; AuthnProtocolError names the bad field."""
        fast = _token_info(data)
        return fast if fast is not None else cls._checked(data, where)

    @classmethod
    def _checked(cls, data: object, where: str) -> TokenInfo:
        """:meth:`from_wire` field by field: slower, and it names the field that is wrong."""
        obj = _object(data, where)
        token = obj.get("token")
        scopes = obj.get("scopes") or []
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise errors.AuthnProtocolError(f"{where}.scopes is not a list of strings")
        return cls(
            id=_str(obj, "id", where),
            type=_str(obj, "type", where),
            identity=_str(obj, "identity", where),
            email=_str(obj, "email", where),
            expire=_datetime(obj, "expire", where),
            life=_int(obj, "life", where),
            created_at=_datetime(obj, "created_at", where),
            profile=_profile(obj.get("profile"), where),
            scopes=tuple(scopes),
            token=token if isinstance(token, str) else None,
        )

    def to_wire(self) -> dict[str, Any]:
        """The token object as Pangea sends it (the inverse of :meth:`from_wire`)."""
        data: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "life": self.life,
            "expire": self.expire.isoformat(),
            "identity": self.identity,
            "email": self.email,
            "profile": dict(self.profile),
            "created_at": self.created_at.isoformat(),
            "scopes": list(self.scopes),
        }
        if self.token is not None:
            data["token"] = self.token
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCreds:
    """What ``/v2/client/userinfo`` and ``/v2/client/session/refresh`` return: both tokens, with secrets."""

    active_token: TokenInfo
    refresh_token: TokenInfo
    request_id: str

    @classmethod
    def from_wire(cls, result: object, *, request_id: str) -> SessionCreds:
        """SessionCreds from an envelope's ``result``; both tokens must carry their secret."""
        obj = _object(result, "result")
        active = TokenInfo.from_wire(obj.get("active_token"), where="result.active_token")
        refresh = TokenInfo.from_wire(obj.get("refresh_token"), where="result.refresh_token")
        if active.token is None or refresh.token is None:
            raise errors.AuthnProtocolError("result tokens carry no secret")
        return cls(active_token=active, refresh_token=refresh, request_id=request_id)

    def to_userinfo(self) -> dict[str, Any]:
        """The ``/v2/client/userinfo`` envelope these credentials came in (what ``record_login`` takes)."""
        return {
            "status": "Success",
            "request_id": self.request_id,
            "result": {"active_token": self.active_token.to_wire(), "refresh_token": self.refresh_token.to_wire()},
        }

    @property
    def session_id(self) -> str:
        """Pangea's session id: the refresh token's ``pmt_`` id."""
        return self.refresh_token.id


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenCheck:
    """Pangea's verdict on one token (``/v2/client/token/check``); ``info`` when valid."""

    verdict: Verdict
    request_id: str
    info: TokenInfo | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Refresh:
    """The answer to a refresh: new credentials when valid, else why the refresh token was refused."""

    verdict: Verdict
    request_id: str
    creds: SessionCreds | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ended:
    """The answer to a logout or invalidate: VALID means ended now, EXPIRED/INVALID means already gone."""

    verdict: Verdict
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionItem:
    """One session of a list (``authn-session-info-nocreds``)."""

    id: str
    identity: str
    email: str
    expire: datetime
    created_at: datetime
    active_token: TokenInfo | None

    @classmethod
    def from_wire(cls, data: object, *, where: str) -> SessionItem:
        """A SessionItem from a decoded JSON object."""
        fast = _session_item(data)
        return fast if fast is not None else cls._checked(data, where)

    @classmethod
    def _checked(cls, data: object, where: str) -> SessionItem:
        """:meth:`from_wire` field by field: slower, and it names the field that is wrong."""
        obj = _object(data, where)
        active = obj.get("active_token")
        return cls(
            id=_str(obj, "id", where),
            identity=_str(obj, "identity", where),
            email=_str(obj, "email", where),
            expire=_datetime(obj, "expire", where),
            created_at=_datetime(obj, "created_at", where),
            active_token=None if active is None else TokenInfo.from_wire(active, where=f"{where}.active_token"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionPage:
    """One page of ``/v2/session/list`` or ``/v2/client/session/list``; ``last`` is "" on the last page."""

    sessions: tuple[SessionItem, ...]
    last: str
    count: int | None
    request_id: str

    @classmethod
    def from_wire(cls, result: object, *, request_id: str) -> SessionPage:
        """A SessionPage from an envelope's ``result``."""
        sessions, last, count = _page(result, _session_item, SessionItem._checked)
        return cls(sessions=sessions, last=last, count=count, request_id=request_id)


@dataclass(frozen=True, slots=True)
class ListedSession:
    """One session of a list as the sync reads it: Pangea's id of the session, and its active token's.

    Finding sessions by their active token ids (bulk revalidation, settling an uncertain refresh)
    reads nothing else of a listed session, so nothing else is parsed or required of it: a page of
    a thousand :class:`SessionItem` cost about five times what these do (docs/benchmarks.md).
    """

    #: Pangea's ``pmt_`` id of the session.
    id: str
    #: Its current active token's id and expiry; None when it carries no active token.
    active_token_id: str | None
    active_expire: datetime | None

    @classmethod
    def from_wire(cls, data: object, *, where: str) -> ListedSession:
        """A ListedSession from a decoded JSON object; AuthnProtocolError names the bad field."""
        fast = _listed_session(data)
        return fast if fast is not None else cls._checked(data, where)

    @classmethod
    def _checked(cls, data: object, where: str) -> ListedSession:
        """:meth:`from_wire` field by field: slower, and it names the field that is wrong."""
        obj = _object(data, where)
        id_ = _str(obj, "id", where)
        if obj.get("active_token") is None:
            return cls(id_, None, None)
        token = _object(obj["active_token"], f"{where}.active_token")
        return cls(id_, _str(token, "id", f"{where}.active_token"), _datetime(token, "expire", f"{where}.active_token"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ListedPage:
    """One page of ``/v2/session/list`` read as :class:`ListedSession` s; ``last`` is "" on the last page."""

    sessions: tuple[ListedSession, ...]
    last: str
    request_id: str

    @classmethod
    def from_wire(cls, result: object, *, request_id: str) -> ListedPage:
        """A ListedPage from an envelope's ``result``."""
        sessions, last, _ = _page(result, _listed_session, ListedSession._checked)
        return cls(sessions=sessions, last=last, request_id=request_id)


def _page(
    result: object, fast: Callable[[object], T | None], checked: Callable[[object, str], T]
) -> tuple[tuple[T, ...], str, int | None]:
    """A list page's ``sessions`` (each read by ``fast``, else by ``checked``, which names the bad
    field), ``last`` and ``count``, their types checked."""
    obj = _object(result, "result")
    items = obj.get("sessions")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise errors.AuthnProtocolError("result.sessions is not a list")
    last = obj.get("last", "")
    count = obj.get("count")
    if not isinstance(last, str) or not (count is None or type(count) is int):
        raise errors.AuthnProtocolError("result.last or result.count has the wrong type")
    sessions = tuple(fast(s) or checked(s, f"result.sessions[{i}]") for i, s in enumerate(items))
    return sessions, last, count


def parse_envelope(body: bytes, *, path: str, header_request_id: str | None) -> Envelope:
    """The envelope of one response body; AuthnProtocolError when it is not exactly Pangea's."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.AuthnProtocolError(
            f"{path}: response is not JSON", path=path, request_id=header_request_id
        ) from None
    if not isinstance(data, dict):
        raise errors.AuthnProtocolError(
            f"{path}: response is not a JSON object", path=path, request_id=header_request_id
        )
    missing = {"request_id", "status", "summary", "result"} - data.keys()
    if missing:
        raise errors.AuthnProtocolError(
            f"{path}: envelope lacks {', '.join(sorted(missing))}", path=path, request_id=header_request_id
        )
    request_id, status, summary = data["request_id"], data["status"], data["summary"]
    if not all(isinstance(v, str) for v in (request_id, status, summary)):
        raise errors.AuthnProtocolError(
            f"{path}: envelope fields have the wrong type", path=path, request_id=header_request_id
        )
    return Envelope(status=status, summary=summary, result=data["result"], request_id=request_id)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _object(data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise errors.AuthnProtocolError(f"{where} is not an object")
    return data


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise errors.AuthnProtocolError(f"{where}.{key} is missing or not a string")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise errors.AuthnProtocolError(f"{where}.{key} is missing or not an integer")
    return value


def _datetime(obj: Mapping[str, Any], key: str, where: str) -> datetime:
    value = _str(obj, key, where)
    try:
        return _time(value)
    except ValueError:
        raise errors.AuthnProtocolError(f"{where}.{key} is not an ISO-8601 date-time") from None


def _time(value: str) -> datetime:
    """An ISO-8601 date-time, UTC when it names no offset; ValueError when it is not one."""
    try:
        parsed = datetime.fromisoformat(value)  # Python 3.11 truncates a fraction past microseconds itself
    except ValueError:
        parsed = datetime.fromisoformat(_FRACTION.sub(r".\1", value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _profile(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise errors.AuthnProtocolError(f"{where}.profile is not an object of strings")
    return dict(value)


# --- the fast path of a session list ------------------------------------------------------------------
#
# A page of a thousand sessions is a thousand session objects and a thousand token objects: checked
# field by field (``_str``, ``_datetime``: a call, a lookup and an error message ready per field)
# and built through a frozen dataclass's ``__init__`` (an ``object.__setattr__`` per field), that was
# about 15 µs of the sweep's CPU per session (docs/benchmarks.md). The functions below accept exactly
# what the checked path accepts, in one pass of type tests, and build the same frozen objects through
# their slots. Anything they do not accept (None) goes to the checked path, which names the field.


_make_token = frozen.positional(TokenInfo)
_make_item = frozen.positional(SessionItem)
_make_listed = frozen.positional(ListedSession)


def _token_info(data: object) -> TokenInfo | None:
    """:meth:`TokenInfo.from_wire` for well-formed data; None when a field is missing or wrong."""
    if type(data) is not dict:
        return None
    get = data.get
    id_, kind, identity, email, life = get("id"), get("type"), get("identity"), get("email"), get("life")
    expire, created, profile, scopes = get("expire"), get("created_at"), get("profile"), get("scopes")
    if not (
        type(id_) is str
        and type(kind) is str
        and type(identity) is str
        and type(email) is str
        and type(life) is int
        and type(expire) is str
        and type(created) is str
        and (not scopes or (type(scopes) is list and all(type(x) is str for x in scopes)))
        and (profile is None or (type(profile) is dict and all(type(v) is str for v in profile.values())))
    ):
        return None
    try:
        expire_at, created_at = _time(expire), _time(created)
    except ValueError:
        return None
    token = get("token")
    return cast(
        TokenInfo,
        _make_token(
            id_,
            kind,
            identity,
            email,
            expire_at,
            life,
            created_at,
            dict(profile) if profile else {},
            tuple(scopes) if scopes else (),
            token if isinstance(token, str) else None,
        ),
    )


def _session_item(data: object) -> SessionItem | None:
    """:meth:`SessionItem.from_wire` for well-formed data; None when a field is missing or wrong."""
    if type(data) is not dict:
        return None
    get = data.get
    id_, identity, email, expire, created = get("id"), get("identity"), get("email"), get("expire"), get("created_at")
    if not (type(id_) is str and type(identity) is str and type(email) is str):
        return None
    if not (type(expire) is str and type(created) is str):
        return None
    active = get("active_token")
    token = None if active is None else _token_info(active)
    if token is None and active is not None:
        return None
    try:
        expire_at, created_at = _time(expire), _time(created)
    except ValueError:
        return None
    return cast(SessionItem, _make_item(id_, identity, email, expire_at, created_at, token))


def _listed_session(data: object) -> ListedSession | None:
    """:meth:`ListedSession.from_wire` for well-formed data; None when a field is missing or wrong."""
    if type(data) is not dict:
        return None
    id_, active = data.get("id"), data.get("active_token")
    if type(id_) is not str:
        return None
    if active is None:
        return cast(ListedSession, _make_listed(id_, None, None))
    if type(active) is not dict:
        return None
    token_id, expire = active.get("id"), active.get("expire")
    if not (type(token_id) is str and type(expire) is str):
        return None
    try:
        return cast(ListedSession, _make_listed(id_, token_id, _time(expire)))
    except ValueError:
        return None


# --- a session list by active token ids, decoded in one pass ---------------------------------------
#
# Bulk revalidation reads a thousand sessions per answer and three fields of each. Decoding the whole
# body into dicts and lists (orjson) and then picking the fields cost more than everything else the
# sweep did per session; msgspec decodes straight into the few fields declared below, checking their
# types and skipping the rest of each object without building it. Only the answer the endpoint hopes
# for is taken this way: anything else (a refusal, a throttle, a body of another shape, a bad date)
# is None here and goes the general way (parse_envelope, ListedPage.from_wire), which classifies it
# and names what is wrong. Both ways make the same page (tests/unit/test_wire.py).

#: Reads an HTTP 200 body into its envelope when it is the answer expected; None for anything else.
Decode = Callable[[bytes], Envelope | None]


class _ListedToken(msgspec.Struct):
    id: str
    expire: str


class _ListedItem(msgspec.Struct):
    id: str
    active_token: _ListedToken | None = None


class _ListedResult(msgspec.Struct):
    sessions: list[_ListedItem] | None = None
    last: str = ""
    count: int | None = None


class _ListedEnvelope(msgspec.Struct):
    request_id: str
    status: str
    summary: str
    result: _ListedResult


_LISTED = msgspec.json.Decoder(_ListedEnvelope)


def decode_listed_page(body: bytes) -> Envelope | None:
    """A ``Success`` answer of ``/v2/session/list`` as an envelope whose result is a :class:`ListedPage`.

    None when the body is anything else; the caller then parses it the general way.
    """
    try:
        env = _LISTED.decode(body)
    except msgspec.DecodeError:  # its ValidationError too: not the shape expected
        return None
    if env.status != "Success":
        return None
    make = _make_listed
    try:
        sessions = tuple(
            make(s.id, None, None) if (t := s.active_token) is None else make(s.id, t.id, _time(t.expire))
            for s in env.result.sessions or ()
        )
    except ValueError:  # a date that is not one: the general way names it
        return None
    page = ListedPage(sessions=sessions, last=env.result.last, request_id=env.request_id)
    return Envelope(status=env.status, summary=env.summary, result=page, request_id=env.request_id)
