"""The web app's side: record a login, authenticate a request, log out.

The app passes its own SQLAlchemy ``Session`` (``db``) and owns the transaction: these functions
flush but never commit, so a login or logout commits together with the app's own writes.
Tokens are encrypted at rest and looked up by keyed hash; ``authenticate`` never calls Pangea.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from worker import audit, crypto, decisions, errors, models, outbox, outbox_queries, wire
from worker.settings import Settings

#: Realm in ``WWW-Authenticate`` answers unless the app names its own.
DEFAULT_REALM = "session-sync"
_RNG = random.SystemRandom()

_DESCRIPTIONS = {
    "unknown": "The token is not recognized",
    "expired": "The token expired",
    "logged_out": "The session was logged out",
    "revoked": "The session was revoked",
}


@functools.cache
def default_cipher() -> crypto.TokenCipher:
    """The cipher from the environment (``SESSION_SYNC_ENCRYPTION_KEYS``), built once per process."""
    return crypto.TokenCipher.from_settings(Settings.from_env())


@functools.cache
def default_policy() -> decisions.Policy:
    """The worker's check and refresh knobs from the environment, so a login is first checked in time."""
    return decisions.Policy.from_settings(Settings.from_env())


def record_login(
    db: orm.Session,
    userinfo: Mapping[str, Any],
    *,
    cipher: crypto.TokenCipher | None = None,
    now: datetime | None = None,
    policy: decisions.Policy | None = None,
) -> models.LocalSession:
    """Store a local session from a ``/v2/client/userinfo`` (or refresh) envelope or its ``result``.

    Raises ``errors.InvalidUserinfo`` naming the problem (never a token) and writes nothing when
    the payload is not Pangea's.
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
    next_check = decisions.plan_next_check(facts, now, policy or default_policy(), _RNG)
    row = models.LocalSession(
        user_id=active.identity,
        email=active.email,
        pangea_session_id=refresh.id,
        active_token_id=active.id,
        active_token_enc=cipher.encrypt(active.token),
        active_token_hash=cipher.lookup_hash(active.token),
        refresh_token_enc=cipher.encrypt(refresh.token),
        active_expires_at=active.expire,
        active_issued_at=active.created_at,
        refresh_expires_at=refresh.expire,
        next_check_at=next_check,
        created_at=now,
        updated_at=now,
    )
    db.add(row)
    db.flush()
    return row


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
        return wire.SessionCreds.from_wire(result, request_id=request_id)
    except errors.AuthnProtocolError as exc:
        raise errors.InvalidUserinfo(f"userinfo is not Pangea's: {exc}") from None


def authenticate(
    db: orm.Session,
    token_or_session_id: str | int,
    *,
    cipher: crypto.TokenCipher | None = None,
    now: datetime | None = None,
    realm: str = DEFAULT_REALM,
) -> models.LocalSession:
    """The live local session for an active token or a local session id; else ``SessionInvalid``.

    Answers from the local database only: no Pangea call on the request path.
    """
    now = now or datetime.now(UTC)
    if isinstance(token_or_session_id, int):
        row = db.get(models.LocalSession, token_or_session_id)
    else:
        hashes = (cipher or default_cipher()).lookup_hashes(token_or_session_id)
        row = db.scalars(
            sa.select(models.LocalSession).where(models.LocalSession.active_token_hash.in_(hashes))
        ).first()
    if row is None:
        raise _invalid("unknown", realm)
    if row.state is models.SessionState.LOGGED_OUT:
        raise _invalid("logged_out", realm)
    if row.state is models.SessionState.REVOKED:
        raise _invalid("expired" if row.end_reason == "expired" else "revoked", realm)
    if row.active_expires_at <= now:
        raise _invalid("expired", realm)
    return row


def _invalid(reason: str, realm: str) -> errors.SessionInvalid:
    return errors.SessionInvalid(_DESCRIPTIONS[reason], realm=realm, reason=reason)


# --- logout: end the local session and queue the Pangea logout, in the caller's transaction ------

#: ``end_reason`` of a session the app (or its user) logged out.
DEFAULT_LOGOUT_REASON = "user_logout"


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
            state=models.SessionState.LOGGED_OUT,
            end_reason=reason,
            ended_at=now,
            updated_at=now,
            refresh_token_enc=None,  # spent with the session; nobody may refresh it again
            claimed_until=None,
            claim_token=None,
            version=S.version + 1,  # a sync worker holding the row drops its result
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
    kick: outbox.Kick = None,
) -> models.LocalSession:
    """End a local session and queue its Pangea logout, in the caller's transaction (flushed, not committed).

    Idempotent: a session that already ended is returned as it is, and nothing more is queued.
    Raises ``errors.UnknownSession`` when there is no such session. ``kick`` (see
    ``worker.outbox.kick_after_commit``) starts delivery right after the commit.
    """
    now = now or datetime.now(UTC)
    ended = db.execute(_end_sessions(models.LocalSession.id == session_id, reason=reason, now=now)).first()
    if ended is not None:
        outbox_queries.add_session_logout(
            db, session_id=ended.id, user_id=ended.user_id, token_enc=ended.active_token_enc, now=now
        )
        audit.record_one(db, _logged_out(ended.id, reason), now=now)
        outbox.kick_after_commit(db, kick)
    row = db.get(models.LocalSession, session_id)
    if row is None:
        raise errors.UnknownSession(f"no local session with id {session_id}")
    return row


def logout_user(
    db: orm.Session,
    user_id: str,
    *,
    reason: str = DEFAULT_LOGOUT_REASON,
    now: datetime | None = None,
    kick: outbox.Kick = None,
) -> UserLogout:
    """End every active local session of a user and queue one ``/v2/session/logout`` for them.

    Runs in the caller's transaction (flushed, not committed). The Pangea logout ends the user's
    sessions everywhere, so it is queued even when no local session was still active; a pending one
    is reused instead of queuing another. Raises ``errors.UnknownSession`` for a user id that never
    had a local session.
    """
    now = now or datetime.now(UTC)
    S = models.LocalSession
    ended = sorted(row.id for row in db.execute(_end_sessions(S.user_id == user_id, reason=reason, now=now)))
    if not ended and db.execute(sa.select(S.id).where(S.user_id == user_id).limit(1)).first() is None:
        raise errors.UnknownSession(f"no local session for user {user_id}")
    event_id = outbox_queries.add_user_logout(db, user_id=user_id, now=now)
    audit.record(db, [_logged_out(sid, reason) for sid in ended], now=now)
    outbox.kick_after_commit(db, kick)
    return UserLogout(user_id=user_id, session_ids=tuple(ended), event_id=event_id)


def _logged_out(session_id: int, reason: str) -> audit.Event:
    return audit.Event(session_id=session_id, action="logged_out", outcome="logout_queued", reason=reason)
