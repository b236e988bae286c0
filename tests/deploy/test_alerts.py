"""``deploy/prometheus/alerts.yml``: valid rules, each with a ``for:``, a severity and a runbook link
that exists, and promtool unit tests (``alerts.test.yml``) in which each alert fires on series that
should fire it and stays quiet on healthy ones. The tests are shown to fail when an alert stops
firing, or fires all the time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promtool import (
    ALERT_TESTS,
    ALERTS,
    README,
    alert_rules,
    dump_yaml,
    github_anchors,
    load_yaml,
    promtool,
)

pytestmark = pytest.mark.timeout(120)

#: What the runbook names (issue #17): every one of them has an alert.
EXPECTED = {
    "SessionSyncSweepsNotRunning",
    "SessionSyncSweepStopped",
    "SessionSyncRevocationGuardTripped",
    "SessionSyncDeadLetters",
    "SessionSyncOutboxBacklogOld",
    "SessionSyncDatabaseDown",
    "SessionSyncPangeaFailing",
    "SessionSyncPangeaThrottling",
    "SessionSyncDueBacklogGrowing",
}


def test_rules_are_valid_for_promtool() -> None:
    checked = promtool("check", "rules", ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in checked.stdout


def test_every_alert_waits_has_a_severity_and_a_runbook_section() -> None:
    rules = alert_rules()
    anchors = github_anchors(README.read_text())
    assert {r["alert"] for r in rules} == EXPECTED
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for") and rule["for"] not in ("0s", "0m"), f"{name} has no for:"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "README.md" and anchor in anchors, f"{name}: no README section #{anchor}"


def test_each_alert_fires_on_bad_series_and_stays_quiet_on_healthy_ones() -> None:
    # Given the unit tests: every alert has a case where it fires and one where it must not
    firing, quiet = cases()
    assert firing == EXPECTED, EXPECTED - firing
    assert quiet == EXPECTED, EXPECTED - quiet

    # When promtool runs them / Then they pass
    run = promtool("test", "rules", ALERT_TESTS)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("alert", sorted(EXPECTED))
@pytest.mark.parametrize(("broken", "what"), [("vector(0) > 1", "never fires"), ("vector(1)", "always fires")])
def test_the_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path, alert: str, broken: str, what: str) -> None:
    # Given alerts.yml with one alert's expression replaced by one that never (or always) fires
    rules: dict[str, Any] = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = broken
    dump_yaml(rules, tmp_path / "alerts.yml")
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yml")

    # When the same unit tests run against it
    run = promtool("test", "rules", tmp_path / "alerts.test.yml")

    # Then they fail, naming that alert
    assert run.returncode != 0, f"the tests pass although {alert} {what}"
    assert alert in run.stdout + run.stderr


def cases() -> tuple[set[str], set[str]]:
    """Alerts that some unit test expects to fire, and alerts some unit test expects quiet."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in load_yaml(ALERT_TESTS)["tests"]:
        for check in test.get("alert_rule_test") or []:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    return firing, quiet
