"""The web app's side: record a login, authenticate a request, log out.

The app passes its own SQLAlchemy ``Session`` (``db``) and owns the transaction: these functions
flush but never commit, so a login or logout commits together with the app's own writes.
Tokens are encrypted at rest and looked up by keyed hash; ``authenticate`` never calls Pangea.

Two session styles (README "Two session styles"):

- **Server-side session**: :func:`record_login` returns an opaque random handle (``lss_...``) for
  the browser's cookie; Pangea's tokens never leave the server. Only the handle's keyed hash is
  stored. Integer ids stay for tasks and the CLI; they are guessable, so never put one in a cookie.
- **Bearer token** (the guide's style): the browser sends Pangea's active token. When the worker
  refreshes it, the replaced token keeps authenticating for a grace period
  (``SESSION_SYNC_REFRESH_GRACE``) and :attr:`Authenticated.rotated_token` carries the new one
  for the app to hand back.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import random
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import sqlite

from worker import audit, crypto, decisions, errors, models, outbox_queries, sessions_pg, verification, wire
from worker import kick as kick_mod

# The web app's one import path: what an app needs beside these functions, re-exported from where it
# lives (``tests/unit/test_public_face.py`` pins the list). Talking to Pangea (``worker.authn``) is not
# here: it loads httpx, which a web process that only authenticates never needs.
from worker.crypto import TokenCipher
from worker.db import create_engine, is_sqlite, normalize_url, session_factory
from worker.decisions import Policy
from worker.errors import (
    AuthnError,
    AuthnRequestRejected,
    ConfigError,
    InvalidUserinfo,
    LoginConflict,
    SessionInvalid,
    SessionSyncError,
    UnknownSession,
)
from worker.settings import Settings
from worker.wire import SessionCreds

__all__ = [
    "DEFAULT_LOGOUT_REASON",
    "DEFAULT_REALM",
    "DESCRIPTIONS",
    "HANDLE_PREFIX",
    "MAX_EMAIL_LENGTH",
    "MAX_REASON_LENGTH",
    "MAX_TOKEN_LENGTH",
    "Authenticated",
    "AuthnError",
    "AuthnRequestRejected",
    "ConfigError",
    "InvalidUserinfo",
    "Login",
    "LoginConflict",
    "Policy",
    "SessionCreds",
    "SessionInvalid",
    "SessionSyncError",
    "Settings",
    "TokenCipher",
    "UnknownSession",
    "UserLogout",
    "authenticate",
    "check_reason",
    "create_engine",
    "default_cipher",
    "default_grace",
    "default_policy",
    "default_settings",
    "is_sqlite",
    "logout",
    "logout_user",
    "new_handle",
    "normalize_url",
    "record_login",
    "session_factory",
]

#: Realm in ``WWW-Authenticate`` answers unless the app names its own.
DEFAULT_REALM = "session-sync"
#: Prefix of the opaque local session handles issued by :func:`record_login` (``lss_`` + 32 base32).
HANDLE_PREFIX = "lss_"
#: Longest token :func:`record_login` accepts (Pangea's are ``ptu_``/``ptr_`` + 32 base32 characters).
MAX_TOKEN_LENGTH = 4096
#: Longest email :func:`record_login` accepts (the ``sessions.email`` column).
MAX_EMAIL_LENGTH = 320
#: Token times outside this span are garbage (and would overflow date arithmetic near year 1 or 9999).
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)
_RNG = random.SystemRandom()

#: ``SessionInvalid.reason`` -> ``error_description`` (the reasons are part of the API).
DESCRIPTIONS = {
    "missing": "No credentials were sent",
    "unknown": "The token is not recognized",
    "expired": "The token expired",
    "replaced": "The token was replaced by a refresh",
    "logged_out": "The session was logged out",
    "revoked": "The session was revoked",
}


@functools.cache
def default_settings() -> Settings:
    """The settings from the environment, read once per process (every default below comes from here)."""
    return Settings.from_env()


@functools.cache
def default_cipher() -> crypto.TokenCipher:
    """The cipher from the environment (``SESSION_SYNC_ENCRYPTION_KEYS``), built once per process."""
    return crypto.TokenCipher.from_settings(default_settings())


@functools.cache
def default_policy() -> decisions.Policy:
    """The worker's check and refresh knobs from the environment, so a login is first checked in time."""
    return decisions.Policy.from_settings(default_settings())


