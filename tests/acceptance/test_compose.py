"""``docker-compose.yml`` without Docker: valid against the Compose specification, and every command starts.

There is no Docker engine here, so the file is checked in two ways:

1. **Statically**: against the Compose specification's JSON schema, the ``compose-spec.json`` that
   the ``check-jsonschema`` package vendors and refreshes from compose-spec/compose-spec (Apache-2.0,
   licence shipped beside it in that package); then the rules the schema cannot express:
   dependencies exist and wait on the right conditions, secrets come from the environment.
2. **By running it**: each service's own command, environment and healthcheck, read from the file,
   interpolated as compose would, and rewritten to this machine (the compose host names
   ``postgres``/``redis``/``emulator`` become the test's database, Redis and a local port), are
   started in dependency order as subprocesses. migrate exits 0, the emulator answers, the worker
   becomes ready, beat sends a sweep that the worker runs and turns healthy, Flower answers with auth only.
   Twice: with the emulator profile (``.env.example``'s emulator block), and with "real Pangea"
   (the test's own emulator server standing in, outside compose), where no emulator service starts.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import sqlalchemy as sa
from ruamel.yaml import YAML

from tests.acceptance import harness
from tests.conftest import RunningEmulator, free_port
from tests.helpers import KEY
from worker import db as dbmod
from worker import emulator, models, task_names
from worker.settings import Settings

pytestmark = [pytest.mark.timeout(120)]

COMPOSE_FILE = harness.ROOT / "docker-compose.yml"
ENV_EXAMPLE = harness.ROOT / ".env.example"
#: What an operator puts in .env for real Pangea: the two secrets, the domain and the AuthN token.
OPERATOR_ENV = {
    "SESSION_SYNC_ENCRYPTION_KEYS": KEY,
    "FLOWER_BASIC_AUTH": "ops:compose-test",
    "PANGEA_DOMAIN": "aws.us.pangea.cloud",
    "PANGEA_AUTHN_TOKEN": "pts_" + "q" * 32,
}
#: Tuning for the test only: beat sends a sweep every second instead of every 15 s.
FASTER = {"SESSION_SYNC_SWEEP_PERIOD": "1s"}
#: Services Docker would start from an image we do not build: this machine's own servers stand in.
THIS_MACHINE = ("postgres", "redis")


def load_compose() -> dict[str, Any]:
    """The compose file as compose reads it (YAML, merge keys and anchors resolved)."""
    return dict(YAML(typ="safe", pure=True).load(COMPOSE_FILE))


def emulator_env() -> dict[str, str]:
    """The operator's .env for the emulator: the secrets, plus the emulator block of ``.env.example`` uncommented."""
    block = ENV_EXAMPLE.read_text().split("# Or, to try it without Pangea", 1)[1].split("\n\n", 1)[0]
    lines = [line.removeprefix("# ") for line in block.splitlines() if re.match(r"# [A-Z_]+=", line)]
    secrets = {k: v for k, v in OPERATOR_ENV.items() if k.startswith(("SESSION_SYNC_", "FLOWER_"))}
    return secrets | dict(line.split("=", 1) for line in lines)


