"""What tasks and the CLI do, once: sweep, process a batch, resync, report status.

Each takes the process's :class:`~worker.runtime.Runtime` and returns ids and counts only, so a
Celery task is a one-line shell around it and the CLI can run the same thing without a broker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa

from worker import audit, errors, forks, guard, metrics, models, outbox_queries, queries, sweeps, verification
from worker.counts import FanoutResult, HousekeepingResult, LogoutCountsDict, SweepResult, SyncCountsDict
from worker.reports import AuditEntry, SessionReport, StatusReport
from worker.runtime import Runtime

logger = logging.getLogger(__name__)


def sweep(rt: Runtime, send_batch: Callable[[str], None], *, at: datetime | None = None) -> SweepResult:
    """One periodic sweep: record its slot (a duplicate is a no-op), count due work, fan it out.

    ``send_batch(slot)`` queues one ``check_batch`` per piece of due work: one per due check group,
    and one per ``batch_size`` sessions due on their own. Each batch takes its work (a group's lease,
    or its rows' claims) when it runs, so a lease starts only when work does and overlapping sweeps
    never take the same session.
    """
    at = at or rt.clock()
    slot = sweeps.slot_of(at, rt.settings.sweep_period)
    with rt.sessions.begin() as db:
        if not sweeps.claim_slot(db, slot=slot, now=at):
            logger.info("Duplicate sweep skipped", extra={"action": "sweep_duplicate", "slot": slot.isoformat()})
            metrics.record_sweep(duplicate=True)
            return {"slot": slot.isoformat(), "duplicate": True, "due": 0, "batches": 0}
        work = queries.due_work(db, now=at)
        due = work.sessions + work.group_sessions
        pieces = work.groups + math.ceil(work.sessions / rt.settings.batch_size)
        batches = min(pieces, rt.settings.max_batches_per_sweep)
        sweeps.record_fanout(db, slot=slot, due=due, batches=batches)
    for _ in range(batches):
        send_batch(slot.isoformat())
    logger.info("Sweep fanned out", extra={"action": "sweep", "slot": slot.isoformat(), "due": due, "batches": batches})
    metrics.record_sweep(duplicate=False)
    return {"slot": slot.isoformat(), "duplicate": False, "due": due, "batches": batches}


def check_batch(rt: Runtime, *, slot: str | None = None) -> SyncCountsDict:
    """Claim and process one batch of due sessions; add its counts to its sweep's record.

    If Pangea refuses our own token the batch changes nothing, the sweep is marked stopped, and the
    reason is logged loudly: every later sweep tries again, so fixing the token is the only step.
    """
    counts = rt.run(rt.engine.process_batch()).as_dict()
    if slot is not None and (counts["checked"] or counts["stopped"]):
        with rt.sessions.begin() as db:
            sweeps.add_counts(db, slot=datetime.fromisoformat(slot), counts=counts, now=rt.clock())
    metrics.record_counts(counts)
    return counts


def sweep_once(rt: Runtime, *, processes: int = 1) -> SyncCountsDict:
    """One whole sweep, no broker (cron): every due session, batch after batch, on ``processes`` processes."""
    forks.check_processes(rt.settings, processes)  # refused before the slot is taken
    at = rt.clock()
    slot = sweeps.slot_of(at, rt.settings.sweep_period)
    with rt.sessions.begin() as db:
        claimed = sweeps.claim_slot(db, slot=slot, now=at, kind="once")
    counts = forks.drain(rt, processes).as_dict()
    if claimed:
        with rt.sessions.begin() as db:
            sweeps.add_counts(db, slot=slot, counts=counts, now=rt.clock())
    metrics.record_counts(counts)
    return counts


def resync(
    rt: Runtime,
    *,
    session_id: int | None = None,
    user_id: str | None = None,
    session_ids: Sequence[int] | None = None,
    confirm_revocations: bool = False,
) -> SyncCountsDict:
    """Re-check one session, some sessions by id, one user's sessions, or all (no arguments), now.

    ``confirm_revocations`` clears a tripped mass-revocation guard and lets this resync revoke.
    """
    ids: Sequence[int] | None = [session_id] if session_id is not None else session_ids
    if confirm_revocations:  # logouts the guard held go out again now, not after their pause
        with rt.sessions.begin() as db:
            outbox_queries.make_held_due(db, now=rt.clock())
    counts = rt.engine.resync(user_id=user_id, session_ids=ids, confirm_revocations=confirm_revocations)
    done = rt.run(counts).as_dict()
    metrics.record_counts(done)
    return done


def resync_batches(rt: Runtime) -> Iterator[list[int]]:
    """Every active session's id, in batches of ``batch_size``, streamed by the primary key.

    ``resync --all`` sends one task per batch, as a sweep does, so no task grows with the number
    of sessions (a single task over 100k sessions outlives RabbitMQ's consumer timeout).
    """
    S = models.LocalSession
    size = rt.settings.batch_size
    with rt.sessions() as db:
        ids = db.execute(
            sa.select(S.id).where(models.session_is_active()).order_by(S.id).execution_options(yield_per=size)
        ).scalars()
        batch: list[int] = []
        for session_id in ids:
            batch.append(int(session_id))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


def resync_fanout(rt: Runtime, send_batch: Callable[[list[int]], None]) -> FanoutResult:
    """Queue a resync of every active session, one ``send_batch(ids)`` per batch; returns what was sent."""
    batches = sessions = 0
    for ids in resync_batches(rt):
        send_batch(ids)
        batches += 1
        sessions += len(ids)
    logger.info("Resync fanned out", extra={"action": "resync_fanout", "batches": batches, "sessions": sessions})
    return {"batches": batches, "sessions": sessions}


def require_known(rt: Runtime, *, session_id: int | None = None, user_id: str | None = None) -> None:
    """Raise ``errors.UnknownSession`` when ``session_id`` or ``user_id`` names no local session (ended ones count)."""
    S = models.LocalSession
    with rt.sessions() as db:
        if session_id is not None and (not models.is_row_id(session_id) or db.get(S, session_id) is None):
            raise errors.UnknownSession(f"no local session with id {session_id}")
        if user_id is not None and (
            not models.fits_id_column(user_id)
            or db.execute(sa.select(S.id).where(S.user_id == user_id).limit(1)).first() is None
        ):
            shown = repr(user_id) if len(user_id) <= 80 else repr(user_id[:77]) + "..."
            raise errors.UnknownSession(f"no local session for user {shown}")


def housekeeping(rt: Runtime) -> HousekeepingResult:
    """Purge audit events past retention and old sweep records."""
    at = rt.clock()
    with rt.sessions.begin() as db:
        events = audit.purge(db, now=at, retention=rt.settings.audit_retention)
        runs = sweeps.purge(db, before=at - timedelta(days=7))
    return {"events_purged": events, "sweeps_purged": runs}


def status(rt: Runtime) -> StatusReport:
    """Sessions by state, due now, outbox backlog and dead letters, the last sweep."""
    at = rt.clock()
    S, E = models.LocalSession, models.LogoutEvent
    with rt.sessions() as db:
        by_state = {str(state): 0 for state in models.SessionState}
        for state, count in db.execute(sa.select(S.state, sa.func.count()).group_by(S.state)):
            by_state[str(state)] = int(count)
        outbox = {str(kind): 0 for kind in models.OutboxState}
        for outbox_state, count in db.execute(sa.select(E.state, sa.func.count()).group_by(E.state)):
            outbox[str(outbox_state)] = int(count)
        uncertain = db.execute(
            sa.select(sa.func.count()).where(models.session_is_active(), S.uncertain.is_(True))
        ).scalar_one()
        failing = db.execute(sa.select(sa.func.count()).where(models.session_is_active(), S.failures > 0)).scalar_one()
        return {
            "sessions": by_state,
            "due": queries.count_due(db, now=at),
            "uncertain": int(uncertain),
            "failing": int(failing),
            "outbox": outbox,
            "outbox_backlog": outbox_queries.backlog(db, now=at),
            "last_sweep": sweeps.last_sweep(db),
            "revocation_guard": guard.state(db),
        }


def session_report(rt: Runtime, session_id: int) -> SessionReport | None:
    """One session's state and its audit trail, newest first: "why was this user logged out?"."""
    with rt.sessions() as db:
        row = db.get(models.LocalSession, session_id)
        if row is None:
            return None
        # On its group's schedule the session's next check is its group's next round, and when it
        # was last checked is derived from the group (worker.verification).
        S, G = models.LocalSession, models.CheckGroup
        checked, group_next = db.execute(
            sa.select(
                verification.last_checked_at(),
                sa.select(G.next_check_at).where(queries.in_group()).scalar_subquery(),
            ).where(S.id == session_id)
        ).one()
        next_check = row.next_check_at or (group_next if row.state is models.SessionState.ACTIVE else None)
        events = [
            AuditEntry(
                at=e.at.isoformat(), action=e.action, outcome=e.outcome, reason=e.reason, request_id=e.request_id
            )
            for e in audit.history(db, session_id)
        ]
        return SessionReport(
            id=row.id,
            user_id=row.user_id,
            state=str(row.state),
            end_reason=row.end_reason,
            ended_at=row.ended_at.isoformat() if row.ended_at else None,
            active_expires_at=row.active_expires_at.isoformat(),
            next_check_at=next_check.isoformat() if next_check else None,
            last_checked_at=checked.isoformat() if checked else None,
            failures=row.failures,
            uncertain=row.uncertain,
            events=events,
        )


def deliver_logouts(rt: Runtime) -> LogoutCountsDict:
    """Deliver due logouts to Pangea, batch after batch, until none is due (or the run's budget is spent)."""
    counts = rt.run(rt.delivery.drain()).as_dict()
    metrics.record_logouts(counts)
    return counts
