"""Secrets stay secret (design invariant 4), end to end: no secret of a live run shows up anywhere.

A real ``celery -A worker worker -B`` (prefork, DEBUG logging) on Redis and PostgreSQL, with Flower
watching it behind basic auth, works for real against the emulator for about twenty seconds: it
sweeps, refreshes sessions whose active tokens live five seconds (minting new tokens every few
seconds), revokes sessions killed at Pangea and sessions that expired for good, delivers logouts
queued by the app and by the CLI, and runs resyncs sent through Celery by the CLI
(``resync --wait``) and by Flower's API.

Every secret of the run is collected: each token the emulator minted (at login and at every
refresh, read from its in-memory store while the run goes on), the login codes, the cookie handles
``record_login`` handed out, the service token and the encryption keys. Then everything the run
left behind or showed is searched for each of them, whole and by its body without the ``ptu_``-style
prefix, with base64 runs decoded: every row of every table, every Redis key and value, every Redis
command the run sent (MONITOR: messages, results and events in flight), the task results, the
worker's and Flower's logs and every file the processes wrote, the CLI's output, Flower's task
views (API and HTML) and ``/metrics``. Outside the database, the tokens' ciphertexts must not show
either. The scanner is shown to find a planted token, so a clean scan means something.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from tests.acceptance import harness
from tests.acceptance.test_flower import AUTH, answers, running_flower
from tests.acceptance.test_worker import states
from tests.conftest import RunningEmulator, _serve_in_thread, free_port
from tests.helpers import KEY, env_for, row
from worker import crypto, emulator, models, runtime, sessions, task_names
from worker.emulator.app import Emulator
from worker.emulator.store import Store
from worker.settings import DEFAULT_QUEUE, Settings

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

#: Sessions by what happens to them: refreshed again and again, killed at Pangea, expired for good,
#: logged out by the app (the last by the operator's CLI), one user logged out everywhere, left alone.
REFRESHERS, DOOMED, MORTAL, LEAVING, HEALTHY = 5, 3, 2, 3, 3
ACTIVE_TTL = 5.0
REFRESH = "/v2/client/session/refresh"
#: Every task the run must have shown Flower.
TASK_NAMES = {task_names.SWEEP, task_names.CHECK_BATCH, task_names.DELIVER_LOGOUTS, task_names.RESYNC}
#: A secret's body: what is left of ``ptu_...`` (and the like) without its prefix.
PREFIXED = re.compile(r"^(?:ptu|ptr|pts|pcl|pmc|lss)_(.{16,})$")
#: Runs of base64 (standard or url-safe) long enough to hide a token: decoded and searched too.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{24,}={0,2}")
#: A Fernet ciphertext (a token at rest), which must never leave the database.
FERNET = re.compile(r"gAAAAA[A-Za-z0-9_-]{20,}")
#: What the broker tap waits for to stop.
STOP_KEY = "session-sync-scan:stop"


# --- the emulator, with its store in reach ---------------------------------------------------------


@dataclass(frozen=True)
class Emulated:
    running: RunningEmulator
    store: Store
    app: Emulator


@pytest.fixture
def emulated() -> Iterator[Emulated]:
    """A fresh emulator served from this process, like ``emu``, but with its app and store in reach."""
    app = emulator.create_app(service_token=emulator.DEFAULT_SERVICE_TOKEN, client_token=emulator.DEFAULT_CLIENT_TOKEN)
    server, thread = _serve_in_thread(app, port := free_port())
    admin = emulator.EmulatorAdmin(f"http://127.0.0.1:{port}")
    running = RunningEmulator(
        f"http://127.0.0.1:{port}", emulator.DEFAULT_SERVICE_TOKEN, emulator.DEFAULT_CLIENT_TOKEN, admin
    )
    yield Emulated(running, app.ctx.store, app)
    admin.close()
    server.should_exit = True
    thread.join(timeout=10)


class Mint:
    """Every token the emulator mints while the block runs, read from its store every 20 ms.

    A spent refresh token leaves the store's index at once, but no refresh token here lives under
    two seconds. The store's sessions are kept too: an ended session still holds its last tokens
    and every earlier active token (``Session.tokens``).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._secrets: set[str] = set()
        self._sessions: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Mint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._poll()

    def _poll(self) -> None:
        for _ in range(5):  # the emulator's thread may change a dict while we copy it
            try:
                self._secrets.update(list(self._store.by_secret))
                self._sessions.update(dict(self._store.sessions))
                return
            except RuntimeError:
                continue

    def tokens(self) -> set[str]:
        """Every active (``ptu_``) and refresh (``ptr_``) token seen."""
        found = set(self._secrets) | set(getattr(self._store, "spent", ()))
        for session in self._sessions.values():
            found.update(token.secret for token in session.tokens())
        return found


