"""Prometheus counters and a histogram, all named ``session_sync_*``, recorded where the work happens.

What is counted here: checks, refreshes, revocations, sweeps, logouts, Pangea request latency.
:mod:`worker.operations` records each batch's :class:`~worker.counts.SyncCounts`,
:mod:`worker.authn` times every HTTP call to Pangea. This module imports nothing of ours above the
foundation, so the Pangea client can record into it; what ``/metrics`` serves, the scrape-time
gauges of the database and the HTTP server, is :mod:`worker.exporter`, one layer up.

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
   process sums them at scrape time with ``MultiProcessCollector`` (:func:`add_counters`). A dead
   child's counts stay counted, as counters must.
3. ``mark_process_dead`` runs on ``worker_process_shutdown`` in each child (it matters only for
   live gauges, which we do not keep in files; it is there so adding one stays correct).
4. The HTTP server starts once, on ``worker_ready`` in the main process (:mod:`worker.exporter`).

Outside a worker (the CLI, tests) the same instruments count in-process, and
:func:`process_registry` reads them from there. Label values are fixed sets (outcomes, reasons,
endpoint paths, HTTP statuses): never a token, a user id or a session id.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
from prometheus_client import multiprocess, values
from prometheus_client.registry import CollectorRegistry

from worker.counts import LogoutCountsDict, SyncCountsDict

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


def _instruments() -> _Instruments:
    global _instruments_
    if _instruments_ is None:
        with _lock:
            if _instruments_ is None:
                _instruments_ = _Instruments(_registry)
    return _instruments_


# --- recording -------------------------------------------------------------------------------------


def record_counts(counts: SyncCountsDict) -> None:
    """Count what a batch, ``sweep --once`` or resync did (``SyncCounts.as_dict()``)."""
    m = _instruments()
    by_outcome = {"kept": counts["kept"], "refreshed": counts["refreshed"], "revoked": counts["revoked"]}
    by_outcome |= {"held": counts["held"], "failed": counts["failed"]}
    for outcome in CHECK_OUTCOMES:
        if n := by_outcome[outcome]:
            m.checks.labels(outcome).inc(n)
    if n := counts["refreshed"]:
        m.refreshes.inc(n)
    for reason, n in counts["revoked_by_reason"].items():
        m.revocations.labels(reason).inc(n)
    if counts["stopped"]:
        m.stops.inc()


def record_sweep(*, duplicate: bool) -> None:
    """Count one periodic sweep."""
    _instruments().sweeps.labels("duplicate" if duplicate else "fanned_out").inc()


def record_logouts(counts: LogoutCountsDict) -> None:
    """Count what a logout delivery run did (``LogoutCounts.as_dict()``)."""
    m = _instruments()
    by_outcome = {"delivered": counts["delivered"], "already": counts["already"], "retried": counts["retried"]}
    by_outcome |= {"paused": counts["paused"], "held": counts["held"], "dead": counts["dead"]}
    for outcome in LOGOUT_OUTCOMES:
        if n := by_outcome[outcome]:
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


# --- multiprocess bookkeeping ----------------------------------------------------------------------


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


def add_counters(registry: CollectorRegistry) -> None:
    """Register this process's counters and histogram in ``registry``: every pool process's, in multiprocess mode."""
    if _multiprocess is not None:
        multiprocess.MultiProcessCollector(registry, str(_multiprocess.path))  # type: ignore[no-untyped-call]
    else:
        registry.register(_registry)


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


def process_exited(pid: int | None = None) -> None:
    """Multiprocess bookkeeping for a pool child that is exiting (``mark_process_dead``)."""
    if _multiprocess is not None:
        pid = pid if pid is not None else os.getpid()
        multiprocess.mark_process_dead(pid, str(_multiprocess.path))  # type: ignore[no-untyped-call]


def shutdown() -> None:
    """Remove the private multiprocess directory (main process, at worker shutdown, after serving stopped)."""
    if _multiprocess is not None and _multiprocess.owned:
        shutil.rmtree(_multiprocess.path, ignore_errors=True)
