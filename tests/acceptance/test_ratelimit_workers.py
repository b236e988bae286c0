"""One rate limit across real workers on RabbitMQ, with no Redis: the database holds the shared bucket.

Two ``celery -A worker worker`` processes (two pool processes each) on RabbitMQ and one PostgreSQL
database, no rate-limit store configured: the default on PostgreSQL is the database. A ``resync --all``
fans out over all four pool processes; the requests Pangea (the emulator) receives stay within the
one configured rate, where four local buckets would send four times as many. Then the same with the
bucket's table locked away from the workers: each process limits itself, logs it, and the work is done.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.acceptance import harness
from tests.conftest import RunningEmulator, require
from tests.helpers import KEY, login_many, requests, settings_for
from worker import ratelimit, runtime

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
CHECK = "/v2/client/token/check"
RATE = 20
SESSIONS = 160


def _rabbitmq_available() -> bool:
    from kombu.connection import Connection

    try:
        with Connection(RABBITMQ, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:
        return False


def env_for(pg_url: str, emu: RunningEmulator) -> dict[str, str]:
    return {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": RABBITMQ,
        "SESSION_SYNC_QUEUE": f"ratelimit_{uuid.uuid4().hex[:8]}",  # this test's own queue on the shared broker
        "PANGEA_BASE_URL": emu.base_url,
        "PANGEA_AUTHN_TOKEN": emu.service_token,
        "SESSION_SYNC_ENCRYPTION_KEYS": KEY,
        "SESSION_SYNC_RATE_LIMIT": str(RATE),
        "SESSION_SYNC_REVALIDATION": "per_token",  # one request per session: the count is the rate
        "SESSION_SYNC_BATCH_SIZE": "20",
        "SESSION_SYNC_METRICS_PORT": "0",
    }


@contextmanager
def two_workers(env: dict[str, str], workdir: Path) -> Iterator[list[harness.WorkerProcess]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(harness.running_worker(env, workdir, "--concurrency=2", name=f"w{i}")) for i in range(2)
        ]


def sample_requests(emu: RunningEmulator, until: int, timeout: float) -> list[tuple[float, int]]:
    """(seconds, token checks Pangea answered so far), every 0.1 s, until ``until`` checks or the timeout."""
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        samples.append((time.monotonic(), requests(emu, CHECK)))
        if samples[-1][1] >= until:
            break
        time.sleep(0.1)
    return samples


@pytest.fixture
def logged_in(pg_url: str, emu: RunningEmulator) -> str:
    require(_rabbitmq_available(), f"RabbitMQ not reachable at {RABBITMQ}")
    rt = runtime.Runtime(settings_for(pg_url, emu))
    try:
        login_many(rt, emu, [f"user{i}@example.com" for i in range(SESSIONS)])
    finally:
        rt.close()
    return pg_url


def test_workers_on_rabbitmq_share_one_rate_through_the_database(
    logged_in: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    env = env_for(logged_in, emu)
    # Given two workers (four pool processes) on RabbitMQ and PostgreSQL, no Redis, no store configured
    with two_workers(env, tmp_path) as workers:
        assert harness.run_cli(env, tmp_path, "check").stdout.count("shared in the database") == 1
        before = requests(emu, CHECK)
        # When every session is resynced, in batches spread over all of them
        sent_at = time.monotonic()
        sent = harness.run_cli(env, tmp_path, "resync", "--all")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        samples = sample_requests(emu, before + SESSIONS, timeout=60)
        outputs = [w.output() for w in workers]
    # Then both workers took batches ...
    assert all("session_sync.resync_batch" in out and "succeeded" in out for out in outputs)
    # ... and Pangea saw the one configured rate: at most a full bucket at once, then RATE per second
    # (the first request came after the last sample that saw none: on a loaded machine the samples
    # are further apart than the 0.1 s they sleep; and none came before the resync was sent, the only
    # bound left when the workers were already busy before the command returned)
    start = max((t for t, n in samples if n <= before), default=sent_at)
    done = samples[-1]
    assert done[1] - before == SESSIONS, samples[-5:]
    # (each of the four processes may hold one grant taken ahead: ratelimit.grant_size of the rate)
    ahead = 4 * ratelimit.grant_size(RATE)
    for t, n in samples:
        assert n - before <= RATE + RATE * (t - start) + ahead + 2, (t - start, n - before)
    took = done[0] - start  # the first request came after start
    print(f"{SESSIONS} checks from 4 processes in {took:.1f} s: {SESSIONS / took:.1f}/s (limit {RATE}/s)")
    assert took >= (SESSIONS - RATE) / RATE * 0.9


def test_when_the_database_store_fails_each_worker_limits_itself_and_says_so(
    logged_in: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    env = env_for(logged_in, emu)
    engine = sa.create_engine(logged_in)
    try:
        with two_workers(env, tmp_path) as workers:
            # Given the bucket's table locked away from the workers (the sessions stay usable)
            with engine.begin() as conn:
                conn.execute(sa.text("LOCK TABLE rate_limit_buckets IN ACCESS EXCLUSIVE MODE"))
                before = requests(emu, CHECK)
                # When every session is resynced
                sent = harness.run_cli(env, tmp_path, "resync", "--all")
                assert sent.returncode == 0, sent.stdout + sent.stderr
                samples = sample_requests(emu, before + SESSIONS, timeout=60)
                outputs = [w.output() for w in workers]
    finally:
        engine.dispose()
    # Then every check still went out, each process on its own bucket (faster than the one shared rate)
    assert samples[-1][1] - before == SESSIONS, samples[-5:]
    # ... and each worker said so, once a minute at most, not once per request
    said = sum(out.count("Rate limit: database store failed") for out in outputs)
    assert 1 <= said <= 4, said