def default_grace() -> timedelta:
    """How long a token the worker replaced still authenticates (``SESSION_SYNC_REFRESH_GRACE``)."""
    return default_settings().refresh_grace


def new_handle() -> str:
    """A fresh opaque session handle: ``lss_`` + 32 base32 characters (160 random bits)."""
    return HANDLE_PREFIX + base64.b32encode(secrets.token_bytes(20)).decode("ascii")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Login:
    """A recorded login: the local session, and the handle to put in the browser's cookie.

    The handle exists only here (the database keeps its keyed hash): set the cookie now or lose it.
    """

    id: int
    user_id: str
    email: str
    handle: str = dataclasses.field(repr=False)
    expires_at: datetime
    session: models.LocalSession = dataclasses.field(repr=False)


def record_login(
    db: orm.Session,
    userinfo: Mapping[str, Any],
    *,
    cipher: crypto.TokenCipher | None = None,
    now: datetime | None = None,
    policy: decisions.Policy | None = None,
) -> Login:
    """Store a local session from a ``/v2/client/userinfo`` (or refresh) envelope or its ``result``.

    Returns the new session's id and its opaque cookie handle. Raises ``errors.InvalidUserinfo``
    naming the problem (never a token) and writes nothing when the payload is not Pangea's.
    Recording the same login again (a retried callback) returns the existing session with a new
    handle, which replaces the old one; a login whose tokens belong to a session that ended (or to
    another one) raises ``errors.LoginConflict``. Neither aborts the caller's transaction.
    On PostgreSQL this is ``session_sync_record_login`` (README "Database contract").
    """
    cipher = cipher or default_cipher()
    now = now or datetime.now(UTC)
    creds = _parse_userinfo(userinfo)
    active, refresh = creds.active_token, creds.refresh_token
    assert active.token is not None and refresh.token is not None  # SessionCreds guarantees both
    facts = decisions.SessionFacts(
        active_expires_at=active.expire,
        active_issued_at=active.created_at,
        refresh_expires_at=refresh.expire,
        has_refresh_token=True,
        failures=0,
        uncertain=False,
    )
    handle = new_handle()
    values: dict[str, Any] = {
        "user_id": active.identity,
        "email": active.email,
        "pangea_session_id": refresh.id,  # the session id /v2/session/list reports
        "active_token_id": active.id,
        "active_token_enc": cipher.encrypt(active.token),
        "active_token_hash": cipher.lookup_hash(active.token),
        "handle_hash": cipher.lookup_hash(handle),
        "refresh_token_enc": cipher.encrypt(refresh.token),
        "active_expires_at": active.expire,
        "active_issued_at": active.created_at,
        "refresh_expires_at": refresh.expire,
        # NULL: on its group's schedule (Pangea just vouched for it), unless it needs a refresh sooner.
        "next_check_at": _first_check(facts, now, policy or default_policy()),
        "now": now,
    }
    if sessions_pg.is_postgresql(db):
        session_id, outcome = sessions_pg.record_login(db, values)
    else:
        session_id, outcome = _record_login_sqlite(db, values)
    if outcome == "conflict" or session_id is None:
        raise errors.LoginConflict(
            "this login's tokens belong to a local session that ended or to another one"
            + (f" (local session {session_id})" if session_id is not None else ""),
            session_id=session_id,
        )
    row = db.get(models.LocalSession, session_id, populate_existing=True)
    assert row is not None  # just written or found in this transaction
    return Login(
        id=row.id, user_id=row.user_id, email=row.email, handle=handle, expires_at=row.active_expires_at, session=row
    )


