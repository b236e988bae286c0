"""An example Flask app: the ``SessionSync`` extension with Flask-SQLAlchemy and Flask-Login.

Run it against the emulator (the FastAPI example's docstring shows the code exchange)::

    session-sync emulator & session-sync db upgrade
    flask --app examples.flask_app:create_app run --port 8000

Routes: ``/callback?code=pmc_...`` (``&style=bearer`` returns the active token instead of setting the
cookie), ``/me`` (Flask-Login's ``login_required``, the user from ``request_loader``), ``/session``
(``session_required``), ``POST /logout``. Logins and logouts run on Flask-SQLAlchemy's ``db.session``
and commit with the app's own writes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import flask
import flask_login
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import orm

from worker import authn, sessions
from worker.web.flask import SessionSync


class Base(orm.DeclarativeBase):
    """The app's own models."""


store = SQLAlchemy(model_class=Base)
session_sync = SessionSync()
login_manager = flask_login.LoginManager()


class User(flask_login.UserMixin, store.Model):  # type: ignore[name-defined,misc]
    """The app's own user, keyed by Pangea's user id."""

    __tablename__ = "example_users"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    pangea_user_id: orm.Mapped[str] = orm.mapped_column(unique=True)
    email: orm.Mapped[str]
    logouts: orm.Mapped[int] = orm.mapped_column(default=0)


def load_user(session: sessions.Authenticated) -> User | None:
    """The app's user for a live session (Flask-Login's ``request_loader`` through the extension)."""
    return store.session.scalars(store.select(User).filter_by(pangea_user_id=session.user_id)).first()


def create_app() -> flask.Flask:
    """The app, configured from the environment (the same variables as the worker)."""
    app = flask.Flask(__name__)
    url = sessions.normalize_url(os.environ.get("DATABASE_URL", "sqlite:///session-sync.db"))
    app.config.update(
        SECRET_KEY=os.environ.get("FLASK_SECRET_KEY", "example-only-not-secret"),
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": 30}} if sessions.is_sqlite(url) else {},
        SESSION_SYNC_REALM="example",
        SESSION_SYNC_COOKIE="session_sync",  # Flask's own signed session cookie is called "session"
    )
    store.init_app(app)  # first, so SessionSync finds Flask-SQLAlchemy
    session_sync.init_app(app)
    login_manager.init_app(app)
    login_manager.request_loader(session_sync.request_loader(load_user))
    login_manager.unauthorized_handler(session_sync.unauthorized)
    with app.app_context():
        User.__table__.create(store.engine, checkfirst=True)  # the app's table; session-sync's are Alembic's
    app.register_blueprint(routes)
    return app


routes = flask.Blueprint("example", __name__)


async def _exchange(code: str) -> sessions.SessionCreds:
    async with authn.AuthnClient.from_settings(session_sync.state.settings) as client:
        return await client.userinfo(code)


@routes.get("/callback")
def callback() -> Any:
    """Where Pangea's hosted login redirects: exchange the code, record the login with the app's user."""
    try:
        creds = asyncio.run(_exchange(flask.request.args.get("code", "")))
    except sessions.AuthnRequestRejected:
        return {"detail": "the login code is not valid"}, 400
    except sessions.AuthnError:
        return {"detail": "Pangea AuthN did not answer"}, 502
    identity = creds.active_token.identity
    if store.session.scalars(store.select(User).filter_by(pangea_user_id=identity)).first() is None:
        store.session.add(User(pangea_user_id=identity, email=creds.active_token.email))
    login = session_sync.record_login(creds.to_userinfo())
    store.session.commit()  # the user and the session commit together
    body = {"user_id": login.user_id, "email": login.email}
    if flask.request.args.get("style") == "bearer":
        return body | {"access_token": creds.active_token.token, "token_type": "Bearer"}
    answer = flask.jsonify(body)
    cookie = session_sync.state.guard.cookie
    answer.set_cookie(cookie, login.handle, httponly=True, samesite="Lax", secure=flask.request.is_secure)
    return answer


@routes.get("/me")
@flask_login.login_required
def me() -> Any:
    """Protected by Flask-Login; the user comes from the live session."""
    user = flask_login.current_user
    return {"email": user.email, "logouts": user.logouts}


@routes.get("/session")
@session_sync.session_required
def session() -> Any:
    """Protected by the extension itself."""
    found = session_sync.session
    assert found is not None
    return {"id": found.id, "user_id": found.user_id, "email": found.email}


@routes.post("/logout")
@flask_login.login_required
def logout() -> Any:
    """End the local session with the app's own write; ``?fail=1`` fails before the commit, to show the rollback."""
    found = session_sync.session
    assert found is not None
    flask_login.current_user.logouts += 1
    session_sync.logout(found.id)
    if flask.request.args.get("fail"):
        raise RuntimeError("failing on purpose, after the logout, before the commit")
    store.session.commit()
    answer = flask.jsonify({"logged_out": True})
    answer.delete_cookie(session_sync.state.guard.cookie)
    return answer
