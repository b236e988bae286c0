"""The shapes of what ``session-sync status`` reports: typed, so mypy checks every reader (the CLI, the exporter).

Plain JSON types only (strings, numbers, booleans, ISO times), so a report prints as JSON and a
gauge reading is cached in Redis as it is. This module imports nothing of ours: every layer may use it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NotRequired, TypedDict

__all__ = ["AuditEntry", "GuardState", "LastSweep", "SessionReport", "StatusReport"]


class LastSweep(TypedDict):
    """The most recent sweep (``sweep_runs``), as ``sweeps.last_sweep`` reads it."""

    slot: str
    kind: str
    started_at: str
    finished_at: str | None
    due: int
    batches: int
    checked: int
    refreshed: int
    revoked: int
    failed: int
    stopped: bool


class GuardState(TypedDict):
    """The mass-revocation guard: tripped or not; when tripped, since when and why."""

    tripped: bool
    tripped_at: NotRequired[str]
    reason: NotRequired[str | None]
    checked: NotRequired[int]
    would_revoke: NotRequired[int]


class StatusReport(TypedDict):
    """Sessions by state, due now, outbox backlog and dead letters, the last sweep (``operations.status``)."""

    sessions: dict[str, int]
    due: int
    uncertain: int
    failing: int
    outbox: dict[str, int]
    #: ``outbox_queries.backlog``: due, leased, oldest_pending_seconds.
    outbox_backlog: dict[str, Any]
    last_sweep: LastSweep | None
    revocation_guard: GuardState
    #: Added by the exporter for its gauge (the latest sweep that was not stopped).
    last_successful_sweep_at: NotRequired[datetime | None]


class AuditEntry(TypedDict):
    """One row of a session's audit trail, as ``status --session`` shows it."""

    at: str
    action: str
    outcome: str
    reason: str | None
    request_id: str | None


class SessionReport(TypedDict):
    """One session's state and its audit trail, newest first (``operations.session_report``)."""

    id: int
    user_id: str
    state: str
    end_reason: str | None
    ended_at: str | None
    active_expires_at: str
    #: Its own due time, or its group's next round (worker.verification).
    next_check_at: str | None
    #: When Pangea last vouched for it, derived (NULL: not since the login).
    last_checked_at: str | None
    failures: int
    uncertain: bool
    events: list[AuditEntry]
