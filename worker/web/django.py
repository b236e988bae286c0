"""Django: middleware, ``session_required`` / ``SessionRequiredMixin``, and logins and logouts in the app's transaction.

``record_login``, ``logout`` and ``logout_user`` run :mod:`worker.sessions` itself (one implementation,
keyed hashes and all) on Django's own database connection: a SQLAlchemy ``Session`` over the raw DB-API
connection Django holds, which flushes but can neither commit nor roll back (:class:`_Borrowed`). So
inside the caller's ``transaction.atomic()`` the session row, its outbox row and the audit row commit or
roll back with the app's own writes, and the delivery kick is sent by ``transaction.on_commit`` only.
SQLite (Django's default) and PostgreSQL are supported; on PostgreSQL Django must run with ``USE_TZ = True``.

Settings: any worker variable (``SESSION_SYNC_ENCRYPTION_KEYS``, ``SESSION_SYNC_REFRESH_GRACE``, ...) in
Django's ``settings`` wins over the environment; ``SESSION_SYNC_REALM``, ``SESSION_SYNC_COOKIE`` and
``SESSION_SYNC_DATABASE`` (the alias, default ``"default"``) are Django's own. Django is imported only here.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from django import http
from django.conf import settings as django_settings
from django.core import exceptions, signals
from django.db import connections, transaction
from sqlalchemy import orm, pool
from sqlalchemy.dialects import sqlite

from worker import crypto, decisions, errors, models, sessions
from worker import kick as kick_mod
from worker.settings import Settings
from worker.web import COOKIE_SETTING, REALM_SETTING, TOKEN_HEADER, Guard, RequestAuth, settings_from

__all__ = [
    "DATABASE_SETTING",
    "REQUEST_ATTRIBUTE",
    "SessionRequiredMixin",
    "SessionSyncMiddleware",
    "SessionUser",
    "database_alias",
    "engine",
    "guard",
    "hand_back_token",
    "logout",
    "logout_user",
    "orm_session",
    "record_login",
    "refused",
    "request_auth",
    "session_required",
    "worker_settings",
]

#: Django setting naming the database alias that holds session-sync's tables.
DATABASE_SETTING = "SESSION_SYNC_DATABASE"
#: The attribute the middleware sets on each request: a :class:`worker.web.RequestAuth`.
REQUEST_ATTRIBUTE = "session_sync"

_T = TypeVar("_T")
_V = TypeVar("_V", bound=Callable[..., Any])


# --- SQLAlchemy over Django's own connection --------------------------------------------------------


class _Borrowed:
    """Django's DB-API connection as SQLAlchemy sees it: everything passes through but the transaction.

    SQLAlchemy commits, rolls back (even on first connect) and closes its connections; this one is
    Django's, whose ``atomic()`` owns the transaction, so those three do nothing here.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class _DjangoSqliteDateTime(sqlite.DATETIME):
    """Django opens SQLite with ``detect_types``, so DATETIME columns arrive parsed already; keep those as they are."""

    def result_processor(self, dialect: sa.Dialect, coltype: object) -> Callable[[Any], Any] | None:
        parse = super().result_processor(dialect, coltype)
        if parse is None:
            return None

        def process(value: Any) -> Any:
            return value if value is None or isinstance(value, datetime) else parse(value)

        return process


_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def engine(using: str | None = None) -> sa.Engine:
    """A SQLAlchemy engine whose every connection is the calling thread's Django connection ``using``."""
    alias = using or database_alias()
    with _engines_lock:
        if alias not in _engines:
            _engines[alias] = _bridge(alias)
        return _engines[alias]


def _bridge(alias: str) -> sa.Engine:
    wrapper = connections[alias]

    def borrow() -> _Borrowed:
        connection = connections[alias]
        connection.ensure_connection()
        return _Borrowed(connection.connection)

    if wrapper.vendor == "sqlite":
        made = sa.create_engine("sqlite://", creator=borrow, poolclass=pool.NullPool, pool_reset_on_return=None)
        made.dialect.colspecs = {**made.dialect.colspecs, sa.DateTime: _DjangoSqliteDateTime}
        return made
    if wrapper.vendor == "postgresql":
        if not django_settings.USE_TZ:  # Django's loader would hand back naive local times
            raise exceptions.ImproperlyConfigured("worker.web.django needs USE_TZ = True with PostgreSQL")
        driver = "psycopg" if wrapper.Database.__name__ == "psycopg" else "psycopg2"
        return sa.create_engine(
            f"postgresql+{driver}://",
            creator=borrow,
            poolclass=pool.NullPool,
            pool_reset_on_return=None,
            use_native_hstore=False,  # its type lookup needs the driver's own class, not a wrapper
        )
    raise exceptions.ImproperlyConfigured(f"worker.web.django supports SQLite and PostgreSQL, not {wrapper.vendor}")


@contextmanager
def orm_session(using: str | None = None) -> Iterator[orm.Session]:
    """A SQLAlchemy ``Session`` on Django's connection: it flushes, Django's transaction commits."""
    with orm.Session(bind=engine(using), expire_on_commit=False) as db:
        yield db


def _in_transaction(work: Callable[[orm.Session], _T], using: str | None) -> _T:
    """``work`` inside ``transaction.atomic(using)`` (a savepoint when the caller is in one already)."""
    alias = using or database_alias()
    with transaction.atomic(using=alias), orm_session(alias) as db:
        return work(db)


# --- settings -----------------------------------------------------------------------------------------


def database_alias() -> str:
    """The Django database alias of session-sync's tables (``SESSION_SYNC_DATABASE``, default ``"default"``)."""
    return str(getattr(django_settings, DATABASE_SETTING, "default"))


def _config() -> Mapping[str, Any]:
    return {name: getattr(django_settings, name) for name in dir(django_settings) if name.isupper()}


