"""What a run did, in counts: one type for the sync engine and the logout outbox, and the results tasks return.

Counts travel far (task results in Redis and Flower, ``sweep_runs``, metrics, the CLI's output), so
they hold ids and counts only, never a token. :class:`Counts` is the one shape: integers add up,
flags are sticky (a run that stopped once stopped), and each kind of run declares its own fields
(:class:`SyncCounts`, :class:`LogoutCounts`). What ``as_dict`` returns is a TypedDict, so mypy
checks every reader of a task result. This module imports nothing of ours: every layer may use it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Self, TypedDict

__all__ = [
    "Counts",
    "FanoutResult",
    "HousekeepingResult",
    "LogoutCounts",
    "LogoutCountsDict",
    "ResyncBatchResult",
    "SweepResult",
    "SyncCounts",
    "SyncCountsDict",
]


@dataclass(slots=True)
class Counts:
    """Counts of one run; :meth:`add` folds another run of the same kind in (ints add, flags stick, tallies merge)."""

    #: Pangea refused PANGEA_AUTHN_TOKEN during the run (it stopped there).
    stopped: bool = False

    def add(self, other: Self) -> None:
        """Fold another run's counts into this one."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, bool):
                setattr(self, f.name, mine or theirs)
            elif isinstance(mine, Counter):
                mine.update(theirs)
            else:
                setattr(self, f.name, mine + theirs)


class SyncCountsDict(TypedDict):
    """:meth:`SyncCounts.as_dict`: what a batch, ``sweep --once`` or a resync returns."""

    checked: int
    refreshed: int
    revoked: int
    failed: int
    kept: int
    held: int
    dropped: int
    stopped: bool
    revoked_by_reason: dict[str, int]


@dataclass(slots=True)
class SyncCounts(Counts):
    """What a batch, sweep or resync did; ids and counts only (safe for task results and Flower)."""

    checked: int = 0
    refreshed: int = 0
    revoked: int = 0
    failed: int = 0
    kept: int = 0
    #: Revocations the mass-revocation guard held back (the sessions stay active).
    held: int = 0
    #: Decisions not written because the row moved on meanwhile (logged out, taken over): not done.
    dropped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> SyncCountsDict:
        """A JSON-friendly summary (``reasons`` as ``revoked_by_reason``)."""
        return {
            "checked": self.checked,
            "refreshed": self.refreshed,
            "revoked": self.revoked,
            "failed": self.failed,
            "kept": self.kept,
            "held": self.held,
            "dropped": self.dropped,
            "stopped": self.stopped,
            "revoked_by_reason": dict(self.reasons),
        }


class LogoutCountsDict(TypedDict):
    """:meth:`LogoutCounts.as_dict`: what a logout delivery run returns."""

    claimed: int
    delivered: int
    already: int
    retried: int
    paused: int
    held: int
    dead: int
    stopped: bool


@dataclass(slots=True)
class LogoutCounts(Counts):
    """What a delivery run did (ids and counts only, never a token)."""

    claimed: int = 0
    delivered: int = 0
    already: int = 0
    retried: int = 0
    paused: int = 0
    #: "Already logged out" answers held back by the mass-revocation guard (still pending).
    held: int = 0
    dead: int = 0

    def as_dict(self) -> LogoutCountsDict:
        """A JSON-friendly summary; ``delivered`` includes ``already`` (logged out at Pangea before)."""
        return {
            "claimed": self.claimed,
            "delivered": self.delivered,
            "already": self.already,
            "retried": self.retried,
            "paused": self.paused,
            "held": self.held,
            "dead": self.dead,
            "stopped": self.stopped,
        }


class ResyncBatchResult(SyncCountsDict):
    """What ``session_sync.resync_batch`` returns: its counts, and how many sessions it was sent."""

    sessions: int


class SweepResult(TypedDict):
    """What a periodic sweep returns: its slot, whether another scheduler had it, the work it sent out."""

    slot: str
    duplicate: bool
    due: int
    batches: int


class FanoutResult(TypedDict):
    """What ``resync --all`` sent: how many batch tasks, how many sessions in them."""

    batches: int
    sessions: int


class HousekeepingResult(TypedDict):
    """What housekeeping purged."""

    events_purged: int
    sweeps_purged: int
