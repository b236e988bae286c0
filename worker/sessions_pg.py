"""``worker.sessions`` on PostgreSQL: calls of the database contract's functions (README "Database contract").

The functions (revision ``7d1c4e2a9b30``) are the one implementation of every write on PostgreSQL
(recording a login, logging out); apps in other languages call the same ones, so the rows the
worker acts on cannot drift from ours. SQLite has no stored functions: there ``worker.sessions``
runs the same rules in Python, and the tests run every rule on both. ``authenticate`` reads only
and runs on every request, so it keeps its bare indexed SELECT; ``session_sync_authenticate`` is
for other languages, held to it answer for answer by the tests.

Each call is one statement in the caller's transaction. Keys stay here: the database is given
hashes and ciphertexts only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

#: Names of the functions, as the migration creates them (part of the database contract).
RECORD_LOGIN = "session_sync_record_login"
AUTHENTICATE = "session_sync_authenticate"
AUTHENTICATE_ID = "session_sync_authenticate_id"
LOGOUT = "session_sync_logout"
LOGOUT_USER = "session_sync_logout_user"


def is_postgresql(db: orm.Session | sa.Connection) -> bool:
    """Whether ``db`` talks to PostgreSQL (and so has the contract's functions)."""
    bind = db.get_bind() if isinstance(db, orm.Session) else db
    return bind.dialect.name == "postgresql"


_RECORD_LOGIN = sa.text(
    f"""
    SELECT session_id, outcome FROM {RECORD_LOGIN}(
        p_user_id => :user_id, p_email => :email, p_pangea_session_id => :pangea_session_id,
        p_active_token_id => :active_token_id, p_active_token_enc => :active_token_enc,
        p_active_token_hash => :active_token_hash, p_refresh_token_enc => :refresh_token_enc,
        p_active_issued_at => :active_issued_at, p_active_expires_at => :active_expires_at,
        p_refresh_expires_at => :refresh_expires_at, p_handle_hash => CAST(:handle_hash AS text),
        p_next_check_at => coalesce(CAST(:next_check_at AS timestamptz), 'infinity'), p_now => :now
    )
    """
)


def record_login(db: orm.Session, values: dict[str, Any]) -> tuple[int | None, str]:
    """``(session id, outcome)``: ``recorded``, ``already_recorded`` (the same live login) or ``conflict``."""
    row = db.execute(_RECORD_LOGIN, values).one()
    return (None if row.session_id is None else int(row.session_id)), str(row.outcome)


_LOGOUT = sa.text(f"SELECT session_id, state, event_id FROM {LOGOUT}(CAST(:id AS bigint), :reason, :now)")
_LOGOUT_USER = sa.text(f"SELECT user_id, session_ids, event_id FROM {LOGOUT_USER}(:user_id, :reason, :now)")


def logout(db: orm.Session, *, session_id: int, reason: str, now: datetime) -> tuple[bool, int | None]:
    """``(found, event id)``: the event id is None when the session had already ended."""
    row = db.execute(_LOGOUT, {"id": session_id, "reason": reason, "now": now}).first()
    if row is None:
        return False, None
    return True, (None if row.event_id is None else int(row.event_id))


def logout_user(db: orm.Session, *, user_id: str, reason: str, now: datetime) -> tuple[list[int], int] | None:
    """``(ended session ids, user logout event id)``; None for a user who never had a local session."""
    row = db.execute(_LOGOUT_USER, {"user_id": user_id, "reason": reason, "now": now}).first()
    if row is None:
        return None
    return [int(i) for i in row.session_ids], int(row.event_id)
