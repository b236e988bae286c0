"""The Celery task names, defined once: other languages, Flower, beat and the after-commit kick send them by name.

They are part of the worker's contract (a message sent by name must find its task), so they never
change; ``tests/unit/test_public_face.py`` pins them. This module imports nothing, so the web app's
kick (:mod:`worker.kick`) names its task without importing our Celery app.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ALL", "CHECK_BATCH", "DELIVER_LOGOUTS", "HOUSEKEEPING", "RESYNC", "RESYNC_BATCH", "SWEEP"]

#: Fan the due sessions out as batches (beat, every ``SESSION_SYNC_SWEEP_PERIOD``).
SWEEP: Final = "session_sync.sweep"
#: Claim one batch of due sessions and bring each in line with Pangea.
CHECK_BATCH: Final = "session_sync.check_batch"
#: Re-check one session or one user's sessions now (with no arguments: fan everything out).
RESYNC: Final = "session_sync.resync"
#: Re-check one batch of sessions by id (``resync --all`` sends one per ``batch_size``).
RESYNC_BATCH: Final = "session_sync.resync_batch"
#: Purge audit events past retention and old sweep records (beat, hourly).
HOUSEKEEPING: Final = "session_sync.housekeeping"
#: Deliver due logouts to Pangea (beat, and the kick after each logout commits).
DELIVER_LOGOUTS: Final = "session_sync.deliver_logouts"
#: Every task name, in the order the tasks are defined.
ALL: Final = (SWEEP, CHECK_BATCH, RESYNC, RESYNC_BATCH, HOUSEKEEPING, DELIVER_LOGOUTS)
