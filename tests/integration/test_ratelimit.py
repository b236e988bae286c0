"""The outbound rate limit: one bucket per Pangea project, shared through Redis by every worker."""

from __future__ import annotations

import asyncio
import logging
import time

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


async def test_without_redis_each_process_limits_itself_instead_of_failing(caplog: pytest.LogCaptureFixture) -> None:
    # Given the shared bucket's Redis is gone (nothing listens on its port)
    limiter = ratelimit.RedisRateLimiter(
        f"redis://127.0.0.1:{free_port()}/0", project="https://authn.example|pts_x", rate=20, burst=5
    )
    try:
        # When a burst of requests asks for tokens
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
            for _ in range(15):
                await limiter.acquire()
        took = time.monotonic() - started
    finally:
        await limiter.aclose()
    # Then they are granted at the configured rate by a local bucket (5 at once, then 20 per second)
    assert 0.4 <= took < 3
    # ... and the outage is logged once, not per request
    outages = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(outages) == 1
