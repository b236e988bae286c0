"""The issue's "Judged by": a clean wheel in a fresh venv, beside a small app, behind a local HTTP proxy.

The app has its own Alembic history in the same PostgreSQL database and its own Celery worker on
the same Redis, on Celery's default queue. session-sync is built as a wheel, installed
non-editable into a fresh venv (its dependencies from the package index), and run from an empty
directory: ``db upgrade``, ``emulator``, ``check``, ``celery -A worker worker -B``, ``celery -A
worker inspect``, ``resync --all --wait``, ``status``, ``demo``. Then: nothing of ours lands in the
app's tables, history or worker; nothing of the app's breaks; every request to Pangea went through
the proxy.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from celery import Celery

from tests import app_beside
from tests.acceptance import harness
from tests.conftest import XDIST_WORKER, free_port
from tests.forward_proxy import RunningProxy, running_proxy
from tests.helpers import KEY
from worker import crypto, emulator, kick, models, sessions, task_names
from worker import db as dbmod
from worker.settings import DEFAULT_QUEUE, Settings

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with session-sync installed from a wheel built from this checkout (one per test run).

    Under ``pytest -n`` the workers share it: the run's temporary folder is common to them, the
    first to get there builds under a lock, the others wait for it and reuse it.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if XDIST_WORKER else base
    with (shared / "wheel.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, whatever happens
        venv = shared / "wheel" / "venv"
        if not (shared / "wheel" / "built").exists():
            _build_wheel_venv(shared / "wheel")
            (shared / "wheel" / "built").touch()
    return venv


def _build_wheel_venv(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)  # what an interrupted build left
    root.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", str(ROOT), "--no-deps", "-w", str(root / "dist")], capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (root / "dist").glob("pangea_session_sync-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]


def clean_env(workdir: Path, **extra: str) -> dict[str, str]:
    """An environment without this checkout on the path, as a user's shell has."""
    keep = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES and not k.startswith(("PYTHON", "VIRTUAL"))}
    return keep | {"HOME": str(workdir), "PYTHONUNBUFFERED": "1"} | extra