def active(compose: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The services ``docker compose up`` starts: those without a profile, and those of COMPOSE_PROFILES."""
    profiles = set(filter(None, env.get("COMPOSE_PROFILES", "").split(",")))
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


def compose_schema() -> dict[str, Any]:
    """The Compose specification's JSON schema, as vendored by check-jsonschema."""
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return dict(json.loads(vendored.read_text()))


# --- compose's variable interpolation -----------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


class MissingVariable(Exception):
    """Raised when a required variable (``${NAME:?message}``) has no value, as ``docker compose`` does."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with ``$$``, ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}``, ``${NAME:+alt}`` resolved."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"] or "", m["arg"] or ""
        is_set = bool(env.get(name)) if op.startswith(":") else name in env
        if op.endswith("-"):
            return env[name] if is_set else arg
        if op.endswith("?"):
            if not is_set:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op.endswith("+"):
            return arg if is_set else ""
        return env.get(name, "")

    return _VARIABLE.sub(resolve, value)


# --- 1. statically ------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    # Given the file as written and as compose would interpolate it
    raw = load_compose()
    resolved = interpolate(raw, OPERATOR_ENV)
    emulated = interpolate(raw, emulator_env())
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())

    # When each is checked against the Compose specification
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)]
    errors += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resolved)]
    errors += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(emulated)]

    # Then both are valid, and hold the whole stack of the design
    assert errors == []
    assert set(raw["services"]) == {"postgres", "redis", "migrate", "worker", "beat", "flower", "emulator"}
    # ... and the schema is not a pushover: a misspelt condition fails
    broken = interpolate(raw, OPERATOR_ENV)
    broken["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert not validator.is_valid(broken)


def test_dependencies_exist_and_wait_on_the_right_condition() -> None:
    services = load_compose()["services"]
    # Given / When every depends_on edge of the file
    edges = [
        (name, target, spec["condition"])
        for name, service in services.items()
        for target, spec in (service.get("depends_on") or {}).items()
    ]

    # Then each target exists, and what a service waits for can be seen
    for name, target, condition in edges:
        assert target in services, f"{name} depends on unknown service {target}"
        if condition == "service_healthy":
            assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no healthcheck"
        if condition == "service_completed_successfully":
            assert services[target].get("restart") == "no", f"{target} is a one-shot: it must not restart"
    # ... the order of the design: migrate after postgres, everything else after migrate, Redis and the emulator
    assert ("migrate", "postgres", "service_healthy") in edges
    for app in ("worker", "beat"):
        assert (app, "migrate", "service_completed_successfully") in edges
        assert (app, "redis", "service_healthy") in edges
    assert ("worker", "emulator", "service_healthy") in edges
    assert services["worker"]["depends_on"]["emulator"]["required"] is False  # not there with real Pangea
    assert services["migrate"]["command"] == ["session-sync", "db", "upgrade"]
    # ... and the worker's healthcheck is its /metrics and `session-sync check`, without Pangea (readiness)
    worker_test = services["worker"]["healthcheck"]["test"]
    assert worker_test[0] == "CMD-SHELL" and worker_test[1].endswith("&& session-sync check --skip pangea")
    # ... and the one image they share is built from this repository's Dockerfile
    assert all(s.get("build") in (None, ".") for s in services.values())
    assert (harness.ROOT / "Dockerfile").exists()


def test_secrets_and_the_pangea_token_come_from_the_environment() -> None:
    raw = load_compose()
    flower = raw["services"]["flower"]
    # Given the file with no .env at all / When compose interpolates it / Then it refuses, naming what is missing
    for missing in ("SESSION_SYNC_ENCRYPTION_KEYS", "FLOWER_BASIC_AUTH", "PANGEA_AUTHN_TOKEN"):
        with pytest.raises(MissingVariable, match=f"required variable {missing} is missing a value"):
            interpolate(raw, {k: v for k, v in OPERATOR_ENV.items() if k != missing})
    # ... Flower's basic auth is required from the environment, with no default in the file
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", flower["environment"]["FLOWER_BASIC_AUTH"])
    assert "basic-auth" not in " ".join(flower["command"])
    # ... and no Pangea-shaped token is written in the file: not the emulator's, not any
    text = COMPOSE_FILE.read_text()
    assert emulator.DEFAULT_SERVICE_TOKEN not in text and emulator.DEFAULT_CLIENT_TOKEN not in text
    assert not re.search(r"\b(pts|pcl)_[a-z2-7]{32}", text)


def test_with_real_pangea_the_emulator_neither_starts_nor_is_waited_for() -> None:
    # Given an operator's .env for real Pangea / When compose interpolates the file
    raw = load_compose()
    services = active(interpolate(raw, OPERATOR_ENV), OPERATOR_ENV)

    # Then the emulator is not started, and nothing that starts requires it
    assert "emulator" not in services and raw["services"]["emulator"]["profiles"] == ["emulator"]
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services or spec.get("required") is False, f"{name} requires {target}"
    # ... and every session-sync process talks to the operator's Pangea, with the operator's token
    for name in ("migrate", "worker", "beat", "flower"):
        env = services[name]["environment"]
        assert env["PANGEA_DOMAIN"] == "aws.us.pangea.cloud" and env["PANGEA_BASE_URL"] == "", name
        assert env["PANGEA_AUTHN_TOKEN"] == OPERATOR_ENV["PANGEA_AUTHN_TOKEN"], name
        settings = Settings.from_env(env)  # as each process reads it: "" means not set
        assert settings.authn_base_url == "https://authn.aws.us.pangea.cloud", name


def test_the_emulator_block_of_env_example_runs_the_emulator_profile() -> None:
    # Given .env.example's emulator block / When compose interpolates the file with it
    env = emulator_env()
    services = active(interpolate(load_compose(), env), env)

    # Then the emulator starts, and every session-sync process talks to it with its development token
    assert env["COMPOSE_PROFILES"] == "emulator" and "emulator" in services
    assert services["emulator"]["command"][:2] == ["session-sync", "emulator"]
    for name in ("migrate", "worker", "beat", "flower"):
        env_of = services[name]["environment"]
        assert env_of["PANGEA_BASE_URL"] == "http://emulator:8900", name
        assert env_of["PANGEA_AUTHN_TOKEN"] == emulator.DEFAULT_SERVICE_TOKEN, name
        assert env_of["SESSION_SYNC_ENCRYPTION_KEYS"] == KEY, name


# --- 2. by running each command -----------------------------------------------------------------


class Stack:
    """The compose services run as local subprocesses, rewritten to this machine's ports and servers."""

    def __init__(
        self, compose: dict[str, Any], env: Mapping[str, str], servers: Mapping[str, str], workdir: Path
    ) -> None:
        self.services: dict[str, Any] = active(compose, env)
        self.servers = servers  # compose host name -> this machine's URL (the test's database and Redis)
        self.workdir = workdir
        self.ports = {(name, port): free_port() for name, s in self.services.items() for port in _published(s)}
        self.procs: dict[str, harness.WorkerProcess] = {}
        self.mode = "emulator"  # or "real-pangea": how the operator's .env configures Pangea

    def order(self) -> list[str]:
        """Services in an order that respects depends_on."""
        graph = {name: set(self.depends_on(name)) for name in self.services}
        return list(TopologicalSorter(graph).static_order())

    def depends_on(self, service: str) -> dict[str, Any]:
        """What ``service`` waits for, as compose sees it: a dependency neither required nor started is skipped."""
        edges = self.services[service].get("depends_on") or {}
        return {t: spec for t, spec in edges.items() if t in self.services or spec.get("required", True)}

    def _here(self, text: str, service: str) -> str:
        """``text`` with compose's addresses turned into this machine's."""
        text = text.replace("0.0.0.0", "127.0.0.1")
        for (name, port), local in self.ports.items():
            text = text.replace(f"{name}:{port}", f"127.0.0.1:{local}")
            if name == service:
                text = re.sub(rf"\b(127\.0\.0\.1|localhost):{port}\b", f"127.0.0.1:{local}", text)
        return text

    def _port(self, service: str, value: str) -> str:
        return str(self.ports.get((service, int(value)), value)) if value.isdigit() else value

    def env(self, service: str) -> dict[str, str]:
        """The service's environment from the file, pointed at this machine."""
        env: dict[str, str] = {}
        for key, value in (self.services[service].get("environment") or {}).items():
            value = str(value)
            host = urlsplit(value).hostname if "://" in value else None
            env[key] = (
                self.servers[host]
                if host is not None and host in self.servers
                else self._port(service, self._here(value, service))
            )
        path = f"{harness.BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the image's programs come first, as in it
        return {"PATH": path, "HOME": str(self.workdir), "PYTHONUNBUFFERED": "1"} | env | FASTER

    def argv(self, service: str, command: Any) -> list[str]:
        """A command (exec or shell form) with its program from this environment and this machine's ports."""
        words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
        program = {"python": sys.executable}.get(words[0], str(harness.BIN / words[0]))
        rest = [self._here(w, service) for w in words[1:]]
        rest = [self._port(service, w) if prev == "--port" else w for prev, w in zip(words, rest, strict=False)]
        return [program, *rest]

    def start(self, service: str) -> harness.WorkerProcess:
        """Start the service's command in its own folder and process group, logging to a file."""
        folder = self.workdir / service
        folder.mkdir()
        log = folder / "output.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                self.argv(service, self.services[service]["command"]),
                cwd=folder,
                env=self.env(service),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[service] = harness.WorkerProcess(proc, log)
        return self.procs[service]

    def healthy(self, service: str) -> bool:
        """Whether the service's own healthcheck passes (run here, as Docker would run it in the container)."""
        test = self.services[service]["healthcheck"]["test"]
        argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else self.argv(service, test[1:])
        done = subprocess.run(argv, env=self.env(service), capture_output=True, timeout=30)
        return done.returncode == 0

    def wait_for(self, service: str, condition: str) -> None:
        """Block until ``service`` meets a depends_on condition."""
        if service in self.servers:  # this machine's PostgreSQL and Redis: the fixtures checked them
            return
        proc = self.procs[service]
        if condition == "service_completed_successfully":
            code = proc.proc.wait(timeout=60)
            assert code == 0, f"{service} exited {code}:\n{proc.output()[-3000:]}"
        elif condition == "service_healthy":
            harness.wait_for(
                lambda: self.healthy(service) or proc.proc.poll() is not None, timeout=60, what=f"{service} healthy"
            )
            assert proc.proc.poll() is None, f"{service} exited:\n{proc.output()[-3000:]}"

    def up(self) -> None:
        """Start every service we build, in order, each after its dependencies' conditions hold."""
        for name in self.order():
            for target, spec in self.depends_on(name).items():
                self.wait_for(target, spec["condition"])
            if name not in self.servers:
                self.start(name)

    def down(self) -> None:
        """Stop every process (group and all)."""
        for proc in self.procs.values():
            proc.kill(signal.SIGTERM)


def _published(service: Mapping[str, Any]) -> list[int]:
    """Container ports a service publishes (short or long syntax)."""
    ports = []
    for entry in service.get("ports") or []:
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1].split("/")[0]
        ports.append(int(target))
    return ports


