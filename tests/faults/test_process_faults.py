"""The worker's own world failing: killed mid-sweep and mid-refresh, Redis and PostgreSQL restarted, two beats.

Real ``celery -A worker worker -B`` processes on PostgreSQL and a Redis server of this test's own
(so restarting it disturbs nothing else; the PostgreSQL restart, too, is of a server of the test's
own), against the emulator over HTTP. As in
``test_pangea_faults``, sessions are ended at Pangea and users log out while the fault is on, and
the run is judged by Pangea's state and the database's once the fault is over.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tests.acceptance import harness
from tests.chaos.postgres import PrivatePostgres
from tests.conftest import RunningEmulator, free_port, require
from tests.faults.world import Figures, World, fault_env, wait_caught_up
from worker import models, runtime, verification
from worker.settings import Settings

pytestmark = [pytest.mark.timeout(180), pytest.mark.faults, pytest.mark.slow]

S = models.LocalSession
WORKER_ARGS = ("-B", "--pool=prefork", "--concurrency=2")


class RedisServer:
    """A ``redis-server`` of our own on a free port, keeping nothing on disk; restartable."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen(argv, cwd=self._workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            harness.wait_for(_pings(client), timeout=10, what="redis-server")
        finally:
            client.close()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)


def _pings(client: redis.Redis) -> Any:
    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return ping


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server is not installed (needed to restart Redis)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


class Run:
    """One scenario: the world, the workers, and the runtime the test judges with."""

    def __init__(
        self,
        pg_url: str,
        emu: RunningEmulator,
        broker: str,
        tmp_path: Path,
        scenario: str,
        *,
        env: dict[str, str] | None = None,
        ttl: Callable[[int], float] | None = None,
    ) -> None:
        extra = {"SESSION_SYNC_BATCH_SIZE": "10"} | (env or {})
        self.env = fault_env(pg_url, emu.base_url, emu.service_token, CELERY_BROKER_URL=broker, **extra)
        self.scenario = scenario
        self.tmp_path = tmp_path
        self.rt = runtime.Runtime(Settings.from_env(fault_env(pg_url, emu.base_url, emu.service_token)))
        self.world = World(self.rt, emu, tag=scenario, ttl=ttl)
        self.workers: list[harness.WorkerProcess] = []
        self._argv: list[tuple[str, tuple[str, ...]]] = []
        self.exit_codes: list[int] = []  # of workers that exited on their own and were started again

    def start_worker(self, name: str, *args: str) -> harness.WorkerProcess:
        workdir = self.tmp_path / name  # each beat keeps its own schedule file
        workdir.mkdir(exist_ok=True)
        worker = harness.start_worker(self.env, workdir, *(args or WORKER_ARGS), name=name)
        self.workers.append(worker)
        self._argv.append((name, args or WORKER_ARGS))
        return worker

    def restart_exited(self) -> None:
        """What a supervisor does (compose's ``restart: unless-stopped``): start again a worker that exited."""
        for i, worker in enumerate(self.workers):
            if worker.proc.poll() is not None:
                self.exit_codes.append(worker.proc.returncode)
                worker.kill(signal.SIGKILL)  # whatever is left of its process group
                name, args = self._argv[i]
                workdir = self.tmp_path / name
                self.workers[i] = harness.start_worker(self.env, workdir, *args, name=f"{name}-{len(self.exit_codes)}")

    def wait_calm(self) -> None:
        """Every session checked at least once: the worker is in its stride."""
        # (derived: a round of a group writes no session row, see worker.verification)
        never = verification.last_checked_at().is_(None)
        harness.wait_for(lambda: self.count(never) == 0, timeout=60, what="a first sweep")

    def count(self, *where: sa.ColumnElement[bool]) -> int:
        with self.rt.sessions() as db:
            return int(db.execute(sa.select(sa.func.count()).select_from(S).where(*where)).scalar_one())

    def in_flight(self, *where: sa.ColumnElement[bool]) -> bool:
        """Work leased right now: sessions claimed by their rows, or (with no condition) a group's round."""
        G = models.CheckGroup
        if not where:
            with self.rt.sessions() as db:
                leased = db.execute(sa.select(sa.func.count()).where(G.claimed_until > datetime.now(UTC))).scalar_one()
            if leased:
                return True
        return self.count(S.claimed_until > datetime.now(UTC), S.state == "active", *where) > 0

    def group_mid_round(self) -> tuple[int, datetime, int] | None:
        """A check group whose round is leased and part-way through (a page done): id, round start, cursor."""
        G = models.CheckGroup
        with self.rt.sessions() as db:
            found = db.execute(
                sa.select(G.id, G.round_started_at, G.cursor_id).where(
                    G.claimed_until > datetime.now(UTC), G.cursor_id > 0
                )
            ).first()
        if found is None or found[1] is None or found[2] is None:
            return None
        return int(found[0]), found[1], int(found[2])

    def judge(self, healed: datetime, *, supervised: bool = False, **notes: Any) -> Figures:
        """Wait until the world caught up after ``healed``; ``supervised``: restarting workers that exit."""

        def step() -> None:
            if supervised:
                self.restart_exited()
            time.sleep(0.3)

        recovered = wait_caught_up(self.world, healed, step=step, timeout=90)
        if supervised:
            notes["worker_exits"] = len(self.exit_codes)
        return self.world.judge(self.scenario, recovered_in=recovered, **notes)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        self.rt.close()


