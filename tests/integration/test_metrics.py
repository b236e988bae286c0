"""Metrics on SQLite and PostgreSQL, against the emulator as a server.

The gauges come from the database at scrape time; the counters move where batches finish; every
HTTP call to Pangea is timed by endpoint and status, failures included; multiprocess mode sums a
forked child's counts and cleans its directories. The real-worker story (prefork children counting,
the main process serving) is in ``tests/acceptance/test_metrics_endpoint.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningEmulator, free_port
from tests.helpers import active_token, login, row, settings_for
from worker import authn, errors, exporter, metrics, operations

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exposition(settings: Any = None) -> tuple[str, Samples]:
    """What ``/metrics`` would answer in this process (no settings: the counters only), as text and samples."""
    registry = exporter.serving_registry(settings) if settings else metrics.process_registry()
    body = prometheus_client.generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return body, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_gauges_and_counters_follow_a_sweep_and_a_resync(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given three sessions, one of them killed at Pangea, and the counters as they stand
    ids = [login(rt, emu, f"g{i}@example.com") for i in range(3)]
    secrets = [active_token(rt, i) for i in ids] + [emu.service_token]
    rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))
    _, before = exposition(rt.settings)

    # When a sweep finds nothing due, then support resyncs everything
    assert operations.sweep_once(rt)["checked"] == 0
    counts = operations.resync(rt)
    body, after = exposition(rt.settings)

    # Then the gauges read the database: two active, one revoked, a successful sweep, nothing due
    assert counts["revoked"] == 1 and counts["kept"] == 2
    assert value(after, "session_sync_database_up") == 1
    assert value(after, "session_sync_sessions", state="active") == 2
    assert value(after, "session_sync_sessions", state="revoked") == 1
    assert value(after, "session_sync_sessions", state="logged_out") == 0
    assert value(after, "session_sync_sessions_due") == 0
    assert value(after, "session_sync_outbox_events", state="dead") == 0
    assert value(after, "session_sync_last_successful_sweep_timestamp_seconds") > 0
    assert value(after, "session_sync_last_sweep_stopped") == 0

    # ... and the counters moved by exactly what the resync did
    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("session_sync_checks_total", outcome="revoked") == 1
    assert moved("session_sync_checks_total", outcome="kept") == 2
    assert moved("session_sync_revocations_total", reason="invalid_token") == 1
    latency = "session_sync_pangea_request_duration_seconds_count"
    assert moved(latency, endpoint="/v2/session/list", status="200") >= 1
    assert moved(latency, endpoint="/v2/client/token/check", status="400") == 1  # InvalidToken, confirmed
    # ... with no token and no user id anywhere
    assert not any(s in body for s in [*secrets, row(rt, ids[1]).user_id])
    assert not re.search(r"\b(ptu|ptr|pts|pcl|pmc)_[a-z2-7]{32}", body)


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"error": "TooManyRequests", "retry_after": 30}, "429"),
        ({"error": "InternalError"}, "500"),
        ({"error": "Dropped"}, "error"),
    ],
)
async def test_pangea_latency_is_observed_for_failures_too(
    emu: RunningEmulator, fault: dict[str, Any], status: str
) -> None:
    # Given Pangea failing every request in one way
    emu.admin.faults(error_rate=1.0, **fault)
    latency = "session_sync_pangea_request_duration_seconds_count"
    _, before = exposition()

    # When the client asks once (no retries)
    async with authn.AuthnClient(base_url=emu.base_url, token=emu.service_token, retries=0) as client:
        with pytest.raises(errors.AuthnError):
            await client.check_token("ptu_" + "a" * 32)
    _, after = exposition()

    # Then the failed call is timed under its status
    key = {"endpoint": "/v2/client/token/check", "status": status}
    assert value(after, latency, **key) - value(before, latency, **key) == 1


def test_an_unreachable_database_reads_as_down_not_as_an_error(emu: RunningEmulator) -> None:
    # Given settings whose PostgreSQL does not answer
    settings = settings_for(f"postgresql://nobody@127.0.0.1:{free_port()}/none", emu)

    # When /metrics is scraped
    body, samples = exposition(settings)

    # Then it still answers: database_up is 0 and the counters are there
    assert value(samples, "session_sync_database_up") == 0
    assert "session_sync_checks_total" in body
    assert "session_sync_sessions{" not in body


MULTIPROCESS_SCRIPT = """
import json, os, sys
from collections import Counter
from worker import exporter, metrics
from worker.counts import SyncCounts
from worker.settings import Settings
path = metrics.enable_multiprocess()
pid = os.fork()
if pid == 0:  # a pool child: counts into its own file, then exits
    metrics.record_counts(SyncCounts(checked=2, kept=1, revoked=1, reasons=Counter(invalid_token=1)).as_dict())
    metrics.process_exited()
    os._exit(0)
os.waitpid(pid, 0)
import prometheus_client
body = prometheus_client.generate_latest(exporter.serving_registry(Settings.from_env(json.loads(sys.argv[1])))).decode()
files = sorted(p.name for p in path.glob("*.db"))
metrics.shutdown()
print(json.dumps({"path": str(path), "body": body, "files": files, "removed": not path.exists()}))
"""


def test_multiprocess_mode_sums_children_and_cleans_up_after_itself(tmp_path: Path, emu: RunningEmulator) -> None:
    # Given a private metrics directory left behind by a worker that was killed (its pid is gone)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = Path(tempfile.gettempdir()) / f"session-sync-metrics-{dead.stdout.strip()}-left"
    orphan.mkdir()
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}", "PANGEA_BASE_URL": emu.base_url}

    # When a new worker process enables multiprocess mode, a forked child counts, and the parent serves
    run = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, json.dumps(env)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
    )

    # Then the parent's /metrics holds the child's counts, read from the child's own file
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert 'session_sync_checks_total{outcome="revoked"} 1.0' in out["body"]
    assert 'session_sync_revocations_total{reason="invalid_token"} 1.0' in out["body"]
    assert any(name.startswith("counter_") for name in out["files"])
    # ... its own directory is gone at shutdown, and so is the killed worker's
    assert out["removed"] and not orphan.exists()