def _record_login_sqlite(db: orm.Session, values: dict[str, Any]) -> tuple[int | None, str]:
    """``session_sync_record_login`` in Python, for SQLite: keep the two in step (tests run both)."""
    S = models.LocalSession
    now = values.pop("now")
    table = cast(sa.Table, S.__table__)
    # ON CONFLICT DO NOTHING: a unique violation would end the ORM session's transaction.
    insert = (
        sqlite.insert(table)
        .values(values | {"state": models.SessionState.ACTIVE, "created_at": now, "updated_at": now})
        .on_conflict_do_nothing()
        .returning(table.c.id)
    )
    new_id = db.execute(insert).scalar()
    if new_id is not None:
        return int(new_id), "recorded"
    holds_token = S.active_token_hash == values["active_token_hash"]
    found = db.execute(
        sa.select(S.id, S.state, S.active_token_id)
        .where(sa.or_(holds_token, S.pangea_session_id == values["pangea_session_id"]))
        .order_by(holds_token.desc(), S.id)
        .limit(1)
    ).first()
    if found is None:
        return None, "conflict"
    # The active token names a login: the worker may have corrected pangea_session_id since.
    if found.state is not models.SessionState.ACTIVE or found.active_token_id != values["active_token_id"]:
        return int(found.id), "conflict"
    db.execute(
        sa.update(S)
        .where(S.id == found.id)
        .values(handle_hash=values["handle_hash"], updated_at=now, version=S.version + 1)
        .execution_options(synchronize_session=False)
    )
    return int(found.id), "already_recorded"


def _parse_userinfo(userinfo: Mapping[str, Any]) -> wire.SessionCreds:
    if not isinstance(userinfo, Mapping):
        raise errors.InvalidUserinfo("userinfo is not a JSON object")
    if "status" in userinfo:  # the whole envelope
        if userinfo.get("status") != "Success":
            raise errors.InvalidUserinfo(f"userinfo status is {userinfo.get('status')!r}, not 'Success'")
        result = userinfo.get("result")
        request_id = str(userinfo.get("request_id") or "")
    else:
        result, request_id = userinfo, ""
    try:
        creds = wire.SessionCreds.from_wire(result, request_id=request_id)
    except errors.AuthnProtocolError as exc:
        raise errors.InvalidUserinfo(f"userinfo is not Pangea's: {exc}") from None
    _check_creds(creds)
    return creds


def _check_creds(creds: wire.SessionCreds) -> None:
    """Refuse well-typed values no Pangea login has, before anything reaches the database (never naming a token)."""
    active, refresh = creds.active_token, creds.refresh_token
    for where, info in (("active_token", active), ("refresh_token", refresh)):
        if not _is_word(info.token, MAX_TOKEN_LENGTH):
            raise errors.InvalidUserinfo(
                f"userinfo's result.{where}.token is not a token (1 to {MAX_TOKEN_LENGTH} printable ASCII characters)"
            )
        if not _is_word(info.id, models.PANGEA_ID_LENGTH):
            raise errors.InvalidUserinfo(f"userinfo's result.{where}.id is not a Pangea id")
        for field, at in (("created_at", info.created_at), ("expire", info.expire)):
            if not _plausible(at):
                raise errors.InvalidUserinfo(f"userinfo's result.{where}.{field} is not between 1970 and 9000")
        if info.expire < info.created_at:
            raise errors.InvalidUserinfo(f"userinfo's result.{where}.expire is before its created_at")
    if not _is_word(active.identity, models.PANGEA_ID_LENGTH):
        raise errors.InvalidUserinfo("userinfo's result.active_token.identity is not a Pangea user id")
    if refresh.identity != active.identity:
        raise errors.InvalidUserinfo("userinfo's two tokens belong to different users")
    if len(active.email) > MAX_EMAIL_LENGTH or not active.email.isprintable():
        raise errors.InvalidUserinfo(
            f"userinfo's result.active_token.email is not an email (at most {MAX_EMAIL_LENGTH} printable characters)"
        )


def _is_word(value: str | None, limit: int) -> bool:
    """A Pangea id or token: 1 to ``limit`` printable ASCII characters, no spaces."""
    return (
        value is not None and 0 < len(value) <= limit and value.isascii() and value.isprintable() and " " not in value
    )


