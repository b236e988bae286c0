"""The package's imports run one way: no circles, no import hidden in a function to dodge one, layers kept.

The import graph is read from the source with :mod:`ast` (module-level and function-level imports;
``if TYPE_CHECKING:`` blocks are typing only and do not count), so the rules hold for every module
whether or not a test happens to import it. The layers are drawn below as data: a module may import
its own layer and the layers under it, never one above. The README's module map draws the same
layers (``tests/test_module_map.py``).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "worker"

#: The layers, bottom first. A module may import modules of its own layer or of a layer below.
LAYERS: dict[str, tuple[str, ...]] = {
    # Pure shapes and leaf helpers: no import of ours but each other.
    "foundation": (
        "worker",
        "worker.errors",
        "worker.frozen",
        "worker.task_names",
        "worker.counts",
        "worker.reports",
        "worker.clock",
        "worker.logs",
        "worker.progress",
        "worker.transport",
        "worker.gauge_cache",
        "worker.sessions_pg",
        "worker.outbox_decisions",
        "worker.db",
        "worker.leases",
        "worker.models",
        "worker.metrics",
    ),
    # The rules, the wire and the settings: what every process shares.
    "rules": ("worker.wire", "worker.decisions", "worker.crypto", "worker.settings"),
    # Statements and their small helpers, each taking a session it never makes.
    "storage": (
        "worker.verification",
        "worker.audit",
        "worker.guard",
        "worker.queries",
        "worker.outbox_queries",
        "worker.sweeps",
        "worker.push",
        "worker.kick",
    ),
    # What a web app imports: sessions and the framework glue. Nothing of the worker's own runtime.
    "app": (
        "worker.sessions",
        "worker.web",
        "worker.web.asgi",
        "worker.web.django",
        "worker.web.drf",
        "worker.web.fastapi",
        "worker.web.flask",
        "worker.web.starlette",
    ),
    # The Pangea client: httpx in, typed outcomes out.
    "client": ("worker.list_limits", "worker.authn", "worker.ratelimit"),
    # The two loops that call Pangea: revalidation and logout delivery.
    "work": ("worker.engine", "worker.outbox"),
    # One process's resources and what a task or a command does with them.
    "process": ("worker.runtime", "worker.forks", "worker.operations", "worker.exporter", "worker.checks"),
    # A separate program (tests, demos, benchmarks): imports only itself; the CLI and the demo serve it.
    "emulator": (
        "worker.emulator",
        "worker.emulator.admin",
        "worker.emulator.app",
        "worker.emulator.faults",
        "worker.emulator.handlers",
        "worker.emulator.jwt",
        "worker.emulator.listing",
        "worker.emulator.store",
        "worker.emulator.validation",
        "worker.emulator.wire",
    ),
    # The edges: the Celery app and its tasks, the command line, the demo.
    "edges": (
        "worker.celery",
        "worker.tasks",
        "worker.cli_support",
        "worker.cli_outbox",
        "worker.cli",
        "worker.demo",
    ),
}

#: Layers a layer may import besides itself and the ones listed before it in LAYERS.
SEPARATE = {"emulator": ()}

#: Function-level imports of our own modules that are allowed, each with its reason. Any other is a
#: circle being dodged, or a layer crossed where no one looks.
LATE_IMPORTS: dict[tuple[str, str], str] = {
    (
        "worker.cli",
        "worker.celery",
    ): "importing the Celery app reads the settings and builds it: for `worker` only",
    ("worker.cli", "worker.tasks"): "the task shells import the Celery app; only a resync sent to a worker needs them",
    ("worker.cli", "worker.emulator"): "the emulator's server (uvicorn, its ASGI app) loads for `emulator` only",
    ("worker.cli", "worker.emulator.faults"): "the emulator's server loads for `emulator` only",
    ("worker.cli", "worker.emulator.store"): "the emulator's server loads for `emulator` only",
    ("worker.cli", "worker.demo"): "the demo starts an emulator and a worker; it loads for `demo` only",
}

#: What the web app's process must never load: our Celery app, and the worker's heavy libraries.
APP_MUST_NOT_IMPORT = ("worker.celery", "celery", "kombu", "httpx", "tenacity", "prometheus_client", "uvicorn")
#: Third-party imports inside a function that the app's modules may make, each with its reason.
APP_LATE_IMPORTS: dict[tuple[str, str], str] = {
    ("worker.kick", "celery"): "a bare Celery app publishes the kick by task name, made on the first logout only",
}
#: The pure rule modules: data in, data out.
PURE = (
    "worker.decisions",
    "worker.outbox_decisions",
    "worker.counts",
    "worker.reports",
    "worker.task_names",
    "worker.errors",
)
PURE_MUST_NOT_IMPORT = ("sqlalchemy", "httpx", "celery", "kombu", "redis", "prometheus_client")


@dataclass(frozen=True)
class Import:
    """One import statement's target, as a module name, and where it sits."""

    source: str
    target: str
    line: int
    in_function: bool
    typing_only: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> Iterator[Import]:
    """Every import in module ``name``; ``from worker import x`` counts as an import of ``worker.x``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node: ast.AST, in_function: bool, typing_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, alias.name, child.lineno, in_function, typing_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    yield Import(name, full if full in MODULES else base, child.lineno, in_function, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, typing_only)
            else:
                inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(child, inner, typing_only)

    yield from walk(ast.parse(path.read_text(encoding="utf-8")), False, False)


IMPORTS = [i for name in MODULES for i in imports_of(name)]
#: Imports that run (not typing only), of our own modules.
OURS = [i for i in IMPORTS if not i.typing_only and (i.target == "worker" or i.target.startswith("worker."))]
GRAPH: dict[str, set[str]] = {name: set() for name in MODULES}
for _i in OURS:
    GRAPH[_i.source].add(_i.target)
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def closure(start: str) -> set[str]:
    """``start`` and every module of ours it imports, directly or not (imports that run)."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(GRAPH.get(module, ()))
    return seen


