"""Shared fixtures: real PostgreSQL, Redis and the AuthN emulator served over loopback.

A missing service skips the tests that need it on a developer's machine, and fails them when
``CI`` is set (dramatiq's rule): CI must prove everything.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from worker import db as dbmod
from worker import emulator

#: PostgreSQL server used by the tests; each test gets a fresh database cloned from a template.
PG_ADMIN_URL = os.environ.get("SESSION_SYNC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
#: The xdist worker this process is (``gw0``, ``gw1``, ...), or ``None`` outside ``pytest -n``.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def _redis_url_of_worker(url: str, worker: str | None) -> str:
    """Each xdist worker its own Redis database: worker ``gwK`` takes the configured database minus K.

    Two workers on one database would flush each other's queues and take each other's Celery tasks.
    """
    if worker is None:
        return url
    parsed = urlsplit(url)
    base = int(parsed.path.strip("/") or 0)
    return urlunsplit(parsed._replace(path=f"/{(base - int(worker.removeprefix('gw'))) % 16}"))


#: Redis used by the tests (database 15 keeps them apart from anything else on the server; under
#: ``pytest -n``, worker gwK uses database 15 - K).
REDIS_URL = _redis_url_of_worker(os.environ.get("SESSION_SYNC_TEST_REDIS", "redis://127.0.0.1:6379/15"), XDIST_WORKER)
#: Pangea's reference material beside the project (read, never copied in).
SHARED_DIR = Path(os.environ.get("SESSION_SYNC_SHARED", Path(__file__).resolve().parents[2] / "shared"))

IN_CI = bool(os.environ.get("CI"))


def require(available: bool, reason: str) -> None:
    """Skip when a service is absent, but fail in CI where nothing may skip."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: services must be up)")
    pytest.skip(reason)


#: Tests that run fleets of worker processes (the fault matrix's process faults, the chaos soak, the
#: skewed clocks), the first two against servers of their own: they load the machine for minutes, so
#: they run one after another, never two at once. Under pytest-xdist that is one group
#: (``--dist loadgroup``) on one worker, put first so it starts at once while the others take the rest.
SERIAL_FILES = ("tests/faults/test_process_faults.py", "tests/chaos/test_soak.py", "tests/chaos/test_skew.py")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects on the mark, and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    serial = [i for i in items if Path(i.path).relative_to(config.rootpath).as_posix() in SERIAL_FILES]
    for item in serial:
        item.add_marker(pytest.mark.serial)
        item.add_marker(pytest.mark.xdist_group("serial"))
    chosen = set(serial)
    items[:] = serial + [i for i in items if i not in chosen]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Two serial tests at once (``-n`` without ``--dist loadgroup``) would each load the machine for minutes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if item.get_closest_marker("serial") and workers > 1 and not item.config.getvalue("loadgroup"):
        pytest.fail("serial test in a parallel run without --dist loadgroup: run the suite as .ci/run does")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the AuthN emulator, as a real server -------------------------------------------------------


@dataclass(frozen=True)
class RunningEmulator:
    """A live emulator: where it listens, its tokens, and its admin surface."""

    base_url: str
    service_token: str
    client_token: str
    admin: emulator.EmulatorAdmin
    #: The HTTP code InvalidToken and ExpiredToken come with (see VERDICT_CODES).
    verdict_code: int = 400


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


def _serve_in_thread(app: Any, port: int) -> tuple[_ThreadedServer, threading.Thread]:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = _ThreadedServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("emulator did not start")
        time.sleep(0.01)
    return server, thread


#: The HTTP codes Pangea may give token verdicts (InvalidToken, ExpiredToken): documented nowhere,
#: so the scenarios that judge verdicts run against an emulator answering with each.
VERDICT_CODES = (400, 401)
#: Runs a test once per entry of VERDICT_CODES: its ``emu`` (and ``make_runtime``) answers with that code.
verdict_codes = pytest.mark.parametrize("emu", VERDICT_CODES, indirect=True, ids=lambda code: f"verdicts{code}")


