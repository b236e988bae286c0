"""Every statement on the ``logout_outbox`` table, one function each.

Functions take a SQLAlchemy ``Session`` and never make or commit one. Delivery runs two short
transactions around each Pangea call: claim with a lease (commit), then record the outcome
``WHERE claim_token = :mine AND state = 'pending'``, so the result of a worker whose lease lapsed
is dropped instead of overwriting what a later worker recorded. Writes after a batch are one
statement per kind of outcome, never one per event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import orm

from worker import db as dbmod
from worker import leases, models

E = models.LogoutEvent
_T = cast(sa.Table, models.LogoutEvent.__table__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedEvent:
    """An event this worker holds a lease on, as read at claim time (the token still encrypted)."""

    id: int
    kind: models.OutboxKind
    session_id: int | None
    user_id: str
    token_enc: str | None
    attempts: int
    created_at: datetime
    retried_at: datetime | None
    claim_token: str
    #: An earlier claim of this event lapsed (its holder died, or lost the database, mid-delivery):
    #: that holder may have delivered it, so "already logged out" is what Pangea should answer now.
    reclaimed: bool = False

    @classmethod
    def from_row(cls, row: Any, *, reclaimed: bool = False) -> ClaimedEvent:
        """From a row of :data:`CLAIM_COLUMNS`."""
        return cls(**row._asdict(), reclaimed=reclaimed)

    @property
    def queued_at(self) -> datetime:
        """When the event entered its current run of attempts: created, or put back by an operator."""
        return self.retried_at or self.created_at


CLAIM_COLUMNS = (
    E.id,
    E.kind,
    E.session_id,
    E.user_id,
    E.token_enc,
    E.attempts,
    E.created_at,
    E.retried_at,
    E.claim_token,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventView:
    """One event as the operator sees it: ids, attempts, errors and times, never a token."""

    id: int
    kind: models.OutboxKind
    state: models.OutboxState
    session_id: int | None
    user_id: str
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime
    claimed_until: datetime | None
    delivered_at: datetime | None
    dead_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> EventView:
        """From a row of :data:`VIEW_COLUMNS`."""
        return cls(**row._asdict())


VIEW_COLUMNS = (
    E.id,
    E.kind,
    E.state,
    E.session_id,
    E.user_id,
    E.attempts,
    E.last_error,
    E.created_at,
    E.next_attempt_at,
    E.claimed_until,
    E.delivered_at,
    E.dead_at,
)


# --- enqueue (the app's transaction) --------------------------------------------------------------


def add_session_logout(db: orm.Session, *, session_id: int, user_id: str, token_enc: str, now: datetime) -> int:
    """Queue ``/v2/client/session/logout`` for a session's (encrypted) active token; returns the event id."""
    stmt = (
        sa.insert(E)
        .values(
            kind=models.OutboxKind.SESSION,
            session_id=session_id,
            user_id=user_id,
            token_enc=token_enc,
            created_at=now,
            next_attempt_at=now,
        )
        .returning(E.id)
    )
    return int(db.execute(stmt).scalar_one())


def add_user_logout(db: orm.Session, *, user_id: str, now: datetime) -> int:
    """Queue ``/v2/session/logout`` for a user, unless one is pending already; returns the event id."""
    pending = db.execute(
        sa.select(E.id).where(models.event_is_pending(), E.kind == models.OutboxKind.USER, E.user_id == user_id)
    ).scalar()
    if pending is not None:
        return int(pending)
    stmt = (
        sa.insert(E)
        .values(kind=models.OutboxKind.USER, user_id=user_id, created_at=now, next_attempt_at=now)
        .returning(E.id)
    )
    return int(db.execute(stmt).scalar_one())


# --- delivery ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KnownSession:
    """One of a user's sessions that a user-wide logout ended here: its Pangea id and (encrypted) active token."""

    id: int
    pangea_session_id: str | None
    active_token_enc: str


def sessions_ended_by(db: orm.Session, *, user_id: str, since: datetime) -> list[KnownSession]:
    """The user's local sessions that were logged out at or after ``since`` (a user-wide logout's sessions)."""
    S = models.LocalSession
    stmt = (
        sa.select(S.id, S.pangea_session_id, S.active_token_enc)
        .where(S.user_id == user_id, S.state == models.SessionState.LOGGED_OUT, S.ended_at >= since)
        .order_by(S.id)
    )
    return [KnownSession(**row._asdict()) for row in db.execute(stmt)]


