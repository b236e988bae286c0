"""``/metrics`` from a real ``celery -A worker worker`` (prefork, two children) on Redis and PostgreSQL.

Tasks run in the pool's children while the main process serves ``/metrics``: the counters a child
increments must show there (prometheus_client's multiprocess mode). The worker logs JSON lines, and
neither the metrics nor the logs ever hold a token or a user id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance import harness
from tests.acceptance.test_worker import states, worker_env
from tests.conftest import RunningEmulator, free_port
from tests.helpers import active_token, login, row
from worker import runtime
from worker.settings import Settings

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

#: Every series the worker promises (README "Metrics").
SERIES = {
    "session_sync_checks_total",
    "session_sync_refreshes_total",
    "session_sync_revocations_total",
    "session_sync_sweep_stops_total",
    "session_sync_sweeps_total",
    "session_sync_logouts_total",
    "session_sync_pangea_request_duration_seconds_bucket",
    "session_sync_pangea_request_duration_seconds_count",
    "session_sync_pangea_request_duration_seconds_sum",
    "session_sync_database_up",
    "session_sync_sessions",
    "session_sync_sessions_due",
    "session_sync_sessions_uncertain",
    "session_sync_sessions_failing",
    "session_sync_outbox_events",
    "session_sync_outbox_due",
    "session_sync_outbox_oldest_pending_seconds",
    "session_sync_last_successful_sweep_timestamp_seconds",
    "session_sync_last_sweep_stopped",
    "session_sync_revocation_guard_tripped",
}
#: Anything shaped like a Pangea secret.
SECRET = re.compile(r"\b(ptu|ptr|pts|pcl|pmc)_[a-z2-7]{32}")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """The exposition text and its samples by (name, labels)."""
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return body, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_worker_serves_metrics_counted_in_its_pool_children(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    port = free_port()
    env = worker_env(
        pg_url,
        redis_url,
        emu,
        SESSION_SYNC_METRICS_PORT=str(port),
        SESSION_SYNC_METRICS_HOST="127.0.0.1",
        SESSION_SYNC_LOG_FORMAT="json",
        SESSION_SYNC_METRICS_CACHE="0",  # gauges read on every scrape (the cache: test_scrape_cost.py)
    )
    rt = runtime.Runtime(Settings.from_env(env))
    try:
        # Given four sessions, one of them killed at Pangea
        ids = [login(rt, emu, f"metrics{i}@example.com") for i in range(4)]
        secrets = [active_token(rt, i) for i in ids] + [emu.service_token, emu.client_token]
        user_ids = [row(rt, i).user_id for i in ids]
        rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))

        # When a prefork worker (two children) with beat checks them on its schedule
        with harness.running_worker(env, tmp_path, "-B", "--concurrency=2", name="metrics") as worker:
            harness.wait_for(
                lambda: states(rt, ids[:1]) == [("revoked", "invalid_token")], timeout=30, what="revocation"
            )
            harness.wait_for(
                lambda: value(scrape(port)[1], "session_sync_checks_total", outcome="kept") >= 3,
                timeout=30,
                what="checks counted",
            )
            body, samples = scrape(port)

        # Then /metrics answers with every named series
        assert SERIES <= {name for name, _ in samples}, SERIES - {name for name, _ in samples}
        # ... the counters the pool children moved: one revocation, three sessions kept, sweeps fanned out
        assert value(samples, "session_sync_checks_total", outcome="revoked") == 1
        assert value(samples, "session_sync_revocations_total", reason="invalid_token") == 1
        assert value(samples, "session_sync_sweeps_total", outcome="fanned_out") >= 1
        # ... Pangea's latency by endpoint and status (bulk revalidation with a service token)
        listed = value(
            samples, "session_sync_pangea_request_duration_seconds_count", endpoint="/v2/session/list", status="200"
        )
        assert listed >= 1
        # ... the database gauges
        assert value(samples, "session_sync_database_up") == 1
        assert value(samples, "session_sync_sessions", state="revoked") == 1
        assert value(samples, "session_sync_sessions", state="active") == 3
        assert value(samples, "session_sync_last_successful_sweep_timestamp_seconds") > 0
        # ... and no token, nor any user id, in the body
        assert not any(s in body for s in secrets + user_ids) and not SECRET.search(body)

        # ... the worker logged JSON lines with the stable keys, and no token
        log = worker.output()
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert {"time", "level", "logger", "message"} <= set(lines[0])
        sweeps = [line for line in lines if line.get("action") == "sweep"]
        assert sweeps and {"slot", "due", "batches", "task_id", "task_name"} <= set(sweeps[0])
        assert any(line.get("action") == "metrics_serving" and line.get("port") == port for line in lines)
        assert not any(s in log for s in secrets)
    finally:
        rt.close()
