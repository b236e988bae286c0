"""Revoke at once, by Pangea's ids: the entry points a future push from Pangea will call.

Pangea has no push today (no webhook, no back-channel logout), so the sweep finds dead sessions
within the revocation-latency budget. When a push arrives, it names a Pangea session (``pmt_``,
unique in ``sessions.pangea_session_id``) or a user (``pui_``); these end the local sessions
immediately, in the caller's transaction, and record why in the audit trail.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import orm

from worker import audit, models

S = models.LocalSession

#: The end reason written when Pangea told us, rather than a sweep finding out.
DEFAULT_REASON = "pangea_push"


def revoke_by_pangea_session_id(
    db: orm.Session, pangea_session_id: str, *, reason: str = DEFAULT_REASON, now: datetime | None = None
) -> list[int]:
    """Revoke the active local session of one Pangea session; returns the local ids ended (0 or 1).

    An id no local session has (unknown, or one no id column could hold) ends nothing: ``[]``.
    """
    if not models.fits_id_column(pangea_session_id):
        return []
    return _revoke(db, S.pangea_session_id == pangea_session_id, reason=reason, now=now)


def revoke_all_for_user(
    db: orm.Session, user_id: str, *, reason: str = DEFAULT_REASON, now: datetime | None = None
) -> list[int]:
    """Revoke every active local session of one Pangea user; returns the local ids ended (``[]`` if unknown)."""
    if not models.fits_id_column(user_id):
        return []
    return _revoke(db, S.user_id == user_id, reason=reason, now=now)


def _revoke(db: orm.Session, which: sa.ColumnElement[bool], *, reason: str, now: datetime | None) -> list[int]:
    now = now or datetime.now(UTC)
    stmt = (
        sa.update(S)
        .where(which, models.session_is_active())
        .values(**models.ending(models.SessionState.REVOKED, reason=reason, at=now))
        .returning(S.id)
        .execution_options(synchronize_session=False)
    )
    ids = [row.id for row in db.execute(stmt)]
    audit.record(db, [audit.Event(session_id=i, action="revoked", outcome="push", reason=reason) for i in ids], now=now)
    return ids
