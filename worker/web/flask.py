"""Flask: the ``SessionSync`` extension (``init_app``, ``app.config``, ``app.extensions``); Flask only here.

::

    session_sync = SessionSync()            # or SessionSync(app)
    session_sync.init_app(app)              # config: app.config over the environment

    @app.get("/me")
    @session_sync.session_required          # 401 + RFC 6750 challenge, else session_sync.session
    def me(): return {"email": session_sync.session.email}

With Flask-SQLAlchemy initialised on the app first, ``record_login`` and ``logout`` run on its
``db.session`` and commit with the app's own ``db.session.commit()``; without it they run in a
transaction of their own on ``DATABASE_URL``. For Flask-Login, ``request_loader`` turns the live
session into the app's user and ``unauthorized`` is the 401 answer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import flask
from sqlalchemy import orm

from worker import crypto, db, decisions, errors, models, sessions
from worker.settings import Settings
from worker.web import COOKIE_SETTING, REALM_SETTING, TOKEN_HEADER, Guard, RequestAuth, settings_from

__all__ = [
    "EXTENSION",
    "SessionSync",
    "State",
    "login_required",
]

#: The key in ``app.extensions``.
EXTENSION = "session_sync"

_F = TypeVar("_F", bound=Callable[..., Any])
_U = TypeVar("_U")
_G_KEY = "_session_sync_auth"


@dataclasses.dataclass(frozen=True, kw_only=True)
class State:
    """What ``init_app`` keeps for one app in ``app.extensions["session_sync"]``."""

    extension: SessionSync
    settings: Settings
    guard: Guard
    cipher: crypto.TokenCipher
    policy: decisions.Policy
    #: Flask-SQLAlchemy's scoped ``db.session`` when the app uses it (None: our own transactions).
    app_session: Any = None
    own_sessions: orm.sessionmaker[orm.Session] | None = None


class SessionSync:
    """The Flask extension: local authentication per request, and logins and logouts on the app's database."""

    def __init__(self, app: flask.Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Read the configuration (``app.config`` over the environment) and register in ``app.extensions``."""
        settings = settings_from(app.config)
        fsa = app.extensions.get("sqlalchemy")
        own: orm.sessionmaker[orm.Session] | None = None
        if fsa is not None:
            # Reads go through a session of their own on the app's engine, so a check never closes db.session.
            def reader() -> orm.Session:
                return orm.Session(bind=fsa.engine)

            factory: Callable[[], orm.Session] = reader
        else:
            own = factory = db.session_factory(db.create_engine(settings.database_url))
        guard = Guard.from_settings(
            settings, factory, realm=app.config.get(REALM_SETTING), cookie=app.config.get(COOKIE_SETTING)
        )
        app.extensions[EXTENSION] = State(
            extension=self,
            settings=settings,
            guard=guard,
            cipher=guard.cipher or crypto.TokenCipher.from_settings(settings),
            policy=decisions.Policy.from_settings(settings),
            app_session=fsa.session if fsa is not None else None,
            own_sessions=own,
        )
        app.after_request(_hand_back_token)

    # --- per request ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """This extension's state for the current app."""
        found = flask.current_app.extensions.get(EXTENSION)
        if not isinstance(found, State):
            raise RuntimeError("SessionSync.init_app(app) was not called for this app")
        return found

    def current(self) -> RequestAuth:
        """The current request's authentication (done once, when first asked)."""
        auth = flask.g.get(_G_KEY)
        if auth is None:
            request = flask.request
            auth = RequestAuth(self.state.guard, request.headers.get("Authorization"), _cookie(self.state.guard))
            setattr(flask.g, _G_KEY, auth)
        assert isinstance(auth, RequestAuth)
        return auth

    @property
    def session(self) -> sessions.Authenticated | None:
        """The current request's live session, or None."""
        return self.current().session

    def unauthorized(self) -> flask.Response:
        """The 401 answer with the RFC 6750 challenge saying why (for Flask-Login's ``unauthorized_handler``)."""
        return _refused(self.state.guard.refusal(self.current().error))

    def session_required(self, view: _F) -> _F:
        """A view decorator: 401 with the challenge unless the request has a live session."""

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.current().session is None:
                return self.unauthorized()
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def request_loader(self, load_user: Callable[[sessions.Authenticated], _U | None]) -> Callable[[Any], _U | None]:
        """A Flask-Login ``request_loader``: the app's user for the live session (``load_user``), else None."""

        def loader(request: Any) -> _U | None:
            found = self.current().session
            return load_user(found) if found is not None else None

        return loader

    # --- writes ---------------------------------------------------------------------------------

    def record_login(self, userinfo: Mapping[str, Any]) -> sessions.Login:
        """Store a local session from a ``/v2/client/userinfo`` result (see the module docstring for the commit)."""
        state = self.state
        return self._write(lambda s: sessions.record_login(s, userinfo, cipher=state.cipher, policy=state.policy))

    def logout(self, session_id: int, *, reason: str = sessions.DEFAULT_LOGOUT_REASON) -> models.LocalSession:
        """End a local session and queue its Pangea logout (committed with the app's writes under Flask-SQLAlchemy)."""
        return self._write(lambda s: sessions.logout(s, session_id, reason=reason))

    def logout_user(self, user_id: str, *, reason: str = sessions.DEFAULT_LOGOUT_REASON) -> sessions.UserLogout:
        """End every session of a user and queue one ``/v2/session/logout``."""
        return self._write(lambda s: sessions.logout_user(s, user_id, reason=reason))

    def _write(self, work: Callable[[orm.Session], _U]) -> _U:
        state = self.state
        if state.app_session is not None:
            return work(state.app_session())  # flushed; the app's db.session.commit() commits it
        assert state.own_sessions is not None
        with state.own_sessions.begin() as s:
            return work(s)


def _cookie(guard: Guard) -> str | None:
    return flask.request.cookies.get(guard.cookie)


def _refused(exc: errors.SessionInvalid) -> flask.Response:
    return flask.Response(exc.description, exc.status_code, {"WWW-Authenticate": exc.www_authenticate})


def _hand_back_token(response: flask.Response) -> flask.Response:
    auth = flask.g.get(_G_KEY)
    if isinstance(auth, RequestAuth) and (token := auth.rotated_token):
        response.headers[TOKEN_HEADER] = token
    return response


def login_required(guard: Guard) -> Callable[[_F], _F]:
    """A view decorator over a bare :class:`worker.web.Guard` (no extension): the session in ``flask.g.session``."""

    def decorate(view: _F) -> _F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            auth = RequestAuth(guard, flask.request.headers.get("Authorization"), _cookie(guard))
            try:
                flask.g.session = auth.require()
            except errors.SessionInvalid as exc:
                return _refused(exc)
            if (token := auth.rotated_token) is not None:
                flask.after_this_request(lambda response: _with_header(response, token))
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _with_header(response: flask.Response, token: str) -> flask.Response:
    response.headers[TOKEN_HEADER] = token
    return response
