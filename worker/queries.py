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


def record_checks(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> None:
    """Write kept sessions' new facts and release their leases: one statement for the batch.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``next_check_at``, ``failures``, ``uncertain``,
    ``active_expires_at`` (None keeps the stored one), ``checked`` (whether Pangea answered).
    """
    params = [
        row | {"b_now": now, "b_checked_at": now if row.pop("checked") else None} for row in (dict(r) for r in rows)
    ]
    if not params:
        return
    if db.get_bind().dialect.name == "postgresql":
        db.execute(_RECORD_CHECKS_PG, _columns(params, _RECORD_CHECKS_KEYS) | {"b_now": now})
        return
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
    db.execute(stmt, params)


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


def revoke(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> None:
    """End claimed sessions as ``revoked`` with their reason: one statement for the batch.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``reason``.
    """
    params = [dict(r) | {"b_now": now} for r in rows]
    if not params:
        return
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
    db.execute(stmt, params)


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
    db: orm.Session, sessions: Sequence[ClaimedSession], *, now: datetime, lease: timedelta
) -> dict[int, int]:
    """Take the refresh right on these sessions by compare-and-swap; returns ``{id: new version}``.

    A row whose version moved since the claim (the app logged it out, another worker's lease
    took over) is skipped. The row is marked ``uncertain`` *before* Pangea is called, so a worker
    that dies mid-refresh leaves a trace: the next one will not revoke on the spent refresh token.
    """
    if not sessions:
        return {}
    claim_token = sessions[0].claim_token
    stmt = (
        sa.update(S)
        .where(
            sa.tuple_(S.id, S.version).in_([(s.id, s.version) for s in sessions]),
            S.claim_token == claim_token,
            models.session_is_active(),
        )
        .values(uncertain=True, claimed_until=now + lease, version=S.version + 1, updated_at=now)
        .returning(S.id, S.version)
        .execution_options(synchronize_session=False)
    )
    return {row.id: row.version for row in db.execute(stmt)}


def store_refreshed(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> None:
    """Write rotated tokens and release the leases: one statement for the batch.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``active_token_id``, ``active_token_enc``,
    ``active_token_hash``, ``refresh_token_enc``, ``active_expires_at``, ``active_issued_at``,
    ``refresh_expires_at``, ``pangea_session_id``, ``next_check_at``.
    """
    params = [dict(r) | {"b_now": now} for r in rows]
    if not params:
        return
    columns = (
        "active_token_id",
        "active_token_enc",
        "active_token_hash",
        "refresh_token_enc",
        "active_expires_at",
        "active_issued_at",
        "refresh_expires_at",
        "pangea_session_id",
        "next_check_at",
    )
    stmt = (
        sa.update(_T)
        .where(*_guard())
        .values(
            **{c: sa.bindparam(c) for c in columns},
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
    db.execute(stmt, params)


def drop_refresh_tokens(db: orm.Session, ids: Sequence[int]) -> None:
    """Forget refresh tokens known to be spent, so they are never tried again."""
    if ids:
        db.execute(
            sa.update(S)
            .where(S.id.in_(ids))
            .values(refresh_token_enc=None)
            .execution_options(synchronize_session=False)
        )