@pytest.fixture
def run_for(
    pg_url: str, emu: RunningEmulator, own_redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Any]:
    runs: list[Run] = []

    def make(scenario: str, *, database_url: str | None = None, **options: Any) -> Run:
        run = Run(database_url or pg_url, emu, own_redis.url, tmp_path, scenario, **options)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def report(capsys: pytest.CaptureFixture[str], figures: Figures) -> None:
    with capsys.disabled():
        print(f"\n{figures.line()}")
    figures.assert_invariants()


def test_worker_killed_mid_sweep(run_for: Any, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_for("sigkill_mid_sweep")
    worker = run.start_worker("w1")
    run.wait_calm()
    # Given slow answers, so batches are in flight when the worker dies
    emu.admin.faults(latency_ms=400, paths=["/v2/session/list", "/v2/client/token/check"])
    run.world.doom()
    run.world.leave()
    harness.wait_for(run.in_flight, timeout=30, what="a claimed batch")
    claimed = run.count(S.claimed_until > datetime.now(UTC))
    worker.kill(signal.SIGKILL)
    emu.admin.clear_faults()
    # When another worker starts, it takes the dead worker's rows once their lease lapses
    run.start_worker("w2")
    healed = datetime.now(UTC)
    report(capsys, run.judge(healed, claimed_at_kill=claimed))


def test_worker_killed_mid_group(run_for: Any, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_for("sigkill_mid_group", env={"SESSION_SYNC_BATCH_SIZE": "3"})
    # Given the world's sessions in two check groups, so a group's round takes many pages of three
    with run.rt.sessions.begin() as db:
        db.execute(sa.update(S).values(bucket=S.id % 2 * 512))
    worker = run.start_worker("w1")
    run.wait_calm()
    harness.wait_for(lambda: run.count(S.next_check_at.is_(None)) >= 20, timeout=60, what="sessions on their groups")
    # ... and slow answers, so a round is part-way through its pages when the worker dies
    emu.admin.faults(latency_ms=400, paths=["/v2/session/list", "/v2/client/token/check"])
    run.world.doom()
    run.world.leave()
    harness.wait_for(lambda: run.group_mid_round() is not None, timeout=30, what="a round part-way through")
    worker.kill(signal.SIGKILL)
    group, started, cursor = run.group_mid_round() or (0, None, 0)
    emu.admin.clear_faults()
    # When another worker starts, it resumes that round at its cursor once the lease lapses
    run.start_worker("w2")
    healed = datetime.now(UTC)
    figures = run.judge(healed, group=group, cursor_at_kill=cursor)
    report(capsys, figures)
    # Then the round the dead worker began was finished (resumed, not begun again)
    with run.rt.sessions() as db:
        resumed = db.execute(
            sa.select(sa.func.count())
            .select_from(models.CheckGroup)
            .where(models.CheckGroup.id == group, models.CheckGroup.verified_at >= started)
        ).scalar_one()
    assert resumed == 1


def test_worker_killed_mid_refresh(run_for: Any, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_for("sigkill_mid_refresh")
    worker = run.start_worker("w1")
    run.wait_calm()
    # Given refreshes that take Pangea 1.5 s: some are in flight (marked uncertain) when the worker dies
    emu.admin.faults(latency_ms=1500, paths=["/v2/client/session/refresh"])
    run.world.doom()
    run.world.leave()
    harness.wait_for(lambda: run.in_flight(S.uncertain.is_(True)), timeout=30, what="a refresh in flight")
    refreshing = run.count(S.uncertain.is_(True), S.claimed_until > datetime.now(UTC))
    worker.kill(signal.SIGKILL)
    # ... and Pangea performs them anyway: their answers are lost with the worker
    time.sleep(1.6)
    emu.admin.clear_faults()
    # When another worker starts, it settles each uncertain refresh before sending any refresh token
    run.start_worker("w2")
    healed = datetime.now(UTC)
    report(capsys, run.judge(healed, refreshing_at_kill=refreshing))


def test_redis_restarted(
    run_for: Any, own_redis: RedisServer, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_for("redis_restart")
    run.start_worker("w1")
    run.wait_calm()
    # Given Redis dies (every queued message with it) while sessions die and users log out
    own_redis.kill()
    run.world.doom()
    run.world.leave()
    time.sleep(3)
    # When it comes back empty, the worker and its beat reconnect on their own, or (Celery 5.7 can
    # exit with "Unrecoverable error" when Redis goes away while a late-acked task runs) the worker
    # exits non-zero and its supervisor starts it again, as compose's restart policy does
    own_redis.start()
    healed = datetime.now(UTC)
    report(capsys, run.judge(healed, supervised=True))
    assert 0 not in run.exit_codes, "a worker that exits 0 on a broker outage is not restarted by Restart=on-failure"


def test_postgres_restarted(
    run_for: Any, own_postgres: PrivatePostgres, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_for("postgres_restart", database_url=own_postgres.url)
    worker = run.start_worker("w1")
    run.wait_calm()
    run.world.doom()
    run.world.leave()  # committed before the outage: the outbox has them
    # Given PostgreSQL (a server of this test's own) goes down for three seconds: every pooled connection dies
    own_postgres.stop()
    try:
        time.sleep(3)
    finally:
        own_postgres.start()
    healed = datetime.now(UTC)
    # Then the same worker recovers with no manual step: its pools reconnect
    figures = run.judge(healed)
    assert worker.proc.poll() is None, "the worker died with the database"
    # ... after feeling the outage: tasks failed on the dead connections meanwhile
    felt = worker.output().count("raised unexpected: OperationalError")
    assert felt > 0, "the worker never noticed the outage"
    report(capsys, Figures(**{**figures.__dict__, "notes": {"tasks_failed_in_outage": felt}}))


def test_two_beats(run_for: Any, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_for("two_beats")
    # Given two workers, each with its own embedded beat firing every sweep
    workers = [run.start_worker("w1"), run.start_worker("w2")]
    run.wait_calm()
    started = datetime.now(UTC)
    run.world.doom()
    run.world.leave()
    figures = run.judge(started)
    # Then both beats fired, and each sweep slot ran once: the second sweep of a slot was a no-op
    duplicates = sum(w.output().count("Duplicate sweep skipped") for w in workers)
    with run.rt.sessions() as db:
        slots = db.execute(sa.select(sa.func.count()).select_from(models.SweepRun)).scalar_one()
    assert duplicates > 0, "only one beat fired"
    report(capsys, Figures(**{**figures.__dict__, "notes": {"sweeps": slots, "duplicate_sweeps": duplicates}}))


def test_slow_throttled_refreshes_with_three_workers(
    run_for: Any, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #12 as reported: refreshes that take Pangea 7.5 s, 70 % of them throttled, three workers.

    Before the hold covered the whole time a refresh can be in flight, other workers took rows whose
    refresh was still queued or in flight and presented the same refresh token again.
    """
    env = {
        "SESSION_SYNC_LEASE": "20s",
        "SESSION_SYNC_HTTP_TIMEOUT": "3",
        "SESSION_SYNC_HTTP_RETRIES": "3",
        "SESSION_SYNC_REFRESH_MARGIN": "8s",
        "SESSION_SYNC_CHECK_INTERVAL": "10s",
        "SESSION_SYNC_SWEEP_PERIOD": "2s",
        "SESSION_SYNC_BATCH_SIZE": "500",
    }
    run = run_for("slow_throttled_refresh", env=env, ttl=lambda i: 15.0 + (i % 11))
    # Given three workers of two processes each, and one beat
    run.start_worker("w1", "-B", "--pool=prefork", "--concurrency=2")
    run.start_worker("w2", "--pool=prefork", "--concurrency=2")
    run.start_worker("w3", "--pool=prefork", "--concurrency=2")
    run.wait_calm()
    # When Pangea answers refreshes after 7.5 s, and throttles 70 % of them with Retry-After: 5
    emu.admin.faults(
        latency_ms=7500, error="TooManyRequests", error_rate=0.7, retry_after=5, paths=["/v2/client/session/refresh"]
    )
    run.world.doom()
    run.world.leave()
    time.sleep(30)
    emu.admin.clear_faults()
    healed = datetime.now(UTC)
    # Then no refresh token was presented twice, and the audit trail says only what was done
    refreshed = run.count(S.rotated_at.is_not(None))
    report(capsys, run.judge(healed, refreshed=refreshed))
    assert refreshed > 0, "no session was refreshed: the scenario proved nothing"
