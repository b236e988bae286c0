"""Celery tasks: thin shells with stable names (``worker.task_names``). Arguments and results carry ids and counts only.

Every task is idempotent, because ``acks_late`` redelivers after a crash: claims and sweep slots
in the database make a repeat a no-op or a harmless re-check.
"""

from __future__ import annotations

from worker import operations, runtime, task_names
from worker.celery import app
from worker.counts import (
    FanoutResult,
    HousekeepingResult,
    LogoutCountsDict,
    ResyncBatchResult,
    SweepResult,
    SyncCountsDict,
)


@app.task(name=task_names.SWEEP)
def sweep() -> SweepResult:
    """Fan the due sessions out as batches (one per ``batch_size``); a duplicate beat does nothing."""
    return operations.sweep(runtime.get(), lambda slot: check_batch.delay(slot=slot))


@app.task(name=task_names.CHECK_BATCH)
def check_batch(slot: str | None = None) -> SyncCountsDict:
    """Claim one batch of due sessions and bring each in line with Pangea."""
    return operations.check_batch(runtime.get(), slot=slot)


@app.task(name=task_names.RESYNC)
def resync(
    session_id: int | None = None, user_id: str | None = None, confirm_revocations: bool = False
) -> SyncCountsDict | FanoutResult:
    """Re-check now: one session, or one user's sessions; with no arguments, fan everything out as batches."""
    rt = runtime.get()
    if session_id is None and user_id is None:
        return operations.resync_fanout(
            rt, lambda ids: resync_batch.delay(session_ids=ids, confirm_revocations=confirm_revocations)
        )
    return operations.resync(rt, session_id=session_id, user_id=user_id, confirm_revocations=confirm_revocations)


@app.task(name=task_names.RESYNC_BATCH)
def resync_batch(session_ids: list[int], confirm_revocations: bool = False) -> ResyncBatchResult:
    """Re-check one batch of sessions by id (``resync --all`` sends one per ``batch_size``)."""
    counts = operations.resync(runtime.get(), session_ids=session_ids, confirm_revocations=confirm_revocations)
    return ResyncBatchResult(**counts, sessions=len(session_ids))


@app.task(name=task_names.HOUSEKEEPING)
def housekeeping() -> HousekeepingResult:
    """Purge audit events past retention and old sweep records."""
    return operations.housekeeping(runtime.get())


@app.task(name=task_names.DELIVER_LOGOUTS)
def deliver_logouts() -> LogoutCountsDict:
    """Deliver due logouts to Pangea (periodic, and kicked after each logout commits); counts only."""
    return operations.deliver_logouts(runtime.get())
