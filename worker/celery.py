"""The Celery app: ``celery -A worker worker|beat|flower`` finds it here (``worker.celery.app``).

Settings are read once, here, at the edge. The baseline follows the design: late acks, requeue
on a lost worker, prefetch of one, task events on for Flower, and a visibility timeout far above
any task's runtime. Long delays never live in Celery countdowns: they live in the database.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, signals

from worker import checks, errors, exporter, logs, metrics, runtime, task_names
from worker.settings import Settings

try:
    settings = Settings.from_env()
except errors.ConfigError as exc:  # one clear line, no traceback, before Celery prints anything
    print(f"session-sync: configuration error: {exc}", file=sys.stderr)
    sys.exit(checks.EXIT_CONFIG)


def result_backend_for(broker_url: str, database_url: str) -> str:
    """Where task results go: Redis beside a Redis broker, else the database (embedded mode)."""
    if broker_url.startswith(("redis://", "rediss://")):
        return broker_url
    return "db+" + database_url


_redis = settings.celery_broker_url.startswith(("redis://", "rediss://"))
app = Celery("session_sync", include=["worker.tasks"])
app.conf.update(
    broker_url=settings.celery_broker_url,
    # Our own queue (SESSION_SYNC_QUEUE): every task, beat entry and kick goes there, and a worker started
    # from this app consumes only it, so an app's Celery on the same broker never takes ours (or we theirs).
    task_default_queue=settings.queue,
    task_default_exchange=settings.queue,
    task_default_routing_key=settings.queue,
    task_create_missing_queues=True,
    result_backend=result_backend_for(settings.celery_broker_url, settings.database_url),
    result_expires=3600,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    broker_connection_retry_on_checks=True,
    worker_hijack_root_logger=False,
    # Redis redelivers an unacked task after the visibility timeout: keep it far above any task's run.
    broker_transport_options={"visibility_timeout": 3600} if _redis else {},
    beat_schedule={
        "sweep": {
            "task": task_names.SWEEP,
            "schedule": settings.sweep_period.total_seconds(),
            "options": {"queue": settings.queue},
        },
        "housekeeping": {"task": task_names.HOUSEKEEPING, "schedule": 3600.0, "options": {"queue": settings.queue}},
        # Retries and missed kicks; a run that waited past its period is dropped, the next one covers it.
        "deliver_logouts": {
            "task": task_names.DELIVER_LOGOUTS,
            "schedule": settings.outbox_period.total_seconds(),
            "options": {"expires": max(settings.outbox_period.total_seconds(), 1.0), "queue": settings.queue},
        },
    },
)


@signals.worker_init.connect
def _refuse_to_start_broken(**_: Any) -> None:
    """A worker missing a required setting, or on a schema not at head, would fail every task: say so, stop."""
    problem = checks.startup_problem(settings)
    if problem is not None:
        print(f"session-sync: worker not started: {problem}", file=sys.stderr, flush=True)
        sys.exit(checks.EXIT_CONFIG)


@signals.worker_process_init.connect
def _fresh_runtime_in_child(**_: Any) -> None:
    runtime.reset()
    exporter.after_fork()


@signals.worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    runtime.close()
    metrics.process_exited()


# Metrics (worker.metrics records, worker.exporter serves): multiprocess mode before the pool forks;
# /metrics served once, by the main worker process, when it is ready. Beat and Flower send no
# worker_* signals, so never serve.
@signals.worker_init.connect
def _metrics_before_pool(**_: Any) -> None:
    if settings.metrics_port:
        metrics.enable_multiprocess()


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    exporter.serve(settings)


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    exporter.stop()
    metrics.shutdown()


# Logs (worker.logs): redaction on every handler Celery sets up, JSON lines if SESSION_SYNC_LOG_FORMAT=json.
@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    logs.install(logger.handlers, settings.log_format)
