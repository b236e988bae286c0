"""What ``/metrics`` serves: the counters of :mod:`worker.metrics`, and gauges of the database read at scrape time.

**Gauges of the database** (sessions by state, due backlog, uncertain and failing sessions,
outbox by state, last successful sweep, the revocation guard) are not counted in memory:
:class:`StatusCollector` reads them from :func:`worker.operations.status` when scraped, so every
worker and the CLI agree, and they are right even while no task runs. A reading is reused for
``SESSION_SYNC_METRICS_CACHE`` and shared between workers through Redis
(:mod:`worker.gauge_cache`), so scraping N workers does not cost the database N readings.

This is the scrape-time half of the metrics, apart from the recording half so that the layers
stay one-way: it reads through :mod:`worker.operations` and :mod:`worker.runtime`, which record
into :mod:`worker.metrics` (through the Pangea client) and so must never be imported by it.

The HTTP server starts once, on ``worker_ready`` in the main worker process (:func:`serve`):
never in beat (which sends no ``worker_*`` signals), never in a pool child. A child forked later
closes the listening socket it inherited (:func:`after_fork`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
import sqlalchemy as sa
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import orm

from worker import metrics, models, operations, runtime
from worker.gauge_cache import GaugeCache, Reading
from worker.reports import StatusReport
from worker.settings import Settings

logger = logging.getLogger(__name__)

_server: tuple[WSGIServer, threading.Thread] | None = None


# --- the database gauges, at scrape time ------------------------------------------------------------


def last_successful_sweep(db: orm.Session) -> datetime | None:
    """When the most recent sweep that did not stop last did something (its last batch, or its start)."""
    W = models.SweepRun
    at = db.execute(
        sa.select(sa.func.max(sa.func.coalesce(W.finished_at, W.started_at))).where(W.stopped.is_(False))
    ).scalar_one_or_none()
    if isinstance(at, str):  # SQLite hands an aggregate back as text
        at = datetime.fromisoformat(at)
    if isinstance(at, datetime) and at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at


def gauge_reading(report: StatusReport) -> Reading:
    """The gauges' values from a status report (plus its last successful sweep), as plain JSON types."""
    backlog = report["outbox_backlog"]
    last_ok = report.get("last_successful_sweep_at")
    last = report["last_sweep"]
    return {
        "sessions": {str(k): int(v) for k, v in report["sessions"].items()},
        "due": report["due"],
        "uncertain": report["uncertain"],
        "failing": report["failing"],
        "outbox": {str(k): int(v) for k, v in report["outbox"].items()},
        "outbox_due": int(backlog.get("due") or 0),
        "outbox_oldest_pending_seconds": float(backlog.get("oldest_pending_seconds") or 0),
        "last_successful_sweep_timestamp_seconds": last_ok.timestamp() if isinstance(last_ok, datetime) else 0.0,
        "last_sweep_stopped": int(last is not None and last["stopped"] is True),
        "revocation_guard_tripped": int(report["revocation_guard"]["tripped"] is True),
    }


class StatusCollector(Collector):
    """Gauges of the database (``operations.status``), with ``database_up``, read at most once per
    ``SESSION_SYNC_METRICS_CACHE`` and shared between workers through Redis (:mod:`worker.gauge_cache`)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        broker = settings.celery_broker_url
        self.cache = GaugeCache(
            self.read,
            ttl=settings.metrics_cache.total_seconds(),
            database_url=settings.database_url,
            redis_url=broker if broker.startswith(("redis://", "rediss://")) else None,
            clock=clock,
        )

    def read(self) -> Reading:
        """One reading of the database, on a runtime opened for it only."""
        # A runtime per reading: no pooled connection is left for a pool child forked later to inherit.
        rt = runtime.Runtime(self._settings)
        try:
            report = operations.status(rt)
            with rt.sessions() as db:
                report["last_successful_sweep_at"] = last_successful_sweep(db)
            return gauge_reading(report)
        finally:
            rt.close()

    def collect(self) -> Iterator[Metric]:
        """The gauges; if the database cannot be read, only ``session_sync_database_up 0``."""
        up = GaugeMetricFamily(
            "session_sync_database_up",
            "1 if the latest reading of the database (at most SESSION_SYNC_METRICS_CACHE old) succeeded, else 0.",
        )
        reading = self.cache.get()
        up.add_metric([], 0 if reading is None else 1)
        yield up
        if reading is not None:
            yield from status_gauges(reading)


def status_gauges(reading: Mapping[str, Any]) -> Iterator[Metric]:
    """The gauges of one reading (:func:`gauge_reading`)."""

    def gauge(name: str, key: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"session_sync_{name}", doc, value=float(reading.get(key) or 0))

    def by_state(name: str, key: str, doc: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"session_sync_{name}", doc, labels=["state"])
        for state, n in sorted((reading.get(key) or {}).items()):
            family.add_metric([state], float(n))
        return family

    yield by_state("sessions", "sessions", "Local sessions by state.")
    yield gauge("sessions_due", "due", "Active sessions due for a check now (the backlog).")
    yield gauge("sessions_uncertain", "uncertain", "Active sessions whose last refresh answer was lost.")
    yield gauge("sessions_failing", "failing", "Active sessions whose last check got no answer.")
    yield by_state("outbox_events", "outbox", "Logout outbox events by state.")
    yield gauge("outbox_due", "outbox_due", "Pending logouts due for delivery now.")
    yield gauge(
        "outbox_oldest_pending_seconds",
        "outbox_oldest_pending_seconds",
        "Age of the oldest pending logout, in seconds (0: none).",
    )
    yield gauge(
        "last_successful_sweep_timestamp_seconds",
        "last_successful_sweep_timestamp_seconds",
        "Unix time of the most recent sweep that was not stopped (0: never).",
    )
    yield gauge(
        "last_sweep_stopped", "last_sweep_stopped", "1 if the most recent sweep stopped (Pangea refused our token)."
    )
    yield gauge(
        "revocation_guard_tripped",
        "revocation_guard_tripped",
        "1 while the mass-revocation guard holds revocations back.",
    )


# --- serving ----------------------------------------------------------------------------------------


def serving_registry(settings: Settings) -> CollectorRegistry:
    """What ``/metrics`` shows: every process's counters and histogram, and the database gauges."""
    registry = CollectorRegistry()
    metrics.add_counters(registry)
    registry.register(StatusCollector(settings))
    return registry


def serve(settings: Settings) -> int | None:
    """Start the ``/metrics`` server in this process (once); the port it listens on, or None if off or busy."""
    global _server
    if settings.metrics_port == 0 or _server is not None:
        return None
    metrics.process_registry()  # the known series exist from the first scrape
    try:
        _server = prometheus_client.start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=serving_registry(settings)
        )
    except OSError as exc:
        logger.warning(
            "Metrics not served: port %s: %s",
            settings.metrics_port,
            exc.strerror or exc,
            extra={"action": "metrics_unavailable", "port": settings.metrics_port},
        )
        return None
    port = int(_server[0].server_port)
    where = f"http://{settings.metrics_host}:{port}/metrics"
    logger.info("Metrics served on %s", where, extra={"action": "metrics_serving", "port": port})
    return port


def after_fork() -> None:
    """In a pool child: close the listening socket inherited from the main process (it serves, not us)."""
    global _server
    if _server is not None:
        _server[0].socket.close()
        _server = None


def stop() -> None:
    """Stop serving (main process, at worker shutdown); then :func:`worker.metrics.shutdown` removes its files."""
    global _server
    if _server is not None:
        httpd, thread = _server
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        _server = None