@pytest.fixture(params=["emulator", "real-pangea"])
def stack(request: pytest.FixtureRequest, empty_pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    """The compose file, interpolated with the operator's .env, on this machine; stopped afterwards.

    ``emulator``: .env.example's emulator block. ``real-pangea``: the operator's settings for real Pangea,
    with the test's emulator server (outside compose) standing in for it.
    """
    if request.param == "emulator":
        env = emulator_env()
    else:
        emu: RunningEmulator = request.getfixturevalue("emu")
        env = {k: v for k, v in OPERATOR_ENV.items() if k != "PANGEA_DOMAIN"}
        env |= {"PANGEA_BASE_URL": emu.base_url, "PANGEA_AUTHN_TOKEN": emu.service_token}
    running = Stack(interpolate(load_compose(), env), env, {"postgres": empty_pg_url, "redis": redis_url}, tmp_path)
    running.mode = request.param
    try:
        yield running
    finally:
        running.down()


@pytest.mark.slow
def test_each_service_command_starts_outside_docker(stack: Stack, empty_pg_url: str) -> None:
    # Given an empty database, a flushed Redis and the compose file pointed at them
    assert dbmod.current_revision(empty_pg_url) is None

    # When every service is started in dependency order, as `docker compose up` would
    stack.up()

    # Then migrate has brought the database to the newest revision
    assert stack.procs["migrate"].proc.returncode == 0
    assert dbmod.current_revision(empty_pg_url) == dbmod.head_revision()
    # ... Pangea (the emulator service, or the one outside compose) answers, and the emulator runs only in its profile
    pangea_url = stack.env("worker")["PANGEA_BASE_URL"]
    assert httpx.get(f"{pangea_url}/emulator/stats", timeout=5).status_code == 200
    assert ("emulator" in stack.procs) == (stack.mode == "emulator")
    # ... the worker is ready and its healthcheck (its /metrics, then `session-sync check --skip pangea`) passes
    worker = stack.procs["worker"]
    harness.wait_for(lambda: "ready." in worker.output(), timeout=60, what="worker ready")
    harness.wait_for(lambda: stack.healthy("worker"), timeout=30, what="worker healthcheck")
    # ... beat sends a sweep, the worker runs it (recorded in the database), and beat's healthcheck passes
    beat = stack.procs["beat"]
    harness.wait_for(lambda: f"Sending due task sweep ({task_names.SWEEP})" in beat.output(), timeout=30, what="beat")
    engine = sa.create_engine(empty_pg_url)
    try:
        harness.wait_for(lambda: _sweeps(engine) > 0, timeout=30, what="a sweep recorded by the worker")
    finally:
        engine.dispose()
    harness.wait_for(lambda: stack.healthy("beat"), timeout=30, what="beat healthcheck")
    # ... and Flower answers on its port, with its basic auth only
    harness.wait_for(lambda: stack.healthy("flower"), timeout=30, what="flower healthcheck")
    flower = f"http://127.0.0.1:{stack.ports[('flower', 5555)]}"
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    user, password = OPERATOR_ENV["FLOWER_BASIC_AUTH"].split(":")
    assert httpx.get(f"{flower}/api/workers", auth=(user, password), timeout=10).status_code == 200
    # ... with every process still running, logging JSON lines by default
    assert all(p.proc.poll() is None for name, p in stack.procs.items() if name != "migrate")
    assert any(line.startswith("{") and '"action": "sweep"' in line for line in worker.output().splitlines())
    # ... and the worker's readiness is not Pangea's: with the emulator service gone, it stays healthy
    if stack.mode == "emulator":
        stack.procs["emulator"].kill(signal.SIGTERM)
        assert stack.healthy("worker")


def test_beat_is_healthy_only_while_the_sweeps_it_sends_are_run(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    # Given beat's healthcheck from the file, on a database at the newest revision
    env = emulator_env()
    stack = Stack(interpolate(load_compose(), env), env, {"postgres": pg_url, "redis": redis_url}, tmp_path)
    engine = sa.create_engine(pg_url)
    now = datetime.now(UTC)

    def swept(minutes_ago: float) -> bool:
        at = now - timedelta(minutes=minutes_ago)
        with engine.begin() as conn:
            conn.execute(sa.insert(models.SweepRun).values(slot=at, kind="beat", started_at=at, finished_at=at))
        return stack.healthy("beat")

    try:
        # When no sweep has run yet / Then beat is not healthy
        assert not stack.healthy("beat")
        # ... nor when the latest sweep began ten minutes ago, and it is once a sweep began just now
        assert not swept(10)
        assert swept(0)
    finally:
        engine.dispose()


def _sweeps(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(models.SweepRun)).scalar_one())
