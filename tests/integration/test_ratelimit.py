"""The outbound rate limit: one bucket per Pangea project, shared through Redis or the database by every worker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from worker import ratelimit


async def take(limiter: ratelimit.RateLimiter, n: int) -> None:
    for _ in range(n):
        await limiter.acquire()


async def test_local_bucket_holds_the_rate() -> None:
    limiter = ratelimit.LocalRateLimiter(20, burst=1)
    started = time.monotonic()
    await asyncio.gather(*(take(limiter, 10) for _ in range(3)))
    assert time.monotonic() - started >= 29 / 20 * 0.95


@pytest.mark.redis
async def test_workers_share_one_bucket_in_redis(redis_url: str) -> None:
    # Given three "workers", each with its own limiter, on the same project
    limiters = [
        ratelimit.RedisRateLimiter(redis_url, project="https://authn.example|pts_x", rate=20, burst=1) for _ in range(3)
    ]
    # When together they send 30 requests
    started = time.monotonic()
    await asyncio.gather(*(take(limiter, 10) for limiter in limiters))
    elapsed = time.monotonic() - started
    # Then the 30 went out at 20 per second overall, not 20 per second each
    assert elapsed >= 29 / 20 * 0.9
    for limiter in limiters:
        await limiter.aclose()


@pytest.mark.redis
async def test_projects_have_separate_buckets_and_keys_hide_the_token(redis_url: str) -> None:
    import redis

    a = ratelimit.RedisRateLimiter(redis_url, project="https://authn.a|pts_secret", rate=1, burst=1)
    b = ratelimit.RedisRateLimiter(redis_url, project="https://authn.b|pts_secret", rate=1, burst=1)
    started = time.monotonic()
    await a.acquire()
    await b.acquire()
    assert time.monotonic() - started < 0.5
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert len(keys) == 2 and not any(b"secret" in k for k in keys)
    await a.aclose()
    await b.aclose()


async def burst(
    limiter: ratelimit.RedisRateLimiter | ratelimit.DatabaseRateLimiter, caplog: pytest.LogCaptureFixture
) -> float:
    """Seconds 15 tokens take from ``limiter`` (closed after), its warnings captured."""
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
            for _ in range(15):
                await limiter.acquire()
        return time.monotonic() - started
    finally:
        await limiter.aclose()


async def test_without_redis_each_process_limits_itself_instead_of_failing(caplog: pytest.LogCaptureFixture) -> None:
    # Given the shared bucket's Redis is gone (nothing listens on its port)
    limiter = ratelimit.RedisRateLimiter(
        f"redis://127.0.0.1:{free_port()}/0", project="https://authn.example|pts_x", rate=20, burst=5
    )
    # When a burst of requests asks for tokens
    took = await burst(limiter, caplog)
    # Then they are granted at the configured rate by a local bucket (5 at once, then 20 per second)
    assert 0.4 <= took < 3
    # ... and the outage is logged once, not per request
    outages = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(outages) == 1


# --- the database store: one row per project, taken a grant at a time ------------------------------


async def test_limiters_share_one_bucket_in_the_database(db_url: str) -> None:
    # Given three "workers", each with its own limiter on the same database and project (SQLite and PostgreSQL)
    limiters = [
        ratelimit.DatabaseRateLimiter(db_url, project="https://authn.example|pts_x", rate=50, burst=5) for _ in range(3)
    ]
    try:
        # When together they send 120 requests, each from many concurrent callers as the engine does
        started = time.monotonic()
        await asyncio.gather(*(take(limiter, 10) for limiter in limiters for _ in range(4)))
        elapsed = time.monotonic() - started
    finally:
        for limiter in limiters:
            await limiter.aclose()
    # Then the 120 went out at 50 per second overall (5 at once, then the rate), not 50 per second each
    assert elapsed >= (120 - 5) / 50 * 0.9
    # ... and the database paid for grants, not for requests: at most one write per 2 requests here
    writes = sum(limiter.grants for limiter in limiters)
    assert writes <= 60, writes


async def test_the_database_bucket_is_one_row_per_project_that_hides_the_token(db_url: str) -> None:
    import sqlalchemy as sa

    from worker import db

    a = ratelimit.DatabaseRateLimiter(db_url, project="https://authn.a|pts_secret", rate=1, burst=1)
    b = ratelimit.DatabaseRateLimiter(db_url, project="https://authn.b|pts_secret", rate=1, burst=1)
    try:
        started = time.monotonic()
        await a.acquire()
        await b.acquire()
        assert time.monotonic() - started < 0.5  # two projects: two buckets, neither waits for the other
    finally:
        await a.aclose()
        await b.aclose()
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT bucket, tokens FROM rate_limit_buckets")).all()
    finally:
        engine.dispose()
    assert len(rows) == 2 and not any("secret" in bucket for bucket, _ in rows)
    assert all(tokens <= 0 for _, tokens in rows)  # each bucket's one token was taken


async def test_a_busy_process_writes_a_few_times_a_second_not_once_per_request(pg_url: str) -> None:
    # Given one process sending as fast as a 200/s limit allows, one caller after another
    limiter = ratelimit.DatabaseRateLimiter(pg_url, project="https://authn.example|pts_x", rate=200)
    try:
        started = time.monotonic()
        await take(limiter, 600)  # a full bucket (200), then the rate
        before, at = limiter.grants, time.monotonic()
        await take(limiter, 400)
        done = time.monotonic()
    finally:
        await limiter.aclose()
    # Then it holds the rate: a full bucket at once, then 200 per second
    assert done - started >= (1000 - 200) / 200 * 0.95
    # ... taking grants of up to 20 tokens (a tenth of a second of the rate): ~10 writes a second, not 200
    writes_per_second = (limiter.grants - before) / (done - at)
    print(f"database store: {writes_per_second:.1f} writes/s for {400 / (done - at):.0f} requests/s")
    assert writes_per_second <= 15, writes_per_second


async def test_a_process_using_a_small_share_of_the_rate_writes_about_twice_a_second(pg_url: str) -> None:
    # Given one process sending about 400 requests a second, far below its project's 10,000/s limit
    limiter = ratelimit.DatabaseRateLimiter(pg_url, project="https://authn.example|pts_x", rate=10_000)
    try:
        await take(limiter, 200)  # its pace is known from here on
        before, at = limiter.grants, time.monotonic()
        while time.monotonic() - at < 3:
            await take(limiter, 4)
            await asyncio.sleep(0.01)
        done = time.monotonic()
    finally:
        await limiter.aclose()
    # Then each grant covers about half a second of its own pace: a few writes a second, not ten
    writes_per_second = (limiter.grants - before) / (done - at)
    print(f"database store: {writes_per_second:.1f} writes/s far below the rate")
    assert writes_per_second <= 4, writes_per_second


@pytest.mark.parametrize("failure", ["unreachable", "not migrated"])
async def test_when_the_database_store_fails_each_process_limits_itself(
    failure: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the bucket's database is gone (nothing listens on its port), or has no rate_limit_buckets table
    if failure == "unreachable":
        url = f"postgresql://nobody@127.0.0.1:{free_port()}/gone"
    else:
        url = f"sqlite:///{tmp_path}/empty.db"
    limiter = ratelimit.DatabaseRateLimiter(url, project="https://authn.example|pts_x", rate=20, burst=5)
    # When a burst of requests asks for tokens
    took = await burst(limiter, caplog)
    # Then they are granted at the configured rate by a local bucket (5 at once, then 20 per second)
    assert 0.4 <= took < 3
    # ... and the outage is logged once, not per request
    outages = [r for r in caplog.records if "database store failed" in r.getMessage()]
    assert len(outages) == 1


async def test_the_database_store_keeps_the_urls_own_options(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    import sqlalchemy as sa

    from worker import db

    # Given session-sync's tables in a schema of their own, found through the URL's search_path
    engine = db.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA ours"))
            conn.execute(sa.text("ALTER TABLE rate_limit_buckets SET SCHEMA ours"))
    finally:
        engine.dispose()
    url = sa.make_url(pg_url).update_query_dict({"options": "-csearch_path=ours"}).render_as_string(False)
    limiter = ratelimit.DatabaseRateLimiter(url, project="https://authn.example|pts_x", rate=10)
    # When it takes a token
    try:
        with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
            await limiter.acquire()
    finally:
        await limiter.aclose()
    # Then it came from the table in that schema (its own timeouts did not replace the search_path)
    assert limiter.grants == 1 and not caplog.records


class StallingProxy:
    """A TCP proxy to PostgreSQL that can go silent: bytes are held, not forwarded, as on a dead network path."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.stalled = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        # Every connection is closed, so nothing waits on a proxy that is gone (an executor thread would).
        self.stalled.clear()

        def close_all() -> None:
            for writer in self._writers:
                writer.close()
            self._loop.call_later(0.2, self._loop.stop)

        self._loop.call_soon_threadsafe(close_all)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:  # nothing left for the garbage collector: tasks cancelled and awaited, the loop closed
            server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.upstream)
        self._writers += [client_w, up_w]

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                while self.stalled.is_set():
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(pump(client_r, up_w), pump(up_r, client_w), return_exceptions=True)


async def test_a_database_gone_silent_sends_the_process_to_its_local_bucket(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlalchemy as sa

    # Given a limiter whose database is reached through a network path that works, at first
    target = sa.make_url(pg_url)
    with StallingProxy((target.host or "127.0.0.1", target.port or 5432)) as proxy:
        url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        limiter = ratelimit.DatabaseRateLimiter(url, project="https://authn.example|pts_x", rate=20, burst=5)
        try:
            await limiter.acquire()
            assert limiter.grants == 1
            # When the path goes silent (no reset, no answer: no server-side timeout can fire)
            proxy.stalled.set()
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
                for _ in range(20):
                    await limiter.acquire()
            took = time.monotonic() - started
            proxy.stalled.clear()
        finally:
            await limiter.aclose()
    # Then the requests still went out, from a local bucket, after one bounded wait for the database
    assert took < 2 * ratelimit.DATABASE_TIMEOUT + 3, took
    assert [r.getMessage() for r in caplog.records if "database store failed" in r.getMessage()] == [
        "Rate limit: database store failed (TimeoutError); limiting this process on its own meanwhile"
    ]
