"""Leases: how a worker takes a row for a while (a session, a check group, an outbox event).

Every leased table has the same two columns: ``claimed_until``, when the lease lapses, and
``claim_token``, whose lease it is. A row is free when it has no lease or its lease has lapsed;
taking it sets both; every way a lease ends on purpose (a result written, a release) clears both.
A write of a result is guarded by the token it was read under (:func:`held_by`, or
:func:`held_as` where no lease is a token too), so a worker whose lease lapsed, and that another
worker took over, writes nothing.

The time passed as ``now`` is the caller's one clock for the whole statement (the engine and the
outbox take it from their clock seam): the lease is as long as the caller says, never renewed by
accident.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy import orm

from worker import db as dbmod

__all__ = ["Leased", "free", "given_back", "held_as", "held_by", "release", "taken"]


#: A mapped class with a lease (``models.LocalSession``, ``models.CheckGroup``, ``models.LogoutEvent``),
#: or its table's columns (``Table.c``, for an executemany). Any: mypy cannot match a mapped class's
#: columns against a protocol.
Leased: TypeAlias = Any


def free(table: Leased, now: datetime) -> sa.ColumnElement[bool]:
    """The row has no lease, or its lease lapsed before ``now``."""
    return sa.or_(table.claimed_until.is_(None), table.claimed_until < now)


def taken(claim_token: str, *, now: datetime, lease: timedelta) -> dict[str, Any]:
    """The values that lease a row to ``claim_token`` for ``lease`` from ``now``."""
    return {"claimed_until": now + lease, "claim_token": claim_token}


def given_back() -> dict[str, Any]:
    """The values that end a lease on purpose: no holder, no lapse time."""
    return {"claimed_until": None, "claim_token": None}


def held_by(table: Leased, claim_token: str | sa.BindParameter[str]) -> sa.ColumnElement[bool]:
    """The row is (still) leased to ``claim_token``."""
    held: sa.ColumnElement[bool] = table.claim_token == claim_token
    return held


def held_as(table: Leased, claim_token: str | sa.BindParameter[str] | None) -> sa.ColumnElement[bool]:
    """The row's lease is as it was read: ``claim_token``'s, or none when read without one (a manual resync)."""
    held: sa.ColumnElement[bool] = table.claim_token.is_not_distinct_from(claim_token)
    return held


def release(db: orm.Session, table: Leased, *, claim_token: str) -> int:
    """Give back every lease of ``table`` held under ``claim_token``, nothing else changed; how many."""
    stmt = (
        sa.update(table)
        .where(held_by(table, claim_token))
        .values(**given_back())
        .execution_options(synchronize_session=False)
    )
    return dbmod.rowcount(db.execute(stmt))
