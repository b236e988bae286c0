"""``deploy/grafana/session-sync.json``: every panel's query parses (promtool) and names only series,
and labels, that a real worker exports, compared with a live ``/metrics`` scrape. The alert rules
are held to the same scrape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance import harness
from tests.acceptance.test_worker import worker_env
from tests.conftest import RunningEmulator, free_port
from tests.deploy.promtool import (
    DASHBOARD,
    alert_rules,
    as_promql,
    dump_yaml,
    grafana_exprs,
    label_names,
    metric_names,
    promtool,
)
from tests.helpers import login
from worker import runtime
from worker.settings import Settings

pytestmark = pytest.mark.timeout(120)

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
#: What the dashboard must show (issue #17), by the series that show it.
TOPICS = {
    "sweep throughput and outcomes": {"session_sync_checks_total", "session_sync_sweeps_total"},
    "revocations by reason": {"session_sync_revocations_total"},
    "refreshes": {"session_sync_refreshes_total"},
    "Pangea latency and status by endpoint": {
        "session_sync_pangea_request_duration_seconds_bucket",
        "session_sync_pangea_request_duration_seconds_count",
    },
    "outbox states and age": {"session_sync_outbox_events", "session_sync_outbox_oldest_pending_seconds"},
    "guard": {"session_sync_revocation_guard_tripped"},
    "staleness": {"session_sync_sessions_failing", "session_sync_sessions_uncertain"},
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def as_rules(exprs: list[str]) -> dict[str, Any]:
    """Expressions as recording rules, the form ``promtool check rules`` parses."""
    rules = [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(exprs)]
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def test_the_dashboard_is_well_formed_and_shows_what_operators_need() -> None:
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    # Given / When its panels are read / Then each has an id of its own, a description and a query on the chosen source
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["description"] and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    # ... and together they show every topic of the issue
    used = set().union(*(metric_names(as_promql(e)) for _, e in grafana_exprs(board)))
    for topic, series in TOPICS.items():
        assert series <= used, f"no panel shows {topic}"


def test_every_panel_query_parses(tmp_path: Path) -> None:
    # Given every panel's query with Grafana's variables filled in, as recording rules
    exprs = [as_promql(e) for _, e in grafana_exprs(dashboard())]
    dump_yaml(as_rules(exprs), tmp_path / "panels.yml")
    # ... and the same with one query broken, to show promtool is not a pushover
    dump_yaml(as_rules([*exprs, "sum(rate(session_sync_checks_total[5m])"]), tmp_path / "broken.yml")

    # When promtool checks them / Then the dashboard's parse, the broken one does not
    checked = promtool("check", "rules", tmp_path / "panels.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout
    assert promtool("check", "rules", tmp_path / "broken.yml").returncode != 0


@pytest.mark.slow
def test_dashboard_and_alerts_name_only_series_a_live_worker_exports(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    # Given a real worker with beat, and a session it will check at Pangea
    port = free_port()
    env = worker_env(pg_url, redis_url, emu, SESSION_SYNC_METRICS_PORT=str(port))
    rt = runtime.Runtime(Settings.from_env(env))
    try:
        login(rt, emu, "dashboard@example.com")
    finally:
        rt.close()

    # When it has checked the session (so the Pangea histogram has series) and /metrics is scraped
    with harness.running_worker(env, tmp_path, "-B", "--concurrency=1", name="dashboard"):
        harness.wait_for(
            lambda: "session_sync_pangea_request_duration_seconds_count{" in scrape_text(port),
            timeout=60,
            what="a Pangea request counted",
        )
        exported = exported_labels(scrape_text(port))

    # Then every series the dashboard and the alerts name is exported, with the labels they use
    queries = [(f"panel {title!r}", as_promql(e)) for title, e in grafana_exprs(dashboard())]
    queries += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    queries.append(("the job variable", "session_sync_database_up"))
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where} names no series"
        assert names <= exported.keys(), f"{where}: not exported: {sorted(names - exported.keys())}"
        labels = set().union(*(exported[n] for n in names)) | TARGET_LABELS
        assert label_names(expr) <= labels, f"{where}: unknown labels {sorted(label_names(expr) - labels)}"


def scrape_text(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def exported_labels(body: str) -> dict[str, set[str]]:
    """Each sample name of a scrape, with the label names it carries."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found