def run(
    venv: Path, cmd: str, *args: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a console script of the venv (``session-sync``, ``celery``) from ``cwd``."""
    return subprocess.run(
        [str(venv / "bin" / cmd), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


class Background:
    """A process of the venv in its own process group, logging to a file; stopped by :meth:`stop`."""

    def __init__(self, venv: Path, cmd: str, *args: str, cwd: Path, env: dict[str, str], name: str) -> None:
        self.log = cwd / f"{name}.log"
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [str(venv / "bin" / cmd), *args],
                cwd=cwd,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        harness.wait_for(
            lambda: text in self.output() or self.proc.poll() is not None,
            timeout=timeout,
            what=f"{text!r} in {self.log}",
        )
        assert self.proc.poll() is None, self.output()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def background() -> Iterator[list[Background]]:
    """Processes the test started; all stopped at the end, whatever happens."""
    started: list[Background] = []
    yield started
    for process in reversed(started):
        process.stop()


def pangea_requests(stats: dict[str, dict[str, int]]) -> int:
    """How many Pangea API requests (``/v2/...``) the emulator answered."""
    return sum(sum(by_status.values()) for path, by_status in stats.items() if path.startswith("/v2/"))


def test_wheel_beside_an_app_behind_a_proxy(
    wheel_venv: Path, empty_pg_url: str, redis_url: str, tmp_path: Path, background: list[Background]
) -> None:
    work = tmp_path / "empty"  # every session-sync command runs from here: no checkout, no pyproject.toml
    work.mkdir()
    app_dir = tmp_path / "shop"
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "token").write_text(emulator.DEFAULT_SERVICE_TOKEN + "\n")
    (secrets_dir / "keys").write_text(KEY + "\n")

    # Given an app with its own Alembic history in the database, and a row of its own
    command.upgrade(app_beside.alembic_project(app_dir / "migrations", empty_pg_url), "head")
    engine = dbmod.create_engine(empty_pg_url)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO app_users (id, email) VALUES (1, 'owner@shop.example')"))

    with running_proxy(tmp_path) as proxy:
        emu_port = free_port()
        env = clean_env(
            work,
            DATABASE_URL=empty_pg_url,
            CELERY_BROKER_URL=redis_url,
            PANGEA_BASE_URL=f"http://127.0.0.1:{emu_port}",
            PANGEA_AUTHN_TOKEN_FILE=str(secrets_dir / "token"),
            SESSION_SYNC_ENCRYPTION_KEYS_FILE=str(secrets_dir / "keys"),
            SESSION_SYNC_METRICS_PORT="0",
            SESSION_SYNC_SWEEP_PERIOD="1s",
            SESSION_SYNC_BATCH_SIZE="4",
            HTTP_PROXY=proxy.url,  # the egress proxy: the only way out
        )
        story(wheel_venv, env, work, app_dir, empty_pg_url, redis_url, emu_port, proxy, background)
    engine.dispose()


def story(
    venv: Path,
    env: dict[str, str],
    work: Path,
    app_dir: Path,
    pg_url: str,
    redis_url: str,
    emu_port: int,
    proxy: RunningProxy,
    background: list[Background],
) -> None:
    # ... the AuthN emulator, served by the installed wheel
    emu = Background(venv, "session-sync", "emulator", "--port", str(emu_port), cwd=work, env=env, name="emulator")
    background.append(emu)
    admin = emulator.EmulatorAdmin(f"http://127.0.0.1:{emu_port}")
    harness.wait_for(lambda: _answers(admin), timeout=30, what="emulator up")

    # When session-sync is migrated from an empty directory
    upgraded = run(venv, "session-sync", "db", "upgrade", cwd=work, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"database at revision {dbmod.head_revision()}" in upgraded.stdout
    # ... and checked
    checked = run(venv, "session-sync", "check", cwd=work, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [line.split()[0] for line in checked.stdout.splitlines()] == ["ok"] * 5

    # ... with the app's own Celery worker on the same Redis (Celery's default queue), and ours beside it
    app_beside.write_celery_app(app_dir)
    app_env = clean_env(app_dir, SHOP_BROKER_URL=redis_url, CELERY_BROKER_URL=redis_url, PYTHONPATH=str(app_dir))
    app_worker = Background(
        venv,
        "celery",
        "-A",
        "shop_tasks",
        "worker",
        "--pool=solo",
        "--loglevel=INFO",
        cwd=app_dir,
        env=app_env,
        name="app",
    )
    background.append(app_worker)
    ours = Background(
        venv,
        "celery",
        "-A",
        "worker",
        "worker",
        "-B",
        "--concurrency=2",
        "--loglevel=INFO",
        "--hostname=session-sync@%h",  # the README's advice: a node name of its own beside the app's workers
        cwd=work,
        env=env,
        name="ours",
    )
    background.append(ours)
    app_worker.wait_for("ready.")
    ours.wait_for("ready.")
    node = f"session-sync@{socket.gethostname()}"
    queues = run(venv, "celery", "-A", "worker", "inspect", "active_queues", "-d", node, cwd=work, env=env)
    assert queues.returncode == 0 and f"'name': '{DEFAULT_QUEUE}'" in queues.stdout, queues.stdout + queues.stderr
    assert "'name': 'celery'" not in queues.stdout  # ours consumes only its own queue

    # ... and the web app logs six users in (its own calls to Pangea go through the proxy too)
    settings = Settings.from_env({"SESSION_SYNC_ENCRYPTION_KEYS": KEY, "DATABASE_URL": pg_url})
    cipher = crypto.TokenCipher.from_settings(settings)
    web_engine = dbmod.create_engine(pg_url)
    factory = dbmod.session_factory(web_engine)
    web = httpx.Client(base_url=f"http://127.0.0.1:{emu_port}", proxy=proxy.url, timeout=10)
    ids: list[int] = []
    pangea_ids: list[str] = []
    for i in range(6):
        code = admin.login(f"user{i}@shop.example")
        answer = web.post(
            "/v2/client/userinfo",
            json={"code": code},
            headers={"Authorization": f"Bearer {emulator.DEFAULT_CLIENT_TOKEN}"},
        ).json()
        with factory.begin() as db:
            row = sessions.record_login(db, answer, cipher=cipher)
            ids.append(row.id)
            pangea_ids.append(row.session.pangea_session_id or "")
    # ... two of them are killed at Pangea
    for pangea_id in pangea_ids[:2]:
        killed = web.post(
            "/v2/session/invalidate",
            json={"session_id": pangea_id},
            headers={"Authorization": f"Bearer {emulator.DEFAULT_SERVICE_TOKEN}"},
        )
        assert killed.json()["status"] == "Success"

    # ... support resyncs everything and waits
    resynced = run(venv, "session-sync", "resync", "--all", "--wait", "--json", "--timeout", "1m", cwd=work, env=env)
    # Then ours did it, in batches, and revoked exactly the two
    assert resynced.returncode == 0, resynced.stderr
    counts = json.loads(resynced.stdout)
    assert counts["checked"] == 6 and counts["revoked"] == 2, counts
    assert "resync of 6 sessions queued as 2 tasks" in resynced.stderr

    # When the web app logs one user out (the kick goes to our queue by name)
    with factory.begin() as db:
        sessions.logout(db, ids[2], kick=lambda: kick.send_delivery_task(redis_url, DEFAULT_QUEUE))
    # Then the logout reaches Pangea
    harness.wait_for(
        lambda: _outbox(venv, work, env).get("delivered") == 1, timeout=30, what="logout delivered to Pangea"
    )

    # ... the app's own Celery still works on the same broker
    shop = Celery("shop-client", broker=redis_url, backend=redis_url)
    assert shop.send_task("shop.add", args=(2, 3)).get(timeout=30) == 5

    # ... nothing of ours reached the app's worker, nothing of the app's reached ours
    app_log, our_log = app_worker.output(), ours.output()
    assert "session_sync" not in app_log and "unregistered" not in app_log.lower(), app_log[-3000:]
    assert "shop.add" not in our_log
    assert f"Task {task_names.RESYNC_BATCH}" in our_log and f"Task {task_names.DELIVER_LOGOUTS}" in our_log

    # ... the app's tables and history are as they were, and ours are only ours
    assert app_beside.app_versions(pg_url) == [app_beside.APP_REVISION]
    engine = dbmod.create_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT id, email FROM app_users")).all() == [(1, "owner@shop.example")]
            tables = set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert tables == {"app_users", "alembic_version", dbmod.VERSION_TABLE} | set(models.Base.metadata.tables)

    # ... and every request to Pangea went through the proxy
    forwarded = [line for line in proxy.requests() if "/v2/" in line]
    assert len(forwarded) == pangea_requests(admin.stats()["requests"]) > 6 + 2
    assert all(line.startswith(f"POST http://127.0.0.1:{emu_port}/v2/") for line in forwarded)
    web.close()
    admin.close()
    web_engine.dispose()


def _answers(admin: emulator.EmulatorAdmin) -> bool:
    try:
        admin.stats()
    except Exception:
        return False
    return True


def _outbox(venv: Path, work: Path, env: dict[str, str]) -> dict[str, int]:
    status = run(venv, "session-sync", "status", "--json", cwd=work, env=env)
    return dict(json.loads(status.stdout)["outbox"]) if status.returncode == 0 else {}


def test_wheel_runs_the_demo_from_an_empty_directory(wheel_venv: Path, tmp_path: Path) -> None:
    # Given the installed wheel and nothing else: no checkout, no settings, no servers
    env = clean_env(tmp_path)
    # When a new user runs the demo
    demo = run(wheel_venv, "session-sync", "demo", cwd=tmp_path, env=env, timeout=180)
    # Then it finds its migrations inside the package and runs to the end
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    assert "doesn't exist" not in demo.stderr