@functools.cache
def worker_settings() -> Settings:
    """The worker's settings from Django's ``settings`` over the environment (read once; reset on change)."""
    return settings_from(_config())


@functools.cache
def guard() -> Guard:
    """The request guard: cipher, grace, realm and cookie from the settings, reading through Django's connection."""
    config = _config()
    return Guard.from_settings(
        worker_settings(),
        lambda: orm_session(),
        realm=config.get(REALM_SETTING),
        cookie=config.get(COOKIE_SETTING),
    )


@functools.cache
def _cipher() -> crypto.TokenCipher:
    return guard().cipher or crypto.TokenCipher.from_settings(worker_settings())


def _forget(**_: Any) -> None:
    for cached in (worker_settings, guard, _cipher):
        cached.cache_clear()
    with _engines_lock:
        _engines.clear()


signals.setting_changed.connect(_forget, weak=False)  # override_settings in the app's tests


# --- logins and logouts, in the caller's transaction ----------------------------------------------------


def record_login(userinfo: Mapping[str, Any], *, using: str | None = None) -> sessions.Login:
    """Store a local session from a ``/v2/client/userinfo`` result, in the caller's ``transaction.atomic()``."""
    policy = decisions.Policy.from_settings(worker_settings())
    cipher = _cipher()
    return _in_transaction(lambda db: sessions.record_login(db, userinfo, cipher=cipher, policy=policy), using)


def logout(
    session_id: int,
    *,
    reason: str = sessions.DEFAULT_LOGOUT_REASON,
    using: str | None = None,
    kick: kick_mod.Kick = None,
) -> models.LocalSession:
    """End a local session and queue its Pangea logout, both in the caller's ``transaction.atomic()``.

    A rollback leaves the session active and nothing queued; ``kick`` (as in ``worker.sessions.logout``)
    is sent on commit only.
    """
    ended = _in_transaction(lambda db: sessions.logout(db, session_id, reason=reason, kick=False), using)
    _kick_on_commit(kick, using)
    return ended


def logout_user(
    user_id: str,
    *,
    reason: str = sessions.DEFAULT_LOGOUT_REASON,
    using: str | None = None,
    kick: kick_mod.Kick = None,
) -> sessions.UserLogout:
    """End every session of a user and queue one ``/v2/session/logout``, in the caller's ``transaction.atomic()``."""
    done = _in_transaction(lambda db: sessions.logout_user(db, user_id, reason=reason, kick=False), using)
    _kick_on_commit(kick, using)
    return done


def _kick_on_commit(kick: kick_mod.Kick, using: str | None) -> None:
    sender = kick_mod.sender(kick, worker_settings)
    if sender is not None:
        transaction.on_commit(lambda: kick_mod.send_kick(sender), using=using or database_alias())


# --- requests -------------------------------------------------------------------------------------------


def request_auth(request: http.HttpRequest) -> RequestAuth:
    """The request's authentication: the middleware's, or made now (the decorator works without the middleware)."""
    found = getattr(request, REQUEST_ATTRIBUTE, None)
    if isinstance(found, RequestAuth):
        return found
    checker = guard()
    auth = RequestAuth(checker, request.headers.get("Authorization"), request.COOKIES.get(checker.cookie))
    setattr(request, REQUEST_ATTRIBUTE, auth)
    return auth


def hand_back_token(request: http.HttpRequest, response: http.HttpResponseBase) -> http.HttpResponseBase:
    """``response`` with ``X-Session-Token`` when the request presented the token a refresh replaced."""
    found = getattr(request, REQUEST_ATTRIBUTE, None)
    if isinstance(found, RequestAuth) and (token := found.rotated_token):
        response[TOKEN_HEADER] = token
    return response


def refused(error: errors.SessionInvalid) -> http.HttpResponse:
    """The 401 answer: the description as text, the RFC 6750 challenge in ``WWW-Authenticate``."""
    answer = http.HttpResponse(error.description, status=error.status_code, content_type="text/plain")
    answer["WWW-Authenticate"] = error.www_authenticate
    return answer


class SessionSyncMiddleware:
    """Sets ``request.session_sync`` (checked on first use, one indexed query) and hands rotated tokens back.

    ``request.session_sync.session`` is the live :class:`worker.sessions.Authenticated` or None;
    ``.error`` says why not.
    """

    def __init__(self, get_response: Callable[[http.HttpRequest], http.HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: http.HttpRequest) -> http.HttpResponseBase:
        request_auth(request)
        return hand_back_token(request, self.get_response(request))


def session_required(view: _V) -> _V:
    """A view decorator: 401 with the RFC 6750 challenge unless the request has a live session."""

    @functools.wraps(view)
    def wrapper(request: http.HttpRequest, *args: Any, **kwargs: Any) -> Any:
        auth = request_auth(request)
        try:
            auth.require()
        except errors.SessionInvalid as exc:
            return refused(exc)
        return hand_back_token(request, view(request, *args, **kwargs))

    return wrapper  # type: ignore[return-value]


class SessionRequiredMixin:
    """A class-based view mixin (first in the bases): 401 with the challenge unless there is a live session."""

    def dispatch(self, request: http.HttpRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            request_auth(request).require()
        except errors.SessionInvalid as exc:
            return refused(exc)
        return hand_back_token(request, super().dispatch(request, *args, **kwargs))  # type: ignore[misc]


class SessionUser:
    """A user object for a live session (Django REST framework's ``request.user``): Pangea's id and email."""

    is_authenticated = True
    is_anonymous = False
    is_active = True

    def __init__(self, session: sessions.Authenticated) -> None:
        self.session = session
        self.pk = self.user_id = session.user_id
        self.email = session.email

    def __str__(self) -> str:
        return self.email
