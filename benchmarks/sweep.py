"""One benchmark run: seed N sessions, run one full sweep in this process, print what it cost as JSON.

    python -m benchmarks.sweep --sessions 10000 --path bulk
    python -m benchmarks.sweep --sessions 1000 --path baseline

Paths: ``bulk`` (``/v2/session/list`` per batch, service token), ``per_token``
(``/v2/client/token/check`` per session, client token), ``refresh`` (every session inside its refresh
margin: ``/v2/client/session/refresh`` per session) and ``baseline`` (what a user writes by hand: the
official ``pangea-sdk``'s ``token_endpoints.check`` per session and one UPDATE + COMMIT per row).

The database (a fresh PostgreSQL database, migrated, filled by COPY) is prepared in a child process and
the emulator runs in its own process, so this process's CPU time and peak RSS are the sweep's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from benchmarks import seed
from worker import crypto, emulator

#: PostgreSQL server whose databases the benchmark creates and drops.
DEFAULT_PG = os.environ.get("SESSION_SYNC_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PATHS = ("bulk", "per_token", "refresh", "baseline")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """One run's parameters (the command line)."""

    sessions: int
    path: str
    latency_ms: int
    batch_size: int
    concurrency: int
    batches_in_flight: int
    pg: str
    port: int
    keep: bool


def parse(argv: list[str] | None = None) -> Options:
    """Options from the command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=10_000, help="N sessions to seed and sweep")
    p.add_argument("--path", choices=PATHS, default="bulk")
    p.add_argument("--latency-ms", type=int, default=50, help="emulator latency per request")
    p.add_argument("--batch-size", type=int, default=1000, help="SESSION_SYNC_BATCH_SIZE")
    p.add_argument("--concurrency", type=int, default=128, help="SESSION_SYNC_CONCURRENCY")
    p.add_argument("--batches-in-flight", type=int, default=3, help="SESSION_SYNC_BATCHES_IN_FLIGHT")
    p.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL admin URL (databases are created on its server)")
    p.add_argument("--port", type=int, default=0, help="emulator port (0: a free one)")
    p.add_argument("--keep", action="store_true", help="keep the database afterwards")
    a = p.parse_args(argv)
    return Options(
        sessions=a.sessions,
        path=a.path,
        latency_ms=a.latency_ms,
        batch_size=a.batch_size,
        concurrency=a.concurrency,
        batches_in_flight=a.batches_in_flight,
        pg=a.pg,
        port=a.port,
        keep=a.keep,
    )


# --- the processes around the measured one ----------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_emulator(port: int) -> Iterator[tuple[str, int]]:
    """The emulator in its own process (``session-sync emulator``): its base URL and pid."""
    port = port or _free_port()
    code = "from worker.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "emulator", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/emulator/stats", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the emulator did not start")
            time.sleep(0.1)
        yield base_url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def postgres_cpu_seconds() -> float:
    """CPU seconds of every ``postgres`` process on this machine (server on the same host)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
            if "(postgres)" in raw:
                total += cpu_seconds(int(entry))
    return total


def _prepare(pg: str, name: str, keys: list[str], plan: seed.Plan, out: Any) -> None:
    url = seed.create_database(pg, name)
    out.send({"url": url, "seconds": seed.seed_database(url, keys, plan)})


def prepare_database(pg: str, name: str, keys: list[str], plan: seed.Plan) -> tuple[str, float]:
    """Create, migrate and fill the database in a child process (its memory is not ours); URL, seconds."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_prepare, args=(pg, name, keys, plan, send))
    child.start()
    result = receive.recv()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError("seeding the database failed")
    return str(result["url"]), float(result["seconds"])


# --- measuring --------------------------------------------------------------------------------------


class StatementCounter:
    """Counts SQL statements sent to the database (an executemany counts as one), by kind."""

    def __init__(self, engine: sa.Engine) -> None:
        self.kinds: Counter[str] = Counter()
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        words = statement.split(None, 3)
        kind = " ".join(words[:3]) if words and words[0] in ("INSERT", "DELETE") else " ".join(words[:2])
        if "SKIP LOCKED" in statement:
            kind = "UPDATE sessions (claim)"
        self.kinds[kind] += 1

    @property
    def total(self) -> int:
        """Every statement counted."""
        return sum(self.kinds.values())


def settings_env(o: Options, db_url: str, base_url: str, key: str) -> dict[str, str]:
    """The worker's settings for this run, as environment variables (printed with the result)."""
    token = emulator.DEFAULT_CLIENT_TOKEN if o.path == "per_token" else emulator.DEFAULT_SERVICE_TOKEN
    return {
        "DATABASE_URL": db_url,
        "PANGEA_BASE_URL": base_url,
        "PANGEA_AUTHN_TOKEN": token,
        "SESSION_SYNC_ENCRYPTION_KEYS": key,
        "SESSION_SYNC_REVALIDATION": "per_token" if o.path == "per_token" else "auto",
        "SESSION_SYNC_BATCH_SIZE": str(o.batch_size),
        "SESSION_SYNC_CONCURRENCY": str(o.concurrency),
        "SESSION_SYNC_BATCHES_IN_FLIGHT": str(o.batches_in_flight),
        "SESSION_SYNC_RATE_LIMIT": "1000000",
        "SESSION_SYNC_MAX_UNVERIFIED": "1d",
        "CELERY_BROKER_URL": "memory://",
        "SESSION_SYNC_METRICS_PORT": "0",
    }


def sweep_with_engine(env: dict[str, str]) -> dict[str, Any]:
    """One full sweep by ``SyncEngine.drain()`` on a runtime built from explicit settings."""
    from worker import runtime
    from worker.settings import Settings

    rt = runtime.Runtime(Settings.from_env(env))
    counter = StatementCounter(rt.db_engine)
    try:
        rt.engine  # noqa: B018 (build the resources before the clock starts)
        started = time.perf_counter()
        counts = rt.run(rt.engine.drain())
        wall = time.perf_counter() - started
    finally:
        rt.close()
    return {"wall": wall, "counts": counts.as_dict(), "statements": dict(counter.kinds), "total": counter.total}


def sweep_by_hand(db_url: str, base_url: str, key: str) -> dict[str, Any]:
    """The baseline: the official SDK's token check per session, one UPDATE and COMMIT per row."""
    from pangea.config import PangeaConfig
    from pangea.exceptions import PangeaAPIException
    from pangea.services import AuthN

    from worker import db as dbmod

    authn = AuthN(emulator.DEFAULT_SERVICE_TOKEN, config=PangeaConfig(base_url_template=base_url))
    cipher = crypto.TokenCipher([key])
    engine = dbmod.create_engine(db_url)
    counter = StatementCounter(engine)
    kept = revoked = 0
    started = time.perf_counter()
    with engine.connect() as conn:
        due = conn.execute(
            sa.text(
                "SELECT id, active_token_enc FROM sessions WHERE state = 'active' AND next_check_at <= now()"
                " ORDER BY next_check_at"
            )
        ).all()
        conn.commit()
        for session_id, token_enc in due:
            now = datetime.now(UTC)
            try:
                result = authn.client.token_endpoints.check(cipher.decrypt(token_enc)).result
                assert result is not None
                conn.execute(
                    sa.text(
                        "UPDATE sessions SET last_checked_at = :now, next_check_at = :next, updated_at = :now,"
                        " active_expires_at = :expire, version = version + 1 WHERE id = :id"
                    ),
                    {"now": now, "next": now + timedelta(minutes=5), "expire": result.expire, "id": session_id},
                )
                kept += 1
            except PangeaAPIException as exc:
                if exc.response.status != "InvalidToken":
                    raise
                conn.execute(
                    sa.text(
                        "UPDATE sessions SET state = 'revoked', end_reason = 'invalid_token', ended_at = :now,"
                        " version = version + 1 WHERE id = :id"
                    ),
                    {"now": now, "id": session_id},
                )
                revoked += 1
            conn.commit()
    wall = time.perf_counter() - started
    engine.dispose()
    counts = {"checked": kept + revoked, "kept": kept, "revoked": revoked}
    return {"wall": wall, "counts": counts, "statements": dict(counter.kinds), "total": counter.total}


def run(o: Options) -> dict[str, Any]:
    """Seed, sweep once, measure; the result as a JSON-ready dict."""
    key = crypto.generate_key()
    name = f"ssbench_{o.path}_{o.sessions}_{secrets.token_hex(3)}"
    left = timedelta(minutes=1) if o.path == "refresh" else timedelta(minutes=50)
    plan = seed.Plan(count=o.sessions, active_left=left)
    db_url, db_seconds = prepare_database(o.pg, name, [key], plan)
    try:
        with running_emulator(o.port) as (base_url, emu_pid):
            admin = emulator.EmulatorAdmin(base_url, timeout=300)
            emu_seconds = seed.seed_emulator(admin, plan)
            admin.faults(latency_ms=o.latency_ms)
            env = settings_env(o, db_url, base_url, key)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            usage0, emu0, pg0 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(emu_pid), postgres_cpu_seconds()
            measured = sweep_by_hand(db_url, base_url, key) if o.path == "baseline" else sweep_with_engine(env)
            usage1, emu1, pg1 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(emu_pid), postgres_cpu_seconds()
            stats = admin.stats()["requests"]
            admin.close()
    finally:
        if not o.keep:
            seed.drop_database(o.pg, name)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    wall = measured["wall"]
    batches = max(1, -(-o.sessions // o.batch_size))
    requests = {path: sum(codes.values()) for path, codes in stats.items()}
    return {
        "path": o.path,
        "sessions": o.sessions,
        "wall_s": round(wall, 3),
        "sessions_per_s": round(o.sessions / wall, 1),
        "worker_cpu_s": round(cpu, 3),
        "worker_cpu_s_per_1000": round(cpu / o.sessions * 1000, 4),
        "peak_rss_mb": round(usage1.ru_maxrss / 1024, 1),
        "rss_before_sweep_mb": round(rss_before / 1024, 1),
        "sql_statements": measured["total"],
        "sql_statements_per_batch": round(measured["total"] / batches, 2) if o.path != "baseline" else None,
        "sql_statements_per_session": round(measured["total"] / o.sessions, 3),
        "sql_by_kind": measured["statements"],
        "emulator_cpu_s": round(emu1 - emu0, 3),
        "postgres_cpu_s": round(pg1 - pg0, 3),
        "pangea_requests": requests,
        "counts": measured["counts"],
        "seed_db_s": round(db_seconds, 1),
        "seed_emulator_s": round(emu_seconds, 1),
        "settings": {k: v for k, v in env.items() if k.startswith("SESSION_SYNC_") and "KEYS" not in k},
        "latency_ms": o.latency_ms,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    """Run once and print the result as one JSON object."""
    print(json.dumps(run(parse(argv))), flush=True)


if __name__ == "__main__":
    main()