def sessions_started_since(db: orm.Session, *, user_id: str, since: datetime) -> list[tuple[str | None, str]]:
    """``(Pangea session id, active token id)`` of the user's active sessions recorded after ``since``.

    The logins that came after a user-wide logout was asked for: that logout must not end them.
    """
    S = models.LocalSession
    stmt = sa.select(S.pangea_session_id, S.active_token_id).where(
        S.user_id == user_id, models.session_is_active(), S.created_at > since
    )
    return [(row.pangea_session_id, row.active_token_id) for row in db.execute(stmt)]


def _due(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        models.event_is_pending(),
        E.next_attempt_at <= now,
        leases.free(E, now),
    )


def claim_due_events(
    db: orm.Session,
    *,
    now: datetime,
    limit: int,
    lease: timedelta,
    claim_token: str,
    event_ids: Sequence[int] | None = None,
) -> list[ClaimedEvent]:
    """Lease up to ``limit`` due pending events to ``claim_token``, oldest due first.

    PostgreSQL picks the rows ``FOR UPDATE SKIP LOCKED`` in a CTE (see :func:`worker.db.picked`),
    so concurrent claimers take disjoint rows without waiting; on SQLite the conditional UPDATE
    itself is the claim.
    """
    due = _due(now)
    if event_ids is not None:
        due = sa.and_(due, E.id.in_(event_ids))
    # Every way a claim ends on purpose (recorded, released) clears claim_token: a due event that
    # still carries one was claimed before and that claim lapsed. Read before the claim overwrites it.
    if db.get_bind().dialect.name == "sqlite":
        # SQLite cannot turn a read into a write once another writer committed: take the write
        # lock first (a write of no row), so the read and the claim see the same rows.
        db.execute(sa.update(E).where(sa.false()).values(claim_token=None))
    lapsed = set(db.execute(sa.select(E.id).where(due, E.claim_token.is_not(None))).scalars())
    pick = sa.select(E.id).where(due).order_by(E.next_attempt_at).limit(limit)
    stmt = (
        sa.update(E)
        .where(dbmod.picked(db, E.id, pick), due)
        .values(**leases.taken(claim_token, now=now, lease=lease))
        .returning(*CLAIM_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    return [ClaimedEvent.from_row(row, reclaimed=row.id in lapsed) for row in db.execute(stmt)]


def extend_claim(db: orm.Session, *, claim_token: str, until: datetime) -> int:
    """Keep the events leased to ``claim_token`` until ``until`` (a batch still in flight); how many.

    A batch of logouts can take longer than one lease when Pangea is slow or throttling: without
    this, its events would be claimed and sent again by another worker while the first is still
    sending them, and every second answer would be a spurious "already logged out".
    """
    stmt = (
        sa.update(E)
        .where(leases.held_by(E, claim_token), models.event_is_pending())
        .values(claimed_until=until)
        .execution_options(synchronize_session=False)
    )
    return dbmod.rowcount(db.execute(stmt))


def _guard() -> list[sa.ColumnElement[bool]]:
    return [
        _T.c.id == sa.bindparam("b_id"),
        leases.held_by(_T.c, sa.bindparam("b_claim")),
        _T.c.state == sa.literal_column("'pending'"),
    ]


def mark_delivered(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> None:
    """Mark claimed events delivered and erase their tokens: one statement for the batch.

    Each row: ``b_id``, ``b_claim``, ``attempts``.
    """
    params = [dict(r) | {"b_now": now} for r in rows]
    if params:
        stmt = (
            sa.update(_T)
            .where(*_guard())
            .values(
                state=models.OutboxState.DELIVERED.value,
                delivered_at=sa.bindparam("b_now"),
                token_enc=None,
                attempts=sa.bindparam("attempts"),
                **leases.given_back(),
            )
        )
        db.execute(stmt, params)


def reschedule(db: orm.Session, rows: Iterable[dict[str, Any]]) -> None:
    """Put claimed events back to pending for a later attempt: one statement for the batch.

    Each row: ``b_id``, ``b_claim``, ``attempts``, ``next_attempt_at``, ``last_error``.
    """
    params = [dict(r) for r in rows]
    if params:
        stmt = (
            sa.update(_T)
            .where(*_guard())
            .values(
                attempts=sa.bindparam("attempts"),
                next_attempt_at=sa.bindparam("next_attempt_at", type_=models.UtcDateTime()),
                last_error=sa.bindparam("last_error"),
                **leases.given_back(),
            )
        )
        db.execute(stmt, params)


def mark_dead(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> None:
    """Make claimed events dead letters with their reason: one statement for the batch.

    The encrypted token stays, so an operator can replay a session logout (``outbox --retry-dead``).
    Each row: ``b_id``, ``b_claim``, ``attempts``, ``last_error``.
    """
    params = [dict(r) | {"b_now": now} for r in rows]
    if params:
        stmt = (
            sa.update(_T)
            .where(*_guard())
            .values(
                state=models.OutboxState.DEAD.value,
                dead_at=sa.bindparam("b_now"),
                attempts=sa.bindparam("attempts"),
                last_error=sa.bindparam("last_error"),
                **leases.given_back(),
            )
        )
        db.execute(stmt, params)


def release(db: orm.Session, *, claim_token: str) -> int:
    """Give back every lease held under ``claim_token`` without changing anything else."""
    return leases.release(db, E, claim_token=claim_token)


# --- the operator's view ------------------------------------------------------------------------


def list_events(
    db: orm.Session, *, states: Sequence[models.OutboxState], limit: int = 100, event_ids: Sequence[int] | None = None
) -> list[EventView]:
    """Events in ``states``, oldest first (ids, attempts, errors, times; never a token)."""
    stmt = sa.select(*VIEW_COLUMNS).where(E.state.in_([s.value for s in states])).order_by(E.id).limit(limit)
    if event_ids is not None:
        stmt = stmt.where(E.id.in_(event_ids))
    return [EventView.from_row(row) for row in db.execute(stmt)]


#: ``last_error`` of an event whose "already logged out" answer the mass-revocation guard held.
HELD_ERROR = "held by the mass-revocation guard: Pangea answered 'already logged out'"


def make_held_due(db: orm.Session, *, now: datetime) -> int:
    """An operator confirmed: events the guard held are due again now; returns how many."""
    stmt = (
        sa.update(E)
        .where(E.state == models.OutboxState.PENDING, E.last_error == HELD_ERROR)
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    return dbmod.rowcount(db.execute(stmt))


def retry_dead(db: orm.Session, *, now: datetime, event_ids: Sequence[int] | None = None) -> list[int]:
    """Put dead letters (all, or these ids) back to pending, due now, with a fresh budget; their ids.

    A session logout without its token (an erased or damaged row) cannot be replayed and stays dead.
    """
    where = [E.state == models.OutboxState.DEAD, sa.or_(E.kind == models.OutboxKind.USER, E.token_enc.is_not(None))]
    if event_ids is not None:
        where.append(E.id.in_(event_ids))
    stmt = (
        sa.update(E)
        .where(*where)
        .values(
            state=models.OutboxState.PENDING,
            attempts=0,
            next_attempt_at=now,
            retried_at=now,
            dead_at=None,
            **leases.given_back(),
        )
        .returning(E.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(int(i) for i in db.execute(stmt).scalars())


def purge_delivered(db: orm.Session, *, before: datetime) -> int:
    """Delete delivered events delivered before ``before``; returns how many."""
    stmt = sa.delete(E).where(E.state == models.OutboxState.DELIVERED, E.delivered_at < before)
    return dbmod.rowcount(db.execute(stmt.execution_options(synchronize_session=False)))


def backlog(db: orm.Session, *, now: datetime) -> dict[str, Any]:
    """The pending backlog: how many are due now, leased, and how old the oldest is (seconds)."""
    due = db.execute(sa.select(sa.func.count()).where(_due(now))).scalar_one()
    leased = db.execute(
        sa.select(sa.func.count()).where(models.event_is_pending(), E.claimed_until >= now)
    ).scalar_one()
    oldest = db.execute(sa.select(sa.func.min(E.created_at)).where(models.event_is_pending())).scalar_one()
    return {
        "due": int(due),
        "leased": int(leased),
        "oldest_pending_seconds": round((now - oldest).total_seconds(), 3) if oldest is not None else None,
    }