def test_every_module_is_in_one_layer() -> None:
    # Given every module of the package, and the layers drawn above
    drawn = [m for modules in LAYERS.values() for m in modules]
    # Then each module is drawn exactly once, and no drawn module is invented
    assert sorted(set(MODULES) - set(drawn)) == [], "add new modules to LAYERS"
    assert sorted(set(drawn) - set(MODULES)) == [], "LAYERS names modules that do not exist"
    assert len(drawn) == len(set(drawn))


def test_the_import_graph_has_no_circles() -> None:
    assert cycles(GRAPH) == []


def test_the_circle_finder_finds_circles() -> None:
    # The check above is only worth something if it sees a circle when there is one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_of_ours_hides_in_a_function() -> None:
    late = {(i.source, i.target) for i in OURS if i.in_function and i.target != i.source}
    assert sorted(late - set(LATE_IMPORTS)) == [], "import at module level, or allow-list it with its reason"
    assert sorted(set(LATE_IMPORTS) - late) == [], "LATE_IMPORTS lists an import that is gone"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_no_import_runs_up_the_layers(layer: str) -> None:
    allowed = SEPARATE.get(layer)
    upward = []
    for i in OURS:
        if LAYER_OF.get(i.source) != layer or i.target == "worker":  # the package itself: its version only
            continue
        target_layer = LAYER_OF[i.target]
        ok = target_layer == layer if allowed is not None else RANK[target_layer] <= RANK[layer]
        if not ok:
            upward.append(f"{i.source}:{i.line} imports {i.target} ({target_layer})")
    assert upward == []


@pytest.mark.parametrize("module", [m for m in LAYERS["app"]])
def test_the_web_apps_modules_never_load_the_worker(module: str) -> None:
    # Given a module a web app imports, and everything of ours it imports in turn
    reached = closure(module)
    # Then none of them is above the app's layer, none is our Celery app
    above = sorted(m for m in reached if m != "worker" and RANK[LAYER_OF[m]] > RANK["app"])
    assert above == []
    # And none of them imports Celery, httpx, tenacity or prometheus_client (only the late imports allowed)
    heavy = sorted(
        f"{i.source}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.source in reached
        and not i.typing_only
        and (i.target in APP_MUST_NOT_IMPORT or i.target.split(".")[0] in APP_MUST_NOT_IMPORT)
        and not (i.in_function and (i.source, i.target.split(".")[0]) in APP_LATE_IMPORTS)
    )
    assert heavy == []


@pytest.mark.parametrize("module", ["worker.authn", "worker.transport", "worker.wire", "worker.list_limits"])
def test_the_pangea_client_never_imports_the_worker(module: str) -> None:
    worker_side = {"worker.engine", "worker.outbox", "worker.runtime", "worker.operations", "worker.celery"}
    assert sorted(closure(module) & worker_side) == []


@pytest.mark.parametrize("module", PURE)
def test_the_rules_import_no_database_http_or_broker(module: str) -> None:
    found = sorted(
        f"{i.target} (line {i.line})"
        for i in IMPORTS
        if i.source in closure(module) and i.target.split(".")[0] in PURE_MUST_NOT_IMPORT
    )
    assert found == []


def test_recording_a_metric_never_reaches_the_exporter() -> None:
    # The Pangea client records into worker.metrics; what scrapes (operations, runtime) sits above it
    assert sorted(closure("worker.metrics") - {"worker.metrics", "worker.counts"}) == []