class BrokerTap:
    """Every command sent to Redis database ``db`` while the block runs (MONITOR), as Redis shows it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = int(redis.connection.parse_url(url).get("db", 0))
        self.lines: list[str] = []
        self._client = redis.Redis.from_url(url)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> BrokerTap:
        self._thread.start()
        assert self._ready.wait(10), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.set(STOP_KEY, "1")
        self._thread.join(timeout=20)
        self._client.delete(STOP_KEY)
        self._client.close()

    def _run(self) -> None:
        mine = f"[{self.db} "
        with self._client.monitor() as monitor:
            self._ready.set()
            while True:
                line = monitor.connection.read_response()
                text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
                if mine not in text[:40]:  # "<time> [<db> <client>] ..."; other tests' databases are not ours
                    continue
                if STOP_KEY in text:
                    return
                self.lines.append(text)


# --- what is searched, and how ----------------------------------------------------------------------


def reveal(text: str, depth: int = 2) -> str:
    """``text`` followed by whatever its base64 runs decode to (Celery bodies are base64 JSON)."""
    decoded = [text]
    for run in set(BASE64_RUN.findall(text)):
        padded = run.rstrip("=") + "=" * (-len(run.rstrip("=")) % 4)
        try:
            raw = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
        except (binascii.Error, ValueError):
            continue
        plain = raw.decode("utf-8", errors="ignore")
        if plain.isprintable() or "{" in plain:
            decoded.append(reveal(plain, depth - 1) if depth > 1 else plain)
    return "\n".join(decoded)


@dataclass
class Scanner:
    """Looks for secrets (by kind) in texts; a prefixed token is searched by its body, which finds both."""

    needles: dict[str, str] = field(default_factory=dict)  # needle -> what it is

    def add(self, kind: str, values: Iterable[str]) -> None:
        for value in values:
            if value:
                body = PREFIXED.match(value)
                self.needles[body[1] if body else value] = kind

    def leaks(self, where: str, text: str) -> list[str]:
        """``where: <kind> <first characters>`` for each secret found in ``text`` or its decoded base64."""
        seen = reveal(text)
        return [f"{where}: {kind} {needle[:8]}..." for needle, kind in self.needles.items() if needle in seen]

    def scan(self, texts: Mapping[str, str]) -> list[str]:
        return [leak for where, text in texts.items() for leak in self.leaks(where, text)]


def as_text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def database_texts(conn: sa.Connection) -> tuple[dict[str, str], int, set[str]]:
    """Every row of every table (all schemas but the system's), the row count, and the ciphertexts."""
    texts: dict[str, str] = {}
    rows_seen, ciphertexts = 0, set[str]()
    inspector = sa.inspect(conn)
    for schema in inspector.get_schema_names():
        if schema in ("information_schema", "pg_catalog") or schema.startswith("pg_"):
            continue
        for table in inspector.get_table_names(schema=schema):
            result = conn.execute(sa.text(f'SELECT * FROM "{schema}"."{table}"'))
            columns = list(result.keys())
            lines = []
            for values in result:
                rows_seen += 1
                lines.append(" | ".join(as_text(v) for v in values))
                ciphertexts.update(as_text(v) for c, v in zip(columns, values, strict=True) if c.endswith("_enc") and v)
            texts[f"table {schema}.{table}"] = "\n".join(lines)
    return texts, rows_seen, ciphertexts


def redis_texts(url: str) -> dict[str, str]:
    """Every key of the database at ``url`` and its value, whatever its type."""
    client = redis.Redis.from_url(url)
    readers: dict[str, Callable[[bytes], Iterable[object]]] = {
        "string": lambda k: [client.get(k)],
        "list": lambda k: client.lrange(k, 0, -1),
        "hash": lambda k: [x for pair in client.hgetall(k).items() for x in pair],
        "set": lambda k: client.smembers(k),
        "zset": lambda k: [pair[0] for pair in client.zrange(k, 0, -1, withscores=True)],
        "stream": lambda k: [repr(entry) for entry in client.xrange(k)],
    }
    texts = {}
    try:
        for key in client.scan_iter(count=1000):
            kind = as_text(client.type(key))
            values = readers[kind](key) if kind in readers else [f"<{kind}>"]
            texts[f"redis {url.rsplit('/', 1)[-1]} {kind} {as_text(key)}"] = "\n".join(
                [as_text(key), *(as_text(v) for v in values)]
            )
    finally:
        client.close()
    return texts


def flower_texts(base: str) -> tuple[dict[str, str], list[str]]:
    """Flower's task views (API and HTML) for every task it knows, its worker pages; and the task ids."""
    with httpx.Client(base_url=base, auth=AUTH, timeout=20) as http:

        def get(path: str, **params: Any) -> str:
            answer = http.get(path, params=params)
            assert answer.status_code == 200, (path, answer.status_code)
            return answer.text

        tasks: dict[str, Any] = http.get("/api/tasks").json()
        workers = list(http.get("/api/workers").json())
        table = {"draw": 1, "start": 0, "length": 100_000, "order[0][column]": 0, "columns[0][data]": "name"}
        texts = {
            "flower /api/tasks": json.dumps(tasks),
            "flower /tasks": get("/tasks"),
            "flower /tasks/datatable": get("/tasks/datatable", **table),
            "flower /api/workers": get("/api/workers"),
            "flower /workers": get("/workers"),
            "flower /broker": get("/broker"),
            "flower /api/task/types": get("/api/task/types"),
        }
        for name in workers:
            texts[f"flower /worker/{name}"] = get(f"/worker/{name}")
        for task_id in tasks:
            texts[f"flower /api/task/info/{task_id}"] = get(f"/api/task/info/{task_id}")
            texts[f"flower /task/{task_id}"] = get(f"/task/{task_id}")
            texts[f"flower /api/task/result/{task_id}"] = get(f"/api/task/result/{task_id}")
    return texts, list(tasks)


def result_texts(backend: str, task_ids: Iterable[str]) -> dict[str, str]:
    """Each task's result as a client of the result backend reads it (state, result, traceback)."""
    reader = Celery("reader", broker=backend, backend=backend)
    try:
        texts = {}
        for task_id in task_ids:
            found = reader.AsyncResult(task_id)
            texts[f"result {task_id}"] = f"{found.state} {found.result!r} {found.traceback}"
        return texts
    finally:
        reader.close()


def file_texts(workdir: Path) -> dict[str, str]:
    """Every file the worker, beat, Flower and the CLI wrote in their working directory."""
    return {
        f"file {p.name}": p.read_bytes().decode("utf-8", errors="replace") for p in workdir.rglob("*") if p.is_file()
    }


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Cast:
    """The sessions of the run by group, and every secret the logins handed out."""

    refreshers: list[int] = field(default_factory=list)
    doomed: list[int] = field(default_factory=list)
    mortal: list[int] = field(default_factory=list)
    leaving: list[int] = field(default_factory=list)
    user_leaving: str = ""
    healthy: list[int] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    codes: set[str] = field(default_factory=set)
    handles: set[str] = field(default_factory=set)
    logins: int = 0

    def login(self, rt: runtime.Runtime, emu: RunningEmulator, email: str, **ttl: Any) -> sessions.Login:
        code = emu.admin.login(email, **ttl)
        userinfo = rt.run(rt.client.userinfo(code)).to_userinfo()
        with rt.sessions.begin() as db:
            login = sessions.record_login(db, userinfo, cipher=rt.cipher, policy=rt.policy)
        result = userinfo.get("result", userinfo)
        self.tokens |= {result["active_token"]["token"], result["refresh_token"]["token"]}
        self.codes.add(code)
        self.handles.add(login.handle)
        self.logins += 1
        return login


def log_everyone_in(rt: runtime.Runtime, emu: RunningEmulator) -> Cast:
    cast = Cast()
    cast.refreshers = [cast.login(rt, emu, f"r{i}@scan.example", active_ttl=ACTIVE_TTL).id for i in range(REFRESHERS)]
    cast.doomed = [cast.login(rt, emu, f"d{i}@scan.example").id for i in range(DOOMED)]
    # From here on the project issues JWT active tokens (refreshes too): the scan must catch both kinds
    emu.admin.config(active_tokens="jwt")
    cast.mortal = [cast.login(rt, emu, f"m{i}@scan.example", active_ttl=2, refresh_ttl=2).id for i in range(MORTAL)]
    cast.leaving = [cast.login(rt, emu, f"l{i}@scan.example").id for i in range(LEAVING)]
    cast.user_leaving = cast.login(rt, emu, "everywhere@scan.example").user_id
    cast.login(rt, emu, "everywhere@scan.example")
    cast.healthy = [cast.login(rt, emu, f"h{i}@scan.example").id for i in range(HEALTHY)]
    kinds = {token[:4] for token in cast.tokens}
    assert {"ptu_", "ptr_"} <= kinds and any(k.startswith("eyJ") for k in kinds), "both kinds of active token"
    return cast


def outbox_states(rt: runtime.Runtime) -> dict[str, int]:
    E = models.LogoutEvent
    with rt.sessions() as db:
        return {str(s): n for s, n in db.execute(sa.select(E.state, sa.func.count()).group_by(E.state))}


def traffic_done(rt: runtime.Runtime, emu: Emulated, cast: Cast) -> bool:
    """Refreshed often, killed and expired sessions revoked, every logout delivered."""
    refreshed = emu.app.stats.get(REFRESH, {}).get("200", 0)
    return (
        refreshed >= 3 * REFRESHERS
        and states(rt, cast.doomed) == [("revoked", "invalid_token")] * DOOMED
        and all(state == "revoked" for state, _ in states(rt, cast.mortal))
        and outbox_states(rt) == {"delivered": LEAVING + 1}
    )


def backend_of(env: Mapping[str, str], workdir: Path) -> str:
    """The result backend of the worker's Celery app, configured from ``env`` as the worker is."""
    done = subprocess.run(
        [sys.executable, "-c", "from worker.celery import app; print(app.conf.result_backend)"],
        cwd=workdir,
        env={"PATH": "", "HOME": str(workdir), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Operator:
    """Runs the CLI as an operator would, keeping every word it printed."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env, self.workdir = env, workdir
        self.outputs: dict[str, str] = {}

    def __call__(self, *args: str) -> str:
        done = harness.run_cli(self.env, self.workdir, *args, timeout=90)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        self.outputs[f"cli {' '.join(args)}"] = done.stdout + done.stderr
        return done.stdout


def flower_knows(base: str, names: set[str]) -> bool:
    tasks = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=10).json()
    return names <= {t.get("name") for t in tasks.values()}


def test_no_secret_of_a_live_run_shows_anywhere(
    pg_url: str, redis_url: str, emulated: Emulated, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu = emulated.running
    metrics_port, flower_port = free_port(), free_port()
    env = env_for(
        pg_url,
        emu,
        broker=redis_url,
        SESSION_SYNC_ENCRYPTION_KEYS=f"{crypto.generate_key()},{KEY}",  # a rotation: two keys to keep secret
        SESSION_SYNC_CHECK_INTERVAL="3s",
        SESSION_SYNC_SWEEP_PERIOD="1s",
        SESSION_SYNC_REFRESH_MARGIN="3s",
        SESSION_SYNC_BATCH_SIZE="8",
        SESSION_SYNC_OUTBOX_PERIOD="1s",
        SESSION_SYNC_OUTBOX_BACKOFF="500ms",
        SESSION_SYNC_HTTP_TIMEOUT="3",
        SESSION_SYNC_METRICS_PORT=str(metrics_port),
        SESSION_SYNC_METRICS_HOST="127.0.0.1",
    )
    rt = runtime.Runtime(Settings.from_env(env))
    kicker = Celery("kicker", broker=redis_url)  # the web app's own Celery app, sending by name
    operator = Operator(env, tmp_path)
    base = f"http://127.0.0.1:{flower_port}"
    started = time.monotonic()
    try:
        backend = backend_of(env, tmp_path)
        # The worker keeps its task results in Redis, beside the broker: both are scanned
        assert backend == redis_url, backend
        with Mint(emulated.store) as mint, BrokerTap(redis_url) as tap:
            # Given sessions of every kind, logged in through the hosted page and recorded by the app
            cast = log_everyone_in(rt, emu)
            # ... a worker with embedded beat logging at DEBUG, and Flower watching it
            with (
                harness.running_worker(
                    env, tmp_path, "-B", "--concurrency=2", "--loglevel=DEBUG", name="scanned"
                ) as worker,
                running_flower(env, tmp_path, flower_port) as flower,
            ):
                harness.wait_for(lambda: answers(base), timeout=30, what="Flower to answer")
                # When Pangea kills some sessions, the app and an operator log others out
                for sid in cast.doomed:
                    rt.run(rt.client.session_invalidate(row(rt, sid).pangea_session_id or ""))
                kick = lambda: kicker.send_task(task_names.DELIVER_LOGOUTS, queue=DEFAULT_QUEUE, expires=30)  # noqa: E731
                with rt.sessions.begin() as db:
                    for sid in cast.leaving[:-1]:
                        sessions.logout(db, sid, kick=kick)
                    sessions.logout_user(db, cast.user_leaving, kick=kick)
                operator("logout", "--session", str(cast.leaving[-1]))
                # ... support resyncs through Celery, from the CLI and from Flower
                operator("resync", "--all", "--wait", "--json", "--timeout", "60")
                operator("resync", "--session", str(cast.refreshers[0]), "--wait", "--json", "--timeout", "60")
                applied = httpx.post(
                    f"{base}/api/task/async-apply/{task_names.RESYNC}",
                    json={"kwargs": {"session_id": cast.healthy[0]}},
                    auth=AUTH,
                    timeout=10,
                )
                assert applied.status_code == 200, applied.text
                # ... and the worker refreshes, revokes and delivers for a while
                harness.wait_for(
                    lambda: traffic_done(rt, emulated, cast), timeout=40, what="refreshes, revocations, logouts"
                )
                operator("resync", "--user", row(rt, cast.healthy[1]).user_id, "--wait", "--json", "--timeout", "60")
                operator("status", "--json")
                operator("status", "--session", str(cast.doomed[0]))
                operator("outbox", "--json")
                harness.wait_for(lambda: flower_knows(base, TASK_NAMES), timeout=30, what="Flower to see every task")
                seen, task_ids = flower_texts(base)
                seen["metrics"] = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            seen |= {"worker log": worker.output(), "flower log": flower.output()}
        ran = time.monotonic() - started

        # Then: every secret of the run, and where it must not be
        refreshes = emulated.app.stats.get(REFRESH, {}).get("200", 0)
        minted = mint.tokens()
        scanner = Scanner()
        scanner.add("token", minted | cast.tokens)
        scanner.add("login code", cast.codes)
        scanner.add("cookie handle", cast.handles)
        scanner.add("service token", [emu.service_token, emu.client_token])
        scanner.add("encryption key", env["SESSION_SYNC_ENCRYPTION_KEYS"].split(","))
        # ... the run minted two tokens per login and two per refresh, and the collection has each one
        assert cast.tokens <= minted
        assert len(minted) == 2 * (cast.logins + refreshes) > 2 * cast.logins, (len(minted), refreshes)

        engine = sa.create_engine(pg_url)
        try:
            with engine.connect() as conn:
                tables, rows, ciphertexts = database_texts(conn)
        finally:
            engine.dispose()
        keys = redis_texts(redis_url)
        results = result_texts(backend, task_ids)
        broker = {f"redis command {i}": line for i, line in enumerate(tap.lines)}
        outside = seen | keys | results | broker | operator.outputs | file_texts(tmp_path)

        # ... none in the database, in clear
        assert scanner.scan(tables) == []
        # ... none anywhere else, nor their ciphertexts
        assert scanner.scan(outside) == []
        at_rest = Scanner()
        at_rest.add("ciphertext", ciphertexts)
        assert at_rest.scan(outside) == []
        assert [where for where, text in outside.items() if FERNET.search(reveal(text))] == []

        # ... and the scan covered real traffic: results stored, DEBUG logged, every kind of task shown
        assert sum(where.startswith("redis ") and "celery-task-meta-" in where for where in keys) >= 10
        assert " DEBUG/" in seen["worker log"], "the worker did not log at DEBUG"
        assert sum(text.startswith("SUCCESS") for text in results.values()) >= 10
        # ... and the broker's messages were read, base64 bodies decoded (a batch's kwargs are its slot)
        assert '{"slot": "' in reveal("\n".join(line for line in tap.lines if task_names.CHECK_BATCH in line))
        assert not [w for w, text in outside.items() if "[REDACTED]" in text], "something tried to log a secret"

        refreshed = sorted(minted - cast.tokens)
        for token in (next(t for t in refreshed if t.startswith("ptr_")), next(t for t in refreshed if t[:3] == "eyJ")):
            prove_the_scanner_finds_a_leak(scanner, redis_url, pg_url, token)
        log_bytes = sum(len(t) for w, t in outside.items() if w.startswith("file "))
        with capsys.disabled():
            print(
                f"\nsecurity scan: {len(tables)} tables ({rows} rows), {len(keys)} redis keys, "
                f"{len(tap.lines)} redis commands, {len(results)} task results, {log_bytes} log/file bytes, "
                f"{len(task_ids)} flower tasks ({len(seen) - 3} views), {len(operator.outputs)} CLI outputs, "
                f"{len(seen['metrics'])} metrics bytes; searched for {len(scanner.needles)} secrets "
                f"({len(minted)} tokens: {cast.logins} logins + {refreshes} refreshes) and {len(ciphertexts)} "
                f"ciphertexts: none found; run {ran:.0f} s"
            )
    finally:
        kicker.close()
        rt.close()


def prove_the_scanner_finds_a_leak(scanner: Scanner, redis_url: str, pg_url: str, token: str) -> None:
    """A token planted in a Redis key, in a base64 Celery-style body, and in a row is found: the scan is not vacuous."""
    client = redis.Redis.from_url(redis_url)
    inner = token.split("_", 1)[1] if PREFIXED.match(token) else token  # a prefixed token by its body alone
    body = base64.b64encode(json.dumps([[], {"note": inner}, {}]).encode()).decode()
    try:
        client.set("session-sync-scan:planted", f"oops {token}")
        client.rpush("session-sync-scan:queue", json.dumps({"body": body, "content-encoding": "utf-8"}))
        found = scanner.scan(redis_texts(redis_url))
        assert len(found) == 2, found
        assert any("session-sync-scan:planted" in leak for leak in found), found
        assert any("session-sync-scan:queue" in leak for leak in found), found
    finally:
        client.delete("session-sync-scan:planted", "session-sync-scan:queue")
        client.close()
    assert scanner.scan(redis_texts(redis_url)) == []
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.update(models.LocalSession).values(active_token_enc=f"x{token}"))
            assert database_texts(conn)[0] and scanner.scan(database_texts(conn)[0])
            conn.rollback()
            assert scanner.scan(database_texts(conn)[0]) == []
    finally:
        engine.dispose()
