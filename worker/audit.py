"""The audit trail: every decision the worker takes about a session, with Pangea's request id.

Answers "why was this user logged out?" (``session-sync status --session ID``). Rows are small
(ids, names, no token) and purged after a retention period by the periodic housekeeping task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import orm

from worker import db as dbmod
from worker import decisions, models

#: How long audit rows are kept by default.
DEFAULT_RETENTION = timedelta(days=30)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One recorded decision about one session."""

    session_id: int
    action: str
    outcome: str
    reason: str | None = None
    request_id: str | None = None

    @classmethod
    def of(
        cls, session_id: int, decision: decisions.Decision, answer: decisions.Answer, *, outcome: str | None = None
    ) -> Event:
        """The event for a decision taken on an answer (or on its absence); ``outcome`` overrides its name."""
        if outcome is None:
            outcome = answer.verdict.value if answer.verdict is not None else str(answer.failure)
        return cls(
            session_id=session_id,
            action=decision.counted_as,
            outcome=outcome,
            reason=decision.reason,
            request_id=answer.request_id,
        )

    @classmethod
    def refreshed(cls, session_id: int, request_id: str | None) -> Event:
        """A successful refresh."""
        return cls(session_id=session_id, action="refreshed", outcome="valid", request_id=request_id)


def record(db: orm.Session, events: Sequence[Event], *, now: datetime) -> None:
    """Insert the events of a batch: one statement."""
    if not events:
        return
    if db.get_bind().dialect.name == "postgresql":
        columns = {
            "session_id": [e.session_id for e in events],
            "action": [e.action for e in events],
            "outcome": [e.outcome for e in events],
            "reason": [e.reason for e in events],
            "request_id": [e.request_id for e in events],
        }
        db.execute(_RECORD_PG, columns | {"at": now})
        return
    rows = [
        {
            "session_id": e.session_id,
            "action": e.action,
            "outcome": e.outcome,
            "reason": e.reason,
            "request_id": e.request_id,
            "at": now,
        }
        for e in events
    ]
    db.execute(sa.insert(models.SessionEvent), rows)


#: PostgreSQL: :func:`record` as one INSERT over arrays (``unnest``), however many events.
_RECORD_PG = sa.text(
    """
    INSERT INTO session_events (session_id, at, action, outcome, reason, request_id)
    SELECT v.session_id, :at, v.action, v.outcome, v.reason, v.request_id
    FROM unnest(
        CAST(:session_id AS bigint[]), CAST(:action AS text[]), CAST(:outcome AS text[]),
        CAST(:reason AS text[]), CAST(:request_id AS text[])
    ) AS v(session_id, action, outcome, reason, request_id)
    """
)


def record_one(db: orm.Session, event: Event, *, now: datetime) -> None:
    """Insert one event (logins, logouts, pushes)."""
    record(db, [event], now=now)


def history(db: orm.Session, session_id: int, *, limit: int = 50) -> list[models.SessionEvent]:
    """The latest events of one session, newest first."""
    stmt = (
        sa.select(models.SessionEvent)
        .where(models.SessionEvent.session_id == session_id)
        .order_by(models.SessionEvent.at.desc(), models.SessionEvent.id.desc())
        .limit(limit)
    )
    return list(db.scalars(stmt))


def purge(db: orm.Session, *, now: datetime, retention: timedelta = DEFAULT_RETENTION) -> int:
    """Delete events older than the retention period; returns how many."""
    stmt = sa.delete(models.SessionEvent).where(models.SessionEvent.at < now - retention)
    return dbmod.rowcount(db.execute(stmt))
