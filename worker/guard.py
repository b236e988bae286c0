"""The mass-revocation guard: one wrong setting must not log every user out, nor lose their logouts.

A wrong ``PANGEA_DOMAIN`` or another project's token makes Pangea answer ``InvalidToken`` for every
session, and a Pangea incident can do the same. If one batch would revoke more than a set share of
the sessions it checked (and at least a minimum count), the guard trips: those revocations and all
later ones are held (the sessions stay active and are re-checked) until an operator confirms with
``session-sync resync --all --confirm-revocations``. The state is one row in ``revocation_guard``,
shared by every worker.

The same mistake turns every logout into "already logged out" (InvalidToken from the wrong
project), which the outbox would record as delivered while the sessions live on at the right one.
So the outbox trips the guard too when a batch's share of such answers is a mass one, and while the
guard is tripped those answers are held, not taken as deliveries.

Only answers that could tell a wrong project from a right one are weighed. "Already logged out" is
Pangea's right answer to a logout sent again after an attempt that may have been performed (a
timeout, an answer lost, a worker killed mid-delivery): ordinary under faults, and under a slow
Pangea it once came by the dozen, so those retries are weighed by no guard (:func:`first_delivery`);
a wrong project answers the same to every first delivery, which trips the guard as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql, sqlite

from worker import models
from worker.reports import GuardState

logger = logging.getLogger(__name__)

G = models.RevocationGuard
_ROW = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """When the guard trips: more than ``share`` of a batch's checked sessions, and at least ``minimum``."""

    share: float = 0.2
    minimum: int = 50

    def exceeded(self, *, checked: int, would_revoke: int) -> bool:
        """True when ``would_revoke`` out of ``checked`` is a mass revocation."""
        return would_revoke >= self.minimum and would_revoke > self.share * max(checked, 1)


def first_delivery(attempts: int, reclaimed: bool) -> bool:
    """True when a logout is sent for the first time: no attempt of ours can have performed it before.

    ``attempts`` counts the recorded failures; ``reclaimed`` says an earlier claim lapsed (its
    worker died or lost the database mid-delivery, perhaps after Pangea acted).
    """
    return attempts == 0 and not reclaimed


#: What tripped the guard, as its reason says it (sweeps revoke; the outbox hears "already logged out").
SESSIONS = "sessions checked in one batch would be revoked"
LOGOUTS = "logouts in one batch were answered as already logged out (nothing would reach Pangea)"
#: After an operator confirmed, the outbox does not trip the guard again for this long.
CONFIRMED_FOR = timedelta(hours=1)


def hold_revocations(
    db: orm.Session,
    *,
    checked: int,
    would_revoke: int,
    limits: Limits,
    now: datetime,
    bypass: bool = False,
    what: str = SESSIONS,
) -> bool:
    """True when this batch's revocations must be held (the guard is tripped, or trips now)."""
    if bypass or would_revoke == 0:
        return False
    state = db.get(G, _ROW)
    if state is not None and state.tripped_at is not None:
        return True
    if not limits.exceeded(checked=checked, would_revoke=would_revoke):
        return False
    reason = (
        f"{would_revoke} of {checked} {what} "
        f"(limit: {limits.share:.0%} and at least {limits.minimum}); check PANGEA_DOMAIN, "
        "PANGEA_AUTHN_TOKEN and Pangea's status, then run: session-sync resync --all --confirm-revocations"
    )
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    values = {"tripped_at": now, "reason": reason, "checked": checked, "would_revoke": would_revoke}
    stmt = insert(G).values(id=_ROW, **values)
    db.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
    logger.error("Mass revocation held: %s", reason, extra={"action": "revocation_guard_tripped"})
    return True


def clear(db: orm.Session, *, now: datetime) -> bool:
    """An operator confirmed: let revocations through again. True if the guard was tripped."""
    state = db.get(G, _ROW)
    if state is None or state.tripped_at is None:
        return False
    state.tripped_at = None
    state.cleared_at = now
    logger.warning("Revocation guard cleared by an operator", extra={"action": "revocation_guard_cleared"})
    return True


def confirmed_since(db: orm.Session, since: datetime) -> bool:
    """True when an operator cleared the guard after ``since`` (and it has not tripped again)."""
    row = db.get(G, _ROW)
    return row is not None and row.tripped_at is None and row.cleared_at is not None and row.cleared_at > since


def state(db: orm.Session) -> GuardState:
    """The guard for status: tripped or not, since when, and why."""
    row = db.get(G, _ROW)
    if row is None or row.tripped_at is None:
        return {"tripped": False}
    return {
        "tripped": True,
        "tripped_at": row.tripped_at.isoformat(),
        "reason": row.reason,
        "checked": row.checked,
        "would_revoke": row.would_revoke,
    }


def is_tripped(db: orm.Session) -> bool:
    """True while revocations are held."""
    return bool(db.execute(sa.select(G.tripped_at).where(G.id == _ROW)).scalar())
