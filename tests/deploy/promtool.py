"""Running Prometheus' ``promtool`` from tests, and reading the files of ``deploy/``.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it). Without it the
tests that need it skip with that reason, and fail in CI, where nothing may skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "session-sync.json"
README = ROOT / "README.md"


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` (skips the test when promtool is not installed, outside CI)."""
    found = shutil.which("promtool")
    require(found is not None, "promtool not installed (apt-get install prometheus)")
    assert found is not None
    return subprocess.run([found, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path)


def dump_yaml(data: Any, path: Path) -> None:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w") as out:
        yaml.dump(data, out)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of ``alerts.yml``."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes for a document's headings (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)  # no headings in code
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose, flags=re.MULTILINE):
        text = re.sub(r"`|\*\*", "", heading).lower()
        anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


# --- what a PromQL expression names ---------------------------------------------------------------

#: PromQL's keywords and aggregation modifiers: identifiers that are neither metrics nor functions.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels, strings and ranges left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = _GROUPING.sub("", text)
    text = _MATCHERS.sub("", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS and not name.isdigit()}


def label_names(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set()
    for matchers in _MATCHERS.findall(text):
        names |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in _GROUPING.findall(text):
        names |= {label.strip() for label in grouping.split(",") if label.strip()}
    return names


def grafana_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (panel title, expr) of a dashboard, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                found.append((inner["title"], target["expr"]))
    return found


#: Grafana's variables, as a query would see them: a rate window, and "all jobs".
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$job": ".+"}


def as_promql(expr: str) -> str:
    """A panel's expression with Grafana's variables filled in, as Prometheus receives it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr
