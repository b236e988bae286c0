"""What a scrape of ``/metrics`` costs the database, with three workers serving it.

Each worker here is what a worker's ``/metrics`` server holds (a registry with its own
:class:`~worker.exporter.StatusCollector`), on one PostgreSQL database and one Redis broker, the way
three worker processes share them. Statements are counted with SQLAlchemy's ``before_cursor_execute``
event on every engine of this process. The clock the cache keeps time with is a seam: no test sleeps.
The figures are in ``docs/benchmarks.md`` ("Scrape cost"); ``-s`` prints them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import prometheus_client
import pytest
import redis
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from tests.conftest import RunningEmulator, free_port
from tests.helpers import login, settings_for
from worker import exporter, runtime
from worker.settings import Settings

pytestmark = pytest.mark.timeout(60)

WORKERS = 3
#: Workers' /metrics: each a registry and the collector (with its own cache) it holds.
Fleet = list[tuple[CollectorRegistry, exporter.StatusCollector]]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process sends while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def fleet(settings: Settings, clock: Clock, n: int = WORKERS) -> Fleet:
    """``n`` workers' /metrics: each its own registry and collector (its own cache), as in its own process."""
    out = []
    for _ in range(n):
        collector = exporter.StatusCollector(settings, clock=clock)
        registry = CollectorRegistry()
        registry.register(collector)
        out.append((registry, collector))
    return out


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """One scrape's samples, by name and labels."""
    body = prometheus_client.generate_latest(registry).decode()
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def scrape_round(
    workers: Fleet,
) -> tuple[int, list[dict[str, float]]]:
    """Prometheus scraping every worker once: the statements it cost, and what each answered."""
    with statements() as seen:
        answers = [scrape(registry) for registry, _ in workers]
    return len(seen), answers


ACTIVE = "session_sync_sessions[('state', 'active')]"
UP = "session_sync_database_up[]"


def only_numbers(value: Any) -> bool:
    """True if ``value`` holds nothing but numbers (and the names of states), so no token, id or email."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and k.isidentifier() and only_numbers(v) for k, v in value.items())
    return isinstance(value, int | float)


@dataclass
class Three:
    """Two logged-in sessions on PostgreSQL; fleets of three workers on it and Redis; the clock they share."""

    pg_url: str
    redis_url: str
    emu: RunningEmulator
    rt: runtime.Runtime
    clock: Clock

    def make(self, **extra: str) -> Fleet:
        return fleet(settings_for(self.pg_url, self.emu, CELERY_BROKER_URL=self.redis_url, **extra), self.clock)

    def expire(self, workers: Fleet, seconds: float) -> None:
        """Let ``seconds`` pass: here on the clock, and in Redis (which drops the key at its PX)."""
        self.clock.now += seconds
        redis.Redis.from_url(self.redis_url).delete(workers[0][1].cache.key)


@pytest.fixture
def three(pg_url: str, redis_url: str, emu: RunningEmulator) -> Iterator[Three]:
    rt = runtime.Runtime(settings_for(pg_url, emu))
    for i in range(2):
        login(rt, emu, f"scrape{i}@example.com")
    try:
        yield Three(pg_url, redis_url, emu, rt, Clock())
    finally:
        rt.close()


def test_three_workers_cost_the_database_one_reading_per_scrape_round(three: Three) -> None:
    # Given three workers reading on every scrape, as before the cache (SESSION_SYNC_METRICS_CACHE=0)
    before, _ = scrape_round(three.make(SESSION_SYNC_METRICS_CACHE="0"))
    per_reading = before // WORKERS

    # When three workers with the default cache (15 s, shared through Redis) are scraped, round after round
    cached = three.make()
    first, answers = scrape_round(cached)
    again, _ = scrape_round(cached)
    three.expire(cached, 15.1)
    later, later_answers = scrape_round(cached)
    print(f"\nscrape cost, {WORKERS} workers: before {before} statements a round; after {first}, then {again}, {later}")

    # Then before, each worker read the database itself; now one reading serves the whole round
    assert before == WORKERS * per_reading and per_reading >= 5
    assert first == per_reading
    assert again == 0
    assert later == per_reading
    # ... and every worker answers the same, true, gauges
    assert all(a[ACTIVE] == 2 and a[UP] == 1 for a in answers + later_answers)


def test_a_reading_is_at_most_the_cache_time_old(three: Three) -> None:
    workers = three.make(SESSION_SYNC_METRICS_CACHE="10s")
    shared = redis.Redis.from_url(three.redis_url)
    # Given a reading taken by the first worker: Redis keeps it for 10 s, and it holds counts only
    assert scrape_round(workers)[1][0][ACTIVE] == 2
    key = workers[0][1].cache.key
    assert 0 < shared.pttl(key) <= 10_000
    assert only_numbers(json.loads(shared.get(key) or b"null"))

    # When a third session logs in
    login(three.rt, three.emu, "scrape-late@example.com")

    # Then the workers show it once the reading has expired, not before
    assert {a[ACTIVE] for a in scrape_round(workers)[1]} == {2}
    three.expire(workers, 10.1)
    assert {a[ACTIVE] for a in scrape_round(workers)[1]} == {3}


def test_without_redis_each_worker_reads_for_itself_and_still_answers(pg_url: str, emu: RunningEmulator) -> None:
    # Given three workers whose Redis broker does not answer
    workers = fleet(settings_for(pg_url, emu, CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"), Clock())

    # When they are scraped twice within the cache time
    first, answers = scrape_round(workers)
    again, _ = scrape_round(workers)

    # Then each read the database once (no sharing), and served its gauges
    assert first > 0 and first % WORKERS == 0
    assert again == 0
    assert all(a[UP] == 1 for a in answers)


def test_an_unreadable_database_is_reported_and_retried_once_per_cache_time(
    emu: RunningEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker whose PostgreSQL does not answer
    clock = Clock()
    [(registry, _)] = fleet(settings_for(f"postgresql://nobody@127.0.0.1:{free_port()}/none", emu), clock, n=1)

    # When it is scraped three times, then again after the cache time
    with caplog.at_level(logging.WARNING, logger="worker.gauge_cache"):
        ups = [scrape(registry)[UP] for _ in range(3)]
        clock.now += 15.1
        ups.append(scrape(registry)[UP])

    # Then it says the database is down each time, and tried (and logged) once per cache time
    assert ups == [0, 0, 0, 0]
    logged = [r.getMessage() for r in caplog.records if r.name == "worker.gauge_cache"]
    assert logged == ["Metrics could not read the database: OperationalError"] * 2
