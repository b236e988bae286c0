"""Every statement the sync engine runs on the ``sessions`` table, one function each.

Functions take a SQLAlchemy ``Session`` and never make or commit one: the engine owns the
transactions, and keeps each one short and away from any HTTP call. Writes after a claim are
guarded by ``claim_token`` and ``version``, so a result from a worker whose lease lapsed (or a row
the app logged out meanwhile) is dropped instead of overwriting newer facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import orm

from worker import db as dbmod
from worker import models

S = models.LocalSession
_T = cast(sa.Table, models.LocalSession.__table__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedSession:
    """A session this worker holds a lease on, as read at claim time (tokens still encrypted)."""

    id: int
    user_id: str
    active_token_id: str
    active_token_enc: str
    refresh_token_enc: str | None
    active_expires_at: datetime
    active_issued_at: datetime | None
    refresh_expires_at: datetime | None
    failures: int
    uncertain: bool
    version: int
    claim_token: str
    verified_at: datetime | None
    #: Pangea's id of the session as we know it (learned from Pangea's session list; see learn_session_ids).
    pangea_session_id: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> ClaimedSession:
        """From a row of :data:`CLAIM_COLUMNS`."""
        return cls(**row._asdict())


CLAIM_COLUMNS = (
    S.id,
    S.user_id,
    S.active_token_id,
    S.active_token_enc,
    S.refresh_token_enc,
    S.active_expires_at,
    S.active_issued_at,
    S.refresh_expires_at,
    S.failures,
    S.uncertain,
    S.version,
    S.claim_token,
    sa.func.coalesce(S.last_checked_at, S.created_at).label("verified_at"),
    S.pangea_session_id,
)


def _unclaimed(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(S.claimed_until.is_(None), S.claimed_until < now)


def claim_due_sessions(
    db: orm.Session,
    *,
    now: datetime,
    limit: int,
    lease: timedelta,
    claim_token: str,
    user_id: str | None = None,
    session_ids: Sequence[int] | None = None,
    due_by: datetime | None = None,
) -> list[ClaimedSession]:
    """Lease up to ``limit`` active sessions due by ``due_by`` (default: ``now``), oldest due first.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` in a CTE, so concurrent claimers take disjoint rows
    without waiting (see :func:`worker.db.picked` for why a CTE). SQLite drops ``FOR UPDATE``;
    there the conditional UPDATE itself is the claim, atomic because SQLite runs one writer at a time.
    """
    due = sa.and_(models.session_is_active(), S.next_check_at <= (due_by or now), _unclaimed(now))
    if user_id is not None:
        due = sa.and_(due, S.user_id == user_id)
    if session_ids is not None:
        due = sa.and_(due, S.id.in_(session_ids))
    pick = sa.select(S.id).where(due).order_by(S.next_check_at).limit(limit)
    stmt = (
        sa.update(S)
        .where(dbmod.picked(db, S.id, pick), due)
        .values(claimed_until=now + lease, claim_token=claim_token)
        .returning(*CLAIM_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    return [ClaimedSession.from_row(row) for row in db.execute(stmt)]


def count_due(db: orm.Session, *, now: datetime) -> int:
    """How many active sessions are due and not leased right now."""
    stmt = sa.select(sa.func.count()).where(models.session_is_active(), S.next_check_at <= now, _unclaimed(now))
    return int(db.execute(stmt).scalar_one())


def make_due(
    db: orm.Session, *, now: datetime, user_id: str | None = None, session_ids: Sequence[int] | None = None
) -> int:
    """Make active sessions due now (a manual resync); returns how many."""
    where = [models.session_is_active()]
    if user_id is not None:
        where.append(S.user_id == user_id)
    if session_ids is not None:
        where.append(S.id.in_(session_ids))
    stmt = sa.update(S).where(*where).values(next_check_at=now).execution_options(synchronize_session=False)
    return dbmod.rowcount(db.execute(stmt))


def _guard() -> list[sa.ColumnElement[bool]]:
    return [
        _T.c.id == sa.bindparam("b_id"),
        _T.c.claim_token == sa.bindparam("b_claim"),
        _T.c.version == sa.bindparam("b_version"),
        _T.c.state == sa.literal_column("'active'"),
    ]


def record_checks(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> set[int]:
    """Write kept sessions' new facts and release their leases; returns the ids actually written.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``next_check_at``, ``failures``, ``uncertain``,
    ``active_expires_at`` (None keeps the stored one), ``checked`` (whether Pangea answered).
    A row whose lease or version moved on is not written, and its id is not returned: the caller
    reports only what was applied. PostgreSQL: one statement for the batch.
    """
    params = [
        row | {"b_now": now, "b_checked_at": now if row.pop("checked") else None} for row in (dict(r) for r in rows)
    ]
    if not params:
        return set()
    if db.get_bind().dialect.name == "postgresql":
        result = db.execute(_RECORD_CHECKS_PG, _columns(params, _RECORD_CHECKS_KEYS) | {"b_now": now})
        return {int(i) for i in result.scalars()}
    stmt = (
        sa.update(_T)
        .where(*_guard())
        .values(
            next_check_at=sa.bindparam("next_check_at"),
            failures=sa.bindparam("failures"),
            uncertain=sa.bindparam("uncertain"),
            active_expires_at=sa.func.coalesce(
                sa.bindparam("active_expires_at", type_=models.UtcDateTime()), _T.c.active_expires_at
            ),
            last_checked_at=sa.func.coalesce(
                sa.bindparam("b_checked_at", type_=models.UtcDateTime()), _T.c.last_checked_at
            ),
            updated_at=sa.bindparam("b_now"),
            claimed_until=None,
            claim_token=None,
            version=_T.c.version + 1,
        )
    )
    return _applied(db, stmt, params)


def _applied(db: orm.Session, stmt: sa.Update, params: Sequence[dict[str, Any]]) -> set[int]:
    """Run a guarded UPDATE once per row (SQLite: no RETURNING with executemany); the ids it changed."""
    returning = stmt.returning(_T.c.id)
    applied: set[int] = set()
    for row in params:
        applied.update(int(i) for i in db.execute(returning, row).scalars())
    return applied


#: PostgreSQL: :func:`record_checks` as one statement over arrays (``unnest``), not one UPDATE per row.
#: The server plans and runs it once for the whole batch; keep it in step with the portable form above.
_RECORD_CHECKS_PG = sa.text(
    """
    UPDATE sessions SET
        next_check_at = v.next_check_at,
        failures = v.failures,
        uncertain = v.uncertain,
        active_expires_at = coalesce(v.active_expires_at, sessions.active_expires_at),
        last_checked_at = coalesce(v.checked_at, sessions.last_checked_at),
        updated_at = :b_now,
        claimed_until = NULL,
        claim_token = NULL,
        version = sessions.version + 1
    FROM unnest(
        CAST(:b_id AS bigint[]), CAST(:b_claim AS text[]), CAST(:b_version AS integer[]),
        CAST(:next_check_at AS timestamptz[]), CAST(:failures AS integer[]), CAST(:uncertain AS boolean[]),
        CAST(:active_expires_at AS timestamptz[]), CAST(:b_checked_at AS timestamptz[])
    ) AS v(id, claim, version, next_check_at, failures, uncertain, active_expires_at, checked_at)
    WHERE sessions.id = v.id AND sessions.claim_token = v.claim AND sessions.version = v.version
      AND sessions.state = 'active'
    RETURNING sessions.id
    """
)
_RECORD_CHECKS_KEYS = (
    "b_id",
    "b_claim",
    "b_version",
    "next_check_at",
    "failures",
    "uncertain",
    "active_expires_at",
    "b_checked_at",
)


def _columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[Any]]:
    """Rows of parameters turned into one list per key (arrays for ``unnest``)."""
    return {key: [row[key] for row in rows] for key in keys}


def revoke(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> set[int]:
    """End claimed sessions as ``revoked`` with their reason; returns the ids actually revoked.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``reason``. Revocations are rare, so each row
    is its own statement: a row whose lease or version moved on is left alone and not returned.
    """
    params = [dict(r) | {"b_now": now} for r in rows]
    if not params:
        return set()
    stmt = (
        sa.update(_T)
        .where(*_guard())
        .values(
            state=models.SessionState.REVOKED.value,
            end_reason=sa.bindparam("reason"),
            ended_at=sa.bindparam("b_now"),
            updated_at=sa.bindparam("b_now"),
            last_checked_at=sa.bindparam("b_now"),
            claimed_until=None,
            claim_token=None,
            version=_T.c.version + 1,
        )
    )
    return _applied(db, stmt, params)


def release(db: orm.Session, *, claim_token: str) -> int:
    """Give back every lease held under ``claim_token`` without changing anything else."""
    stmt = (
        sa.update(S)
        .where(S.claim_token == claim_token)
        .values(claimed_until=None, claim_token=None)
        .execution_options(synchronize_session=False)
    )
    return dbmod.rowcount(db.execute(stmt))


def begin_refresh(
    db: orm.Session, session: ClaimedSession, *, now: datetime, lease: timedelta, hold_token: str
) -> int | None:
    """Take the refresh hold on one claimed session by compare-and-swap; returns the new version.

    Called just before the refresh request goes out (never earlier: time spent queueing for the
    concurrency bound or the rate limit must not eat into the hold). The hold has its own token, so
    giving back the batch's claim (:func:`release`) never frees a row whose refresh is in flight. The
    row is marked ``uncertain`` *before* Pangea is called, so a worker that dies mid-refresh leaves a
    trace: the next one settles it before any refresh token goes out again. None when the row moved
    on since the claim (the app logged it out, another worker's claim took over).
    """
    stmt = (
        sa.update(S)
        .where(
            S.id == session.id,
            S.version == session.version,
            S.claim_token == session.claim_token,
            models.session_is_active(),
        )
        .values(
            uncertain=True, claimed_until=now + lease, claim_token=hold_token, version=S.version + 1, updated_at=now
        )
        .returning(S.version)
        .execution_options(synchronize_session=False)
    )
    version = db.execute(stmt).scalar()
    return None if version is None else int(version)


#: The columns :func:`store_refreshed` writes from a refresh's answer.
_REFRESHED_COLUMNS = (
    "active_token_id",
    "active_token_enc",
    "active_token_hash",
    "refresh_token_enc",
    "active_expires_at",
    "active_issued_at",
    "refresh_expires_at",
    "next_check_at",
)


def store_refreshed(db: orm.Session, row: dict[str, Any], *, now: datetime) -> bool:
    """Write one refresh's rotated tokens and release its hold; False when the session ended meanwhile.

    ``row``: ``b_id``, ``b_old_active_token_id`` and the columns of :data:`_REFRESHED_COLUMNS`.
    Guarded by the active token the refresh replaced, not by the hold: new tokens that reached us
    are the freshest fact there is, so they are stored even if the hold lapsed and another worker
    took the row meanwhile (that worker settles the row before presenting the refresh token, sees
    Pangea's new active token, and its own write loses the version race). Only an ended session, or
    one whose tokens someone else already replaced, is left alone.
    """
    stmt = (
        sa.update(_T)
        .where(
            _T.c.id == sa.bindparam("b_id"),
            _T.c.active_token_id == sa.bindparam("b_old_active_token_id"),
            _T.c.state == sa.literal_column("'active'"),
        )
        .values(
            **{c: sa.bindparam(c) for c in _REFRESHED_COLUMNS},
            # The replaced token keeps authenticating for a grace period (worker.sessions); SET
            # expressions read the row as it was, so this is the old active token's hash.
            previous_token_hash=_T.c.active_token_hash,
            rotated_at=sa.bindparam("b_now"),
            failures=0,
            uncertain=False,
            last_checked_at=sa.bindparam("b_now"),
            updated_at=sa.bindparam("b_now"),
            claimed_until=None,
            claim_token=None,
            version=_T.c.version + 1,
        )
    )
    return bool(_applied(db, stmt, [dict(row) | {"b_now": now}]))


def ended_session(db: orm.Session, session_id: int) -> tuple[str, str] | None:
    """``(user_id, state)`` of a session that is no longer active; None while it is active (or gone)."""
    row = db.execute(sa.select(S.user_id, S.state).where(S.id == session_id)).one_or_none()
    if row is None or row.state is models.SessionState.ACTIVE:
        return None
    return row.user_id, str(row.state)


def learn_session_ids(db: orm.Session, learned: dict[int, str]) -> int:
    """Store the session ids Pangea's session list gave for these local sessions; returns how many changed.

    The id written at login (the refresh token's) is a guess; the list's ``id`` is Pangea's word.
    Rare (once per session at most, and never where the guess was right), so one statement per row;
    an id that another local row already holds is left alone rather than failing the batch.
    """
    changed = 0
    for session_id, pangea_id in learned.items():
        taken = sa.select(S.id).where(S.pangea_session_id == pangea_id, S.id != session_id).exists()
        stmt = (
            sa.update(S)
            .where(S.id == session_id, sa.not_(taken))
            .values(pangea_session_id=pangea_id)
            .execution_options(synchronize_session=False)
        )
        changed += dbmod.rowcount(db.execute(stmt))
    return changed


def drop_refresh_tokens(db: orm.Session, ids: Sequence[int]) -> None:
    """Forget refresh tokens known to be spent, so they are never tried again."""
    if ids:
        db.execute(
            sa.update(S)
            .where(S.id.in_(ids))
            .values(refresh_token_enc=None)
            .execution_options(synchronize_session=False)
        )
