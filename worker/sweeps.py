"""Sweep slots: each periodic sweep is recorded once, so a duplicate beat is a no-op.

Beat can fire twice (two schedulers, a restart inside a period); the slot's primary key turns the
second ``INSERT`` into nothing, as procrastinate does for its periodic tasks.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql, sqlite

from worker import db as dbmod
from worker import models
from worker.counts import SyncCountsDict
from worker.reports import LastSweep

W = models.SweepRun


def slot_of(now: datetime, period: timedelta) -> datetime:
    """The start of the sweep period that ``now`` falls in."""
    seconds = max(period.total_seconds(), 1.0)
    return datetime.fromtimestamp((now.timestamp() // seconds) * seconds, UTC)


def claim_slot(db: orm.Session, *, slot: datetime, now: datetime, kind: str = "beat") -> bool:
    """Record that a sweep runs for ``slot``; False if one already did (a duplicate)."""
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = (
        insert(W)
        .values(slot=slot, kind=kind, started_at=now)
        .on_conflict_do_nothing(index_elements=["slot"])
        .returning(W.slot)  # rowcount of an INSERT is not reliable across drivers; RETURNING is
    )
    return db.execute(stmt).first() is not None


def record_fanout(db: orm.Session, *, slot: datetime, due: int, batches: int) -> None:
    """Write how much work a sweep found and sent out."""
    db.execute(sa.update(W).where(W.slot == slot).values(due=due, batches=batches))


def add_counts(db: orm.Session, *, slot: datetime, counts: SyncCountsDict, now: datetime) -> None:
    """Add a batch's counts to its sweep's row (concurrent batches add up atomically)."""
    db.execute(
        sa.update(W)
        .where(W.slot == slot)
        .values(
            checked=W.checked + counts["checked"],
            refreshed=W.refreshed + counts["refreshed"],
            revoked=W.revoked + counts["revoked"],
            failed=W.failed + counts["failed"],
            stopped=sa.or_(W.stopped, sa.literal(counts["stopped"])),
            finished_at=now,
        )
    )


def last_sweep(db: orm.Session) -> LastSweep | None:
    """The most recent sweep as a JSON-friendly dict, or None if none ran yet."""
    row = db.scalars(sa.select(W).order_by(W.slot.desc()).limit(1)).first()
    if row is None:
        return None
    return {
        "slot": row.slot.isoformat(),
        "kind": row.kind,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "due": row.due,
        "batches": row.batches,
        "checked": row.checked,
        "refreshed": row.refreshed,
        "revoked": row.revoked,
        "failed": row.failed,
        "stopped": row.stopped,
    }


def purge(db: orm.Session, *, before: datetime) -> int:
    """Forget sweep records older than ``before``."""
    return dbmod.rowcount(db.execute(sa.delete(W).where(W.slot < before)))
