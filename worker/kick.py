"""The kick after a logout commits: send ``session_sync.deliver_logouts`` by name, from the web app's process.

The outbox row is the truth; the kick only makes delivery start in about a second instead of at
the next periodic run. It runs in the web app, so it must stay light: no import of our Celery app
(``worker.celery`` pulls in the worker's runtime, metrics and HTTP client). A bare Celery app, made
on the first kick and kept, publishes the message to our own queue (``SESSION_SYNC_QUEUE``), in
Celery's own message format, which the worker consumes like any other.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, orm

from worker import errors, task_names
from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: Longest a kick message waits in the broker before it is dropped (the periodic run covers it).
KICK_EXPIRES = 300.0

#: What ``kick`` accepts: None (kick when a broker is configured), True, False, or a callable to call instead.
Kick = bool | Callable[[], object] | None

_KICK_KEY = "session_sync.outbox_kick"


def kick_after_commit(db: orm.Session, kick: Kick = None, *, settings: Callable[[], Settings]) -> None:
    """Send ``session_sync.deliver_logouts`` once ``db`` commits (nothing on rollback).

    ``kick``: None sends it when a broker is configured (``CELERY_BROKER_URL`` set and
    ``SESSION_SYNC_OUTBOX_KICK`` not off), True always, False never; a callable is called instead
    (an app with its own Celery app, tests). ``settings`` returns the process's settings; it is
    called only when they are needed. Failures are logged, never raised: the row is the truth.
    """
    found = sender(kick, settings)
    if found is None:
        return
    db.info[_KICK_KEY] = found
    if not event.contains(db, "after_commit", _after_commit):
        event.listen(db, "after_commit", _after_commit)
        event.listen(db, "after_rollback", _after_rollback)


def send_delivery_task(broker_url: str, queue: str) -> None:
    """Publish ``session_sync.deliver_logouts`` to ``queue`` on ``broker_url``, without retrying."""
    _sender_app(broker_url).send_task(task_names.DELIVER_LOGOUTS, queue=queue, retry=False, expires=KICK_EXPIRES)


def broker_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether an automatic kick can reach a broker: CELERY_BROKER_URL set, kicks not switched off."""
    try:
        return automatic(Settings.from_env(os.environ if env is None else env))
    except errors.ConfigError:
        return False


def automatic(settings: Settings) -> bool:
    """Whether ``settings`` call for automatic kicks: a broker named explicitly (not ``memory://``), kicks on."""
    if "celery_broker_url" not in settings.model_fields_set or settings.celery_broker_url.startswith("memory://"):
        return False
    return settings.outbox_kick


@functools.cache
def _sender_app(broker_url: str) -> Celery:
    """A bare Celery app that only sends (one per broker URL and process; its connection pool is reused)."""
    from celery import Celery

    return Celery("session_sync_kick", broker=broker_url, set_as_current=False)


def sender(kick: Kick, settings: Callable[[], Settings]) -> Callable[[], object] | None:
    """What ``kick`` sends after a commit (None: nothing); also for glue whose commit is not SQLAlchemy's (Django)."""
    if kick is False:
        return None
    if kick is True or kick is None:
        try:
            current = settings()
        except errors.ConfigError as exc:  # a bad setting must not take the app's logout down
            logger.warning("Not kicking logout delivery: %s", exc, extra={"action": "outbox_kick_failed"})
            return None
        if kick is None and not automatic(current):
            return None
        return functools.partial(send_delivery_task, current.celery_broker_url, current.queue)
    return kick


def _after_commit(db: orm.Session) -> None:
    found = db.info.pop(_KICK_KEY, None)
    if found is not None:
        send_kick(found)


def send_kick(kick: Callable[[], object]) -> None:
    """Call ``kick``, logging a failure instead of raising: the row is the truth, the periodic run delivers it."""
    try:
        kick()
    except Exception as exc:
        logger.warning(
            "Could not kick logout delivery (%s); the periodic run will deliver it",
            type(exc).__name__,
            extra={"action": "outbox_kick_failed"},
        )


def _after_rollback(db: orm.Session, *_: Any) -> None:
    db.info.pop(_KICK_KEY, None)