def _plausible(at: datetime) -> bool:
    try:
        return _EARLIEST <= at.astimezone(UTC) <= _LATEST
    except OverflowError:  # e.g. 9999-12-31T23:59:59-12:00 is past the end of time in UTC
        return False


def _first_check(facts: decisions.SessionFacts, now: datetime, policy: decisions.Policy) -> datetime | None:
    """A new session's own due time, or None to put it on its group's schedule (the routine case)."""
    planned = decisions.plan_next_check(facts, now, policy, _RNG)
    return None if planned >= now + policy.check_interval else planned


def _shown(value: object) -> str:
    """A caller's value for an error message: quoted with escapes (one line), at most 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Authenticated:
    """A live local session, as :func:`authenticate` found it.

    ``last_checked_at`` is when the worker last heard from Pangea about it (None: not since the
    login at ``created_at``); ``uncertain`` marks a refresh whose answer was lost. Apps that want a
    staleness bound of their own use :meth:`verified_within`. ``rotated_token`` is set only when
    the request presented the token a worker refresh replaced (inside the grace period): hand it
    back to the client (e.g. in an ``X-Session-Token`` header), which should use it from then on.
    """

    id: int
    user_id: str
    email: str
    expires_at: datetime
    created_at: datetime
    last_checked_at: datetime | None
    uncertain: bool
    rotated_token: str | None = dataclasses.field(default=None, repr=False)

    def verified_within(self, max_age: timedelta, now: datetime | None = None) -> bool:
        """Whether Pangea confirmed this session (or it logged in) less than ``max_age`` ago."""
        return (now or datetime.now(UTC)) - (self.last_checked_at or self.created_at) < max_age


_S = models.LocalSession
_AUTH_COLUMNS = (
    _S.id,
    _S.user_id,
    _S.email,
    _S.state,
    _S.end_reason,
    _S.active_expires_at,
    _S.created_at,
    verification.last_checked_at().label("last_checked_at"),
    _S.uncertain,
    _S.active_token_hash,
    _S.active_token_enc,
    _S.rotated_at,
)


@functools.cache
def _lookup(by: str, keys: int) -> sa.Executable:
    """The one indexed SELECT of :func:`authenticate`, built once per kind and number of keys."""
    marks: list[sa.BindParameter[Any]] = [sa.bindparam(f"k{i}") for i in range(keys)]
    if by == "id":
        where = _S.id == marks[0]
    elif by == "handle":
        where = _S.handle_hash.in_(marks)
    else:
        where = sa.or_(_S.active_token_hash.in_(marks), _S.previous_token_hash.in_(marks))
    return sa.select(*_AUTH_COLUMNS).where(where).limit(1)


def authenticate(
    db: orm.Session,
    token_or_session_id: str | int,
    *,
    cipher: crypto.TokenCipher | None = None,
    now: datetime | None = None,
    realm: str = DEFAULT_REALM,
    grace: timedelta | None = None,
) -> Authenticated:
    """The live local session for an active token, a handle (``lss_...``) or a local id; else ``SessionInvalid``.

    Answers from the local database only (one indexed query, no Pangea call). A token the worker
    replaced by a refresh is accepted for ``grace`` (default ``SESSION_SYNC_REFRESH_GRACE``) after
    the rotation, and the answer then carries the new token in ``rotated_token``.
    ``SessionInvalid.reason`` is one of :data:`DESCRIPTIONS`; its message never holds the token.
    """
    now = now or datetime.now(UTC)
    hashes: list[str] = []  # set when a token was presented (not a handle or an id)
    params: dict[str, object]
    _check_credential(token_or_session_id, realm)
    if isinstance(token_or_session_id, int):
        query, params = _lookup("id", 1), {"k0": token_or_session_id}
    else:
        cipher = cipher or default_cipher()
        keys = cipher.lookup_hashes(token_or_session_id)
        if token_or_session_id.startswith(HANDLE_PREFIX):
            query = _lookup("handle", len(keys))
        else:
            query, hashes = _lookup("token", len(keys)), keys
        params = {f"k{i}": key for i, key in enumerate(keys)}
    # Core on the session's connection: the ORM's per-statement work would triple the cost. Not
    # session_sync_authenticate on PostgreSQL: this is every request's path, and the PL/pgSQL call
    # costs several times this bare indexed SELECT in server time (README "Database contract").
    # Keep the checks in step with session_sync_judge (tests hold the two to each other).
    row = db.connection().execute(query, params).first()
    if row is None:
        raise _invalid("unknown", realm)
    if row.state is models.SessionState.LOGGED_OUT:
        raise _invalid("logged_out", realm)
    if row.state is models.SessionState.REVOKED:
        raise _invalid("expired" if row.end_reason == "expired" else "revoked", realm)
    if row.active_expires_at <= now:
        raise _invalid("expired", realm)
    rotated = None
    if hashes and row.active_token_hash not in hashes:
        # The previous token: good only within the grace period after the worker replaced it.
        if row.rotated_at is None or now >= row.rotated_at + (default_grace() if grace is None else grace):
            raise _invalid("replaced", realm)
        assert cipher is not None
        rotated = cipher.decrypt(row.active_token_enc)
    return Authenticated(
        id=row.id,
        user_id=row.user_id,
        email=row.email,
        expires_at=row.active_expires_at,
        created_at=row.created_at,
        last_checked_at=row.last_checked_at,
        uncertain=row.uncertain,
        rotated_token=rotated,
    )


def _invalid(reason: str, realm: str) -> errors.SessionInvalid:
    return errors.SessionInvalid(DESCRIPTIONS[reason], realm=realm, reason=reason)


def _check_credential(credential: object, realm: str) -> None:
    """SessionInvalid, before any lookup, for what cannot be a credential: nothing, JSON ``true`` (never id 1),
    a float, an id no row can have, a string with a lone surrogate."""
    if credential is None or credential == "":
        raise _invalid("missing", realm)
    if isinstance(credential, int) and models.is_row_id(credential):
        return
    if not isinstance(credential, str) or not _encodable(credential):
        raise _invalid("unknown", realm)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from JSON "\\ud800": no token has one
        return False
    return True


# --- logout: end the local session and queue the Pangea logout, in the caller's transaction ------

#: ``end_reason`` of a session the app (or its user) logged out.
DEFAULT_LOGOUT_REASON = "user_logout"
#: Longest ``end_reason`` (the ``sessions.end_reason`` and ``session_events.reason`` columns).
MAX_REASON_LENGTH = 64


def check_reason(reason: str) -> str:
    """``reason`` if it can be recorded as an end reason, else ValueError saying what one must be."""
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_LENGTH or not reason.isprintable():
        raise ValueError(f"an end reason must be 1 to {MAX_REASON_LENGTH} printable characters")
    return reason


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UserLogout:
    """What :func:`logout_user` did: the local sessions it ended and the queued ``/v2/session/logout``."""

    user_id: str
    session_ids: tuple[int, ...]
    event_id: int


def _end_sessions(*where: sa.ColumnElement[bool], reason: str, now: datetime) -> sa.Update:
    S = models.LocalSession
    return (
        sa.update(S)
        .where(models.session_is_active(), *where)
        .values(
            **models.ending(models.SessionState.LOGGED_OUT, reason=reason, at=now),
            refresh_token_enc=None,  # spent with the session; nobody may refresh it again
        )
        .returning(S.id, S.user_id, S.active_token_enc)
        .execution_options(synchronize_session="fetch")
    )


def logout(
    db: orm.Session,
    session_id: int,
    *,
    reason: str = DEFAULT_LOGOUT_REASON,
    now: datetime | None = None,
    kick: kick_mod.Kick = None,
) -> models.LocalSession:
    """End a local session and queue its Pangea logout, in the caller's transaction (flushed, not committed).

    On PostgreSQL this is ``session_sync_logout`` (README "Database contract"), audit row included.

    Idempotent: a session that already ended is returned as it is, and nothing more is queued.
    Raises ``errors.UnknownSession`` when there is no such session. ``kick`` (see
    ``worker.kick.kick_after_commit``) starts delivery right after the commit.
    """
    check_reason(reason)
    if not models.is_row_id(session_id):  # no row has it; binding it could even make the driver raise
        raise errors.UnknownSession(f"no local session with id {_shown(session_id)}")
    now = now or datetime.now(UTC)
    if sessions_pg.is_postgresql(db):
        _, event_id = sessions_pg.logout(db, session_id=session_id, reason=reason, now=now)
        queued = event_id is not None
    else:
        queued = _logout_sqlite(db, session_id, reason=reason, now=now)
    if queued:
        kick_mod.kick_after_commit(db, kick, settings=default_settings)
    # populate_existing: the row changed under any copy the ORM session holds.
    row = db.get(models.LocalSession, session_id, populate_existing=True)
    if row is None:
        raise errors.UnknownSession(f"no local session with id {_shown(session_id)}")
    return row


def logout_user(
    db: orm.Session,
    user_id: str,
    *,
    reason: str = DEFAULT_LOGOUT_REASON,
    now: datetime | None = None,
    kick: kick_mod.Kick = None,
) -> UserLogout:
    """End every active local session of a user and queue one ``/v2/session/logout`` for them.

    Runs in the caller's transaction (flushed, not committed). The Pangea logout ends the user's
    sessions everywhere, so it is queued even when no local session was still active; a pending one
    is reused instead of queuing another. Raises ``errors.UnknownSession`` for a user id that never
    had a local session.
    """
    check_reason(reason)
    if not models.fits_id_column(user_id):
        raise errors.UnknownSession(f"no local session for user {_shown(user_id)}")
    now = now or datetime.now(UTC)
    if sessions_pg.is_postgresql(db):
        done = sessions_pg.logout_user(db, user_id=user_id, reason=reason, now=now)
        if done is not None:
            _expire_sessions(db, done[0])
    else:
        done = _logout_user_sqlite(db, user_id, reason=reason, now=now)
    if done is None:
        raise errors.UnknownSession(f"no local session for user {_shown(user_id)}")
    ended, event_id = done
    kick_mod.kick_after_commit(db, kick, settings=default_settings)
    return UserLogout(user_id=user_id, session_ids=tuple(ended), event_id=event_id)


def _logout_sqlite(db: orm.Session, session_id: int, *, reason: str, now: datetime) -> bool:
    """``session_sync_logout`` in Python, for SQLite: whether this call ended the session (and queued its logout)."""
    ended = db.execute(_end_sessions(models.LocalSession.id == session_id, reason=reason, now=now)).first()
    if ended is None:
        return False
    outbox_queries.add_session_logout(
        db, session_id=ended.id, user_id=ended.user_id, token_enc=ended.active_token_enc, now=now
    )
    audit.record_one(db, _logged_out(ended.id, reason), now=now)
    return True


def _logout_user_sqlite(db: orm.Session, user_id: str, *, reason: str, now: datetime) -> tuple[list[int], int] | None:
    """``session_sync_logout_user`` in Python, for SQLite: (ended ids, event id); None for an unknown user."""
    S = models.LocalSession
    ended = sorted(row.id for row in db.execute(_end_sessions(S.user_id == user_id, reason=reason, now=now)))
    if not ended and db.execute(sa.select(S.id).where(S.user_id == user_id).limit(1)).first() is None:
        return None
    event_id = outbox_queries.add_user_logout(db, user_id=user_id, now=now)
    audit.record(db, [_logged_out(sid, reason) for sid in ended], now=now)
    return ended, event_id


def _expire_sessions(db: orm.Session, session_ids: list[int]) -> None:
    """Forget the ORM session's copies of rows a function changed, so they are read again."""
    ids = set(session_ids)
    for obj in list(db.identity_map.values()):
        if isinstance(obj, models.LocalSession) and obj.id in ids:
            db.expire(obj)


def _logged_out(session_id: int, reason: str) -> audit.Event:
    return audit.Event(session_id=session_id, action="logged_out", outcome="logout_queued", reason=reason)