def _running_emulator(verdict_code: int = 400) -> Iterator[RunningEmulator]:
    port = free_port()
    codes = {"InvalidToken": verdict_code, "ExpiredToken": verdict_code}
    app = emulator.create_app(
        service_token=emulator.DEFAULT_SERVICE_TOKEN, client_token=emulator.DEFAULT_CLIENT_TOKEN, http_codes=codes
    )
    server, thread = _serve_in_thread(app, port)
    base_url = f"http://127.0.0.1:{port}"
    admin = emulator.EmulatorAdmin(base_url)
    yield RunningEmulator(
        base_url, emulator.DEFAULT_SERVICE_TOKEN, emulator.DEFAULT_CLIENT_TOKEN, admin, verdict_code=verdict_code
    )
    admin.close()
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[RunningEmulator]:
    """One emulator for the whole run, listening on loopback (token verdicts under HTTP 400)."""
    yield from _running_emulator()


@pytest.fixture(scope="session")
def emulator_server_401() -> Iterator[RunningEmulator]:
    """An emulator for the whole run that answers InvalidToken and ExpiredToken with HTTP 401."""
    yield from _running_emulator(401)


@pytest.fixture
def other_project() -> Iterator[str]:
    """A second Pangea project (its own emulator) that accepts the same tokens but knows none of our sessions."""
    app = emulator.create_app(service_token=emulator.DEFAULT_SERVICE_TOKEN, client_token=emulator.DEFAULT_CLIENT_TOKEN)
    server, thread = _serve_in_thread(app, free_port())
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[RunningEmulator]:
    """The emulator, reset before and after the test (sessions, counters, faults).

    Token verdicts come with HTTP 400, or with the code a ``@verdict_codes`` test names.
    """
    code = getattr(request, "param", 400)
    server: RunningEmulator = request.getfixturevalue("emulator_server" if code == 400 else f"emulator_server_{code}")
    server.admin.reset()
    yield server
    server.admin.reset()


# --- databases ------------------------------------------------------------------------------------


def _pg_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The PostgreSQL admin URL, after making sure the server answers."""
    require(_pg_available(), f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    yield PG_ADMIN_URL


def _admin_execute(admin_url: str, statement: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _with_database(url: str, name: str) -> str:
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    """A migrated database used as the template for every test's fresh database."""
    name = f"sst_template_{uuid.uuid4().hex[:8]}"
    _admin_execute(pg_server, f'CREATE DATABASE "{name}"')
    url = _with_database(pg_server, name)
    dbmod.upgrade(url)
    yield name
    _admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (no tables)."""
    name = f"sst_{uuid.uuid4().hex[:12]}"
    _admin_execute(pg_server, f'CREATE DATABASE "{name}"')
    yield _with_database(pg_server, name)
    _admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    name = f"sst_{uuid.uuid4().hex[:12]}"
    _admin_execute(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _with_database(pg_server, name)
    _admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite database file for one test."""
    url = f"sqlite:///{tmp_path / 'session-sync.db'}"
    dbmod.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database, once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on the test's fresh database (both backends)."""
    eng = dbmod.create_engine(db_url)
    yield eng
    eng.dispose()


# --- redis ----------------------------------------------------------------------------------------


def _redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except Exception:
        return False


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database for one test."""
    import redis

    require(_redis_available(), f"Redis not reachable at {REDIS_URL}")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def make_runtime(db_url: str, emu: RunningEmulator) -> Iterator[Any]:
    """Build runtimes on the test's database and the emulator; closed after the test."""
    from tests.helpers import settings_for
    from worker import runtime

    made: list[runtime.Runtime] = []

    def make(**extra: str) -> runtime.Runtime:
        rt = runtime.Runtime(settings_for(db_url, emu, **extra))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture(scope="session")
def authn_spec() -> dict[str, object]:
    """Pangea's AuthN OpenAPI spec from ../shared/specs (reference data, never copied in)."""
    import json

    path = SHARED_DIR / "specs" / "authn.openapi.json"
    require(path.exists(), f"Pangea's OpenAPI spec not found at {path} (set SESSION_SYNC_SHARED)")
    return dict(json.loads(path.read_text()))


def http_post(base_url: str, path: str, token: str | None, body: object) -> httpx.Response:
    """A raw POST, for tests that look at the wire itself."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=10)
