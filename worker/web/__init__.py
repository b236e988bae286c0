"""Framework glue over :mod:`worker.sessions`: what every framework's glue shares, and nothing of any framework.

Each framework has its own module, which alone imports it (an optional extra each):

- :mod:`worker.web.django`: middleware, ``session_required`` / ``SessionRequiredMixin``, a Django REST
  framework authentication class, and ``record_login`` / ``logout`` on Django's own connection, inside
  the caller's ``transaction.atomic()``;
- :mod:`worker.web.flask`: the ``SessionSync`` extension (``init_app``), a Flask-Login ``request_loader``;
- :mod:`worker.web.starlette`: an ``AuthenticationBackend`` for Starlette's ``AuthenticationMiddleware``;
- :mod:`worker.web.fastapi`: the FastAPI dependency;
- :mod:`worker.web.asgi`: a pure ASGI middleware for any ASGI app (no framework at all).

The rule they share lives here once: the credential is ``Authorization: Bearer <token>`` first, else the
session cookie holding an ``lss_`` handle; a refused one answers 401 with the RFC 6750 ``WWW-Authenticate``
value of :class:`worker.errors.SessionInvalid`; a token the worker replaced, presented inside the grace
period, gets the new one back in ``X-Session-Token``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

from sqlalchemy import orm

from worker import crypto, errors, sessions
from worker.settings import Settings

__all__ = [
    "COOKIE_SETTING",
    "DEFAULT_COOKIE",
    "REALM_SETTING",
    "SCOPE_KEY",
    "TOKEN_HEADER",
    "Guard",
    "RequestAuth",
    "SessionFactory",
    "bearer_token",
    "settings_from",
]

#: Cookie holding the opaque session handle (server-side style).
DEFAULT_COOKIE = "session"
#: Response header handing the new active token to a Bearer client after a worker refresh.
TOKEN_HEADER = "X-Session-Token"
#: Framework setting naming the realm of the ``WWW-Authenticate`` answers (Django ``settings``, Flask ``app.config``).
REALM_SETTING = "SESSION_SYNC_REALM"
#: Framework setting naming the cookie that holds the handle.
COOKIE_SETTING = "SESSION_SYNC_COOKIE"

#: Where ASGI glue keeps the request's :class:`RequestAuth` in the scope (one check per request, however many glues).
SCOPE_KEY = "session_sync"
#: What a Guard opens per request: an ORM session, closed on exit (a ``sessionmaker`` is one).
SessionFactory = Callable[[], AbstractContextManager[orm.Session]]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Guard:
    """How requests carry their credential and how it is checked; shared by every glue."""

    db: SessionFactory
    cookie: str = DEFAULT_COOKIE
    realm: str = sessions.DEFAULT_REALM
    cipher: crypto.TokenCipher | None = None
    #: How long a token the worker replaced still authenticates (None: ``SESSION_SYNC_REFRESH_GRACE``).
    grace: timedelta | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, db: SessionFactory, *, realm: str | None = None, cookie: str | None = None
    ) -> Guard:
        """A guard with the cipher and grace period of ``settings`` (the worker's, so both sides agree)."""
        return cls(
            db=db,
            cookie=cookie or DEFAULT_COOKIE,
            realm=realm or sessions.DEFAULT_REALM,
            cipher=crypto.TokenCipher.from_settings(settings),
            grace=settings.refresh_grace,
        )

    def credential(self, authorization: str | None, cookie: str | None) -> str | None:
        """What a request presents: its Bearer token, else its cookie's handle, else None."""
        return bearer_token(authorization) or cookie or None

    def check(self, authorization: str | None, cookie: str | None) -> sessions.Authenticated:
        """The live session for a request's ``Authorization`` header or cookie; else ``SessionInvalid``."""
        credential = self.credential(authorization, cookie) or ""
        with self.db() as db:
            return sessions.authenticate(db, credential, cipher=self.cipher, realm=self.realm, grace=self.grace)

    def challenge(self) -> str:
        """The bare RFC 6750 challenge (no credentials were sent), e.g. ``Bearer realm="example"``."""
        return self.refusal(None).www_authenticate

    def refusal(self, error: errors.SessionInvalid | None) -> errors.SessionInvalid:
        """``error``, or the "no credentials" refusal when there is none."""
        return error or errors.SessionInvalid(sessions.DESCRIPTIONS["missing"], realm=self.realm, reason="missing")


class RequestAuth:
    """One request's authentication, done at most once and only when first asked (a public page costs nothing).

    Every glue keeps one per request: ``session`` is the live session or None, ``error`` why not,
    ``require()`` the session or ``SessionInvalid`` (the 401), ``rotated_token`` what to hand back.
    """

    def __init__(self, guard: Guard, authorization: str | None, cookie: str | None) -> None:
        self.guard = guard
        self._authorization, self._cookie = authorization, cookie
        self._done = False
        self._session: sessions.Authenticated | None = None
        self._error: errors.SessionInvalid | None = None

    def _run(self) -> None:
        if self._done:
            return
        self._done = True
        if self.guard.credential(self._authorization, self._cookie) is None:
            self._error = self.guard.refusal(None)
            return
        try:
            self._session = self.guard.check(self._authorization, self._cookie)
        except errors.SessionInvalid as exc:
            self._error = exc

    @property
    def presented(self) -> bool:
        """Whether the request carried a credential at all (checked or not)."""
        return self.guard.credential(self._authorization, self._cookie) is not None

    @property
    def session(self) -> sessions.Authenticated | None:
        """The live session, or None (no credential, or a refused one: see :attr:`error`)."""
        self._run()
        return self._session

    @property
    def error(self) -> errors.SessionInvalid | None:
        """Why there is no live session (None when there is one)."""
        self._run()
        return self._error

    def require(self) -> sessions.Authenticated:
        """The live session, else ``SessionInvalid`` carrying the RFC 6750 challenge."""
        self._run()
        if self._session is None:
            raise self.guard.refusal(self._error)
        return self._session

    @property
    def rotated_token(self) -> str | None:
        """The new token to hand back, if the request was checked and presented the one it replaced."""
        return self._session.rotated_token if self._done and self._session is not None else None


def settings_from(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """The worker's settings from a framework's configuration over the environment.

    ``config`` (Django ``settings``, Flask ``app.config``) may hold any worker variable under its own
    name (``SESSION_SYNC_ENCRYPTION_KEYS``, ``SESSION_SYNC_REFRESH_GRACE``, ``PANGEA_BASE_URL``, ...);
    it wins over the environment. Raises ``ConfigError`` naming the variable.
    """
    merged: dict[str, str] = dict(os.environ if env is None else env)
    for field in Settings.model_fields.values():
        if field.alias and config.get(field.alias) is not None:
            merged[field.alias] = _as_setting(config[field.alias])
    return Settings.from_env(merged)


def _as_setting(value: object) -> str:
    if isinstance(value, timedelta):
        return f"{value.total_seconds()}s"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --- names kept from the single-module ``worker.web`` ---------------------------------------------


def __getattr__(name: str) -> Any:
    """Old names, resolved on first use so that importing ``worker.web`` imports no framework."""
    if name == "fastapi_dependency":
        return importlib.import_module("worker.web.fastapi").dependency
    if name == "flask_login_required":
        return importlib.import_module("worker.web.flask").login_required
    if name == "SessionMiddleware":
        warnings.warn(
            "worker.web.SessionMiddleware is renamed worker.web.asgi.SessionSyncMiddleware (it clashed with "
            "Starlette's SessionMiddleware); the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("worker.web.asgi").SessionSyncMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
