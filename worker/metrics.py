"""Prometheus metrics, all named ``session_sync_*``, served by the worker on ``SESSION_SYNC_METRICS_PORT``.

Two kinds, read two ways:

- **Counters and a histogram** (checks, refreshes, revocations, sweeps, logouts, Pangea request
  latency) are incremented where the work happens: :mod:`worker.operations` records each batch's
  :class:`~worker.engine.Counts`, :mod:`worker.authn` times every HTTP call to Pangea.
- **Gauges of the database** (sessions by state, due backlog, uncertain and failing sessions,
  outbox by state, last successful sweep, the revocation guard) are not counted in memory:
  :class:`StatusCollector` reads them from :func:`worker.operations.status` when scraped, so every
  worker and the CLI agree, and they are right even while no task runs. A reading is reused for
  ``SESSION_SYNC_METRICS_CACHE`` and shared between workers through Redis
  (:mod:`worker.gauge_cache`), so scraping N workers does not cost the database N readings.

**Why multiprocess mode.** Celery's prefork pool runs tasks in child processes, so counters live
in the children while ``/metrics`` is served by the main process, and children come and go
(``--max-tasks-per-child``, a crash, a restart of the pool). We use prometheus_client's
multiprocess mode, its documented answer for pre-forking servers like gunicorn, rather than pushing
increments to Redis (a network hop per increment, and counters that outlive the workers) or a
pushgateway (meant for batch jobs). Its rules, and where each is kept:

1. ``PROMETHEUS_MULTIPROC_DIR`` must be chosen before the first metric value is made, and the
   directory must start empty. :func:`enable_multiprocess` runs on ``worker_init`` in the main
   worker process, before the pool forks: it uses the operator's directory (wiped) or a fresh
   private one (removed at shutdown; one left by a killed worker is removed by the next), and
   switches prometheus_client's value class, because that class was fixed when the library was
   first imported. Every instrument here is created lazily, after that switch.
2. Each process writes its values to its own memory-mapped files (``counter_<pid>.db``); the main
   process sums them at scrape time with ``MultiProcessCollector``. A dead child's counts stay
   counted, as counters must.
3. ``mark_process_dead`` runs on ``worker_process_shutdown`` in each child (it matters only for
   live gauges, which we do not keep in files; it is there so adding one stays correct).
4. The HTTP server starts once, on ``worker_ready`` in the main process: never in beat (which
   sends no ``worker_*`` signals), never in a pool child. A child forked later closes the listening
   socket it inherited.

Outside a worker (the CLI, tests) the same instruments count in-process, and
:func:`serving_registry` reads them from there. Label values are fixed sets (outcomes, reasons,
endpoint paths, HTTP statuses): never a token, a user id or a session id.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
import sqlalchemy as sa
from prometheus_client import multiprocess, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import orm

from worker import models
from worker.gauge_cache import GaugeCache, Reading
from worker.settings import Settings

logger = logging.getLogger(__name__)

#: The environment variable prometheus_client reads for multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Prefix of a worker's private multiprocess directory in the temp folder (then its pid).
_PRIVATE_PREFIX = "session-sync-metrics-"
#: Buckets of Pangea request latency, in seconds (a refresh may wait up to three HTTP timeouts).
DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Outcomes of ``session_sync_checks_total``: what became of each session a batch took.
CHECK_OUTCOMES = ("kept", "refreshed", "revoked", "held", "failed")
#: Reasons of ``session_sync_revocations_total`` known today (others appear when they happen).
REVOCATION_REASONS = ("invalid_token", "expired", "refresh_invalid", "refresh_lost")
#: Outcomes of ``session_sync_logouts_total`` (the logout outbox's counts).
LOGOUT_OUTCOMES = ("delivered", "already", "retried", "paused", "held", "dead")


class _Instruments:
    """The counters and the histogram, created once per process (after any multiprocess switch)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = prometheus_client.Counter(
            "session_sync_checks",
            "Sessions a batch brought in line with Pangea, by outcome: kept (Pangea vouched for it), "
            "refreshed, revoked, held (the mass-revocation guard kept it), failed (no answer; retried later).",
            ["outcome"],
            registry=registry,
        )
        self.refreshes = prometheus_client.Counter(
            "session_sync_refreshes",
            "Sessions refreshed ahead of expiry: rotated tokens from Pangea stored.",
            registry=registry,
        )
        self.revocations = prometheus_client.Counter(
            "session_sync_revocations",
            "Local sessions revoked because Pangea no longer recognizes them, by reason.",
            ["reason"],
            registry=registry,
        )
        self.stops = prometheus_client.Counter(
            "session_sync_sweep_stops",
            "Batches that stopped because Pangea refused PANGEA_AUTHN_TOKEN (nothing was changed).",
            registry=registry,
        )
        self.sweeps = prometheus_client.Counter(
            "session_sync_sweeps",
            "Periodic sweeps, by outcome: fanned_out, or duplicate (another scheduler had the slot).",
            ["outcome"],
            registry=registry,
        )
        self.logouts = prometheus_client.Counter(
            "session_sync_logouts",
            "Logout deliveries to Pangea, by outcome: delivered, already (ended before), retried, paused, "
            "held (by the mass-revocation guard), dead.",
            ["outcome"],
            registry=registry,
        )
        self.pangea = prometheus_client.Histogram(
            "session_sync_pangea_request_duration_seconds",
            "Pangea AuthN request latency by endpoint path and HTTP status ('error': no response).",
            ["endpoint", "status"],
            buckets=DEFAULT_LATENCY_BUCKETS,
            registry=registry,
        )
        self.list_refusals = prometheus_client.Counter(
            "session_sync_pangea_list_refusals",
            "List requests Pangea refused as too large (ValidationError or another answer about the "
            "request's shape), by endpoint and what was cut down: ids (filter ids) or size (page size).",
            ["endpoint", "kind"],
            registry=registry,
        )
        self.list_limit = prometheus_client.Gauge(
            "session_sync_pangea_list_limit",
            "The largest filter ids (ids) or page size (size) Pangea was found to accept per list request, "
            "learned by this process since it started (absent: never refused).",
            ["endpoint", "kind"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        # Known series start at zero, so dashboards and rate() see them before the first event.
        for outcome in CHECK_OUTCOMES:
            self.checks.labels(outcome)
        for reason in REVOCATION_REASONS:
            self.revocations.labels(reason)
        for outcome in ("fanned_out", "duplicate"):
            self.sweeps.labels(outcome)
        for outcome in LOGOUT_OUTCOMES:
            self.logouts.labels(outcome)


@dataclass(frozen=True)
class _Multiprocess:
    path: Path
    owned: bool  # a private directory we made, removed at shutdown


_lock = threading.Lock()
_registry = CollectorRegistry()  # where the instruments live in this process
_instruments_: _Instruments | None = None
_multiprocess: _Multiprocess | None = None
_server: tuple[WSGIServer, threading.Thread] | None = None


def _instruments() -> _Instruments:
    global _instruments_
    if _instruments_ is None:
        with _lock:
            if _instruments_ is None:
                _instruments_ = _Instruments(_registry)
    return _instruments_


# --- recording -------------------------------------------------------------------------------------


def record_counts(counts: Mapping[str, Any]) -> None:
    """Count what a batch, ``sweep --once`` or resync did (``Counts.as_dict()``)."""
    m = _instruments()
    for outcome in CHECK_OUTCOMES:
        if n := int(counts.get(outcome, 0) or 0):
            m.checks.labels(outcome).inc(n)
    if n := int(counts.get("refreshed", 0) or 0):
        m.refreshes.inc(n)
    reasons: Mapping[str, int] = counts.get("revoked_by_reason") or {}
    for reason, n in reasons.items():
        m.revocations.labels(reason).inc(n)
    if counts.get("stopped"):
        m.stops.inc()


def record_sweep(*, duplicate: bool) -> None:
    """Count one periodic sweep."""
    _instruments().sweeps.labels("duplicate" if duplicate else "fanned_out").inc()


def record_logouts(counts: Mapping[str, Any]) -> None:
    """Count what a logout delivery run did (the outbox's ``Counts.as_dict()``)."""
    m = _instruments()
    for outcome in LOGOUT_OUTCOMES:
        if n := int(counts.get(outcome, 0) or 0):
            m.logouts.labels(outcome).inc(n)


def observe_pangea(endpoint: str, status: str, seconds: float) -> None:
    """Time one HTTP call to Pangea: ``endpoint`` is the path, ``status`` the HTTP status or ``error``."""
    _instruments().pangea.labels(endpoint, status).observe(seconds)


def record_list_refusal(endpoint: str, kind: str) -> None:
    """Count one list request Pangea refused as too large (``kind``: ``ids`` or ``size``)."""
    _instruments().list_refusals.labels(endpoint, kind).inc()


def record_list_limit(endpoint: str, kind: str, limit: int) -> None:
    """Show the largest ``kind`` Pangea accepts per request on ``endpoint``, as learned."""
    _instruments().list_limit.labels(endpoint, kind).set(limit)


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


def gauge_reading(report: Mapping[str, Any]) -> Reading:
    """The gauges' values from a status report (plus its last successful sweep), as plain JSON types."""
    backlog = report.get("outbox_backlog") or {}
    last_ok = report.get("last_successful_sweep_at")
    return {
        "sessions": {str(k): int(v) for k, v in (report.get("sessions") or {}).items()},
        "due": int(report.get("due") or 0),
        "uncertain": int(report.get("uncertain") or 0),
        "failing": int(report.get("failing") or 0),
        "outbox": {str(k): int(v) for k, v in (report.get("outbox") or {}).items()},
        "outbox_due": int(backlog.get("due") or 0),
        "outbox_oldest_pending_seconds": float(backlog.get("oldest_pending_seconds") or 0),
        "last_successful_sweep_timestamp_seconds": last_ok.timestamp() if isinstance(last_ok, datetime) else 0.0,
        "last_sweep_stopped": int((report.get("last_sweep") or {}).get("stopped") is True),
        "revocation_guard_tripped": int((report.get("revocation_guard") or {}).get("tripped") is True),
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
        # Imported here: operations → runtime → authn → metrics would otherwise be a cycle.
        from worker import operations, runtime

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


def enable_multiprocess() -> Path | None:
    """Switch this process, and the pool children it will fork, to multiprocess metrics (see the top).

    Call in the worker's main process before the pool starts. Returns the directory, or None when
    metrics were already recorded in this process (a worker embedded in a test): then they stay
    in-process, which is right for the solo and threads pools only.
    """
    global _multiprocess
    if _instruments_ is not None:
        logger.warning(
            "Metrics already recorded in this process: pool children's counts will not be served",
            extra={"action": "metrics_unavailable"},
        )
        return None
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        path, owned = Path(configured), False
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # a previous run's counts would be added to ours
            stale.unlink()
    else:
        _remove_orphans()
        path, owned = Path(tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-")), True
        os.environ[MULTIPROC_ENV] = str(path)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _multiprocess = _Multiprocess(path, owned)
    return path


def process_registry() -> CollectorRegistry:
    """This process's own counters and histogram (what the CLI, or a test, recorded here)."""
    _instruments()
    return _registry


def _remove_orphans() -> None:
    """Remove private directories left by workers that were killed (SIGKILL skips ``shutdown``)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_PRIVATE_PREFIX}*-*"):
        pid = folder.name.removeprefix(_PRIVATE_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def serving_registry(settings: Settings) -> CollectorRegistry:
    """What ``/metrics`` shows: every process's counters and histogram, and the database gauges."""
    registry = CollectorRegistry()
    if _multiprocess is not None:
        multiprocess.MultiProcessCollector(registry, str(_multiprocess.path))  # type: ignore[no-untyped-call]
    else:
        registry.register(_registry)
    registry.register(StatusCollector(settings))
    return registry


def serve(settings: Settings) -> int | None:
    """Start the ``/metrics`` server in this process (once); the port it listens on, or None if off or busy."""
    global _server
    if settings.metrics_port == 0 or _server is not None:
        return None
    _instruments()  # the known series exist from the first scrape
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


def process_exited(pid: int | None = None) -> None:
    """Multiprocess bookkeeping for a pool child that is exiting (``mark_process_dead``)."""
    if _multiprocess is not None:
        pid = pid if pid is not None else os.getpid()
        multiprocess.mark_process_dead(pid, str(_multiprocess.path))  # type: ignore[no-untyped-call]


def shutdown() -> None:
    """Stop serving and remove the private multiprocess directory (main process, at worker shutdown)."""
    global _server
    if _server is not None:
        httpd, thread = _server
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        _server = None
    if _multiprocess is not None and _multiprocess.owned:
        shutil.rmtree(_multiprocess.path, ignore_errors=True)
