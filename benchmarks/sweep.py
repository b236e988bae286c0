"""One benchmark run: seed N sessions, run ``session-sync sweep --once`` as a process, print what it cost as JSON.

    python -m benchmarks.sweep --sessions 100000 --path bulk
    python -m benchmarks.sweep --sessions 100000 --path bulk --refreshing 0.01
    python -m benchmarks.sweep --sessions 1000 --path baseline
    python -m benchmarks.sweep --sessions 100000 --path bulk --profile /tmp/prof   # py-spy, both processes

Paths: ``bulk`` (``/v2/session/list`` per batch, service token), ``per_token``
(``/v2/client/token/check`` per session, client token, ``SESSION_SYNC_REVALIDATION=per_token``),
``refresh`` (the bulk settings with every session inside its refresh margin:
``/v2/client/session/refresh`` per session) and ``baseline`` (what a user writes by hand:
:mod:`benchmarks.baseline`, the official ``pangea-sdk`` per session and one ``UPDATE`` + ``COMMIT`` per row).
``--refreshing F`` puts the first F of the sessions inside their refresh margin (the rest are routine).

Every run starts its own PostgreSQL cluster (:mod:`benchmarks.pgcluster`) and its own emulator process,
seeds both with the same sessions and the same expiry times (a routine check finds nothing changed),
then measures the sweep process and only it:

- the WAL it caused: ``pg_current_wal_lsn()`` before and after (``pg_wal_lsn_diff``), right after a
  ``CHECKPOINT`` so the full-page images of the pages it touches first are counted every time;
- the rows it wrote: ``n_tup_ins + n_tup_upd + n_tup_del`` per table from ``pg_stat_user_tables``,
  read once the sweep's backends have exited (they flush their statistics as they go);
- its statements: ``pg_stat_statements`` (calls, rows and WAL bytes per statement);
- CPU seconds of the sweep process (``wait4`` rusage: it and its children), of the emulator and of
  every PostgreSQL process (``/proc/<pid>/stat``, exited backends through the postmaster's
  ``cutime``), and the sweep process's peak RSS (``ru_maxrss`` of ``wait4``, started through
  :mod:`benchmarks.launch` so that it is the sweep's own, not this process's);
- wall time of the whole process (start-up included) and of the sweep inside it (its ``sweep_runs`` row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from benchmarks import pgcluster, seed
from worker import crypto, emulator, forks
from worker.settings import Settings

PATHS = ("bulk", "per_token", "refresh", "baseline")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The statements the benchmark itself sends to read the statistics (left out of the sweep's).
#: Statements of the batches themselves (connection set-up, type lookups and the sweep record left out).
_PER_BATCH = re.compile(r"\b(sessions|session_events|logout_outbox)\b")
_OURS = ("pg_stat", "pg_current_wal_lsn", "pg_wal_lsn_diff", "CHECKPOINT", "pg_backend_pid")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """One run's parameters (the command line)."""

    sessions: int
    path: str
    refreshing: float
    latency_ms: int
    batch_size: int
    concurrency: int
    batches_in_flight: int
    processes: int | None
    port: int
    profile: str | None

    @property
    def refreshing_count(self) -> int:
        """How many sessions are seeded inside their refresh margin."""
        return self.sessions if self.path == "refresh" else round(self.sessions * self.refreshing)


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share from 0 to 1")
    return value


def parse(argv: list[str] | None = None) -> Options:
    """Options from the command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=10_000, help="N sessions to seed and sweep")
    p.add_argument("--path", choices=PATHS, default="bulk")
    p.add_argument("--refreshing", type=_share, default=0.0, help="share of sessions inside their refresh margin")
    p.add_argument("--latency-ms", type=int, default=50, help="emulator latency per request")
    p.add_argument("--batch-size", type=int, default=1000, help="SESSION_SYNC_BATCH_SIZE")
    p.add_argument("--concurrency", type=int, default=128, help="SESSION_SYNC_CONCURRENCY")
    p.add_argument(
        "--batches-in-flight",
        type=int,
        default=Settings.model_fields["batches_in_flight"].default,  # the product's own default
        help="SESSION_SYNC_BATCHES_IN_FLIGHT",
    )
    p.add_argument("--processes", type=int, help="sweep --once --processes (default: the product's own choice)")
    p.add_argument("--port", type=int, default=0, help="emulator port (0: a free one)")
    p.add_argument("--profile", metavar="DIR", help="py-spy the sweep and the emulator into DIR (slows them)")
    a = p.parse_args(argv)
    if a.sessions < 1:
        p.error("--sessions must be at least 1")
    return Options(
        sessions=a.sessions,
        path=a.path,
        refreshing=a.refreshing,
        latency_ms=a.latency_ms,
        batch_size=a.batch_size,
        concurrency=a.concurrency,
        batches_in_flight=a.batches_in_flight,
        processes=a.processes,
        port=a.port,
        profile=a.profile,
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
        deadline = time.monotonic() + 120  # a loaded machine starts Python slowly
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


# --- the database's share ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DbReading:
    """The WAL position and the rows written per table, at one moment."""

    lsn: str
    rows: dict[str, dict[str, int]]


def _quiet(conn: sa.Connection, database: str, timeout: float = 30) -> None:
    """Wait until no other backend is connected to ``database`` (theirs flush their statistics on exit)."""
    deadline = time.monotonic() + timeout
    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()")
    while conn.execute(query, {"db": database}).scalar_one() and time.monotonic() < deadline:
        time.sleep(0.05)


def read_db(url: str) -> DbReading:
    """WAL position and ``pg_stat_user_tables`` counts of the database at ``url``, once others are gone."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            _quiet(conn, str(engine.url.database))
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            rows = {
                name: {"ins": ins, "upd": upd, "hot_upd": hot, "del": dele}
                for name, ins, upd, hot, dele in conn.execute(
                    sa.text(
                        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables"
                        " ORDER BY relname"
                    )
                )
            }
            lsn = str(conn.execute(sa.text("SELECT pg_current_wal_lsn()")).scalar_one())
            conn.rollback()
    finally:
        engine.dispose()
    return DbReading(lsn=lsn, rows=rows)


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool, isolation_level="AUTOCOMMIT"
    )


def checkpoint_and_reset(admin_url: str) -> None:
    """A ``CHECKPOINT`` (every page the sweep touches first costs its full-page image, every run alike)."""
    engine = _admin(admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))
            conn.execute(sa.text("SELECT pg_stat_statements_reset()"))
    finally:
        engine.dispose()


def wal_bytes(admin_url: str, before: str, after: str) -> int:
    """Bytes of WAL between two positions."""
    engine = _admin(admin_url)
    try:
        with engine.connect() as conn:
            diff = conn.execute(sa.text("SELECT pg_wal_lsn_diff(:a, :b)"), {"a": after, "b": before}).scalar_one()
    finally:
        engine.dispose()
    return int(diff)


def statements(admin_url: str, database: str) -> list[dict[str, Any]]:
    """The sweep's statements from ``pg_stat_statements``: calls, rows and WAL bytes each, most WAL first."""
    engine = _admin(admin_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT s.query, s.calls, s.rows, s.wal_bytes, s.wal_fpi FROM pg_stat_statements s"
                    " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = :db"
                    " ORDER BY s.wal_bytes DESC, s.calls DESC"
                ),
                {"db": database},
            ).all()
    finally:
        engine.dispose()
    return [
        {"query": _short(q), "calls": int(c), "rows": int(r), "wal_bytes": int(w), "wal_fpi": int(f)}
        for q, c, r, w, f in found
        if not any(word in q for word in _OURS)
    ]


def _short(query: str) -> str:
    one = " ".join(query.split())
    return one if len(one) <= 160 else one[:157] + "..."


def rows_written(before: DbReading, after: DbReading) -> dict[str, int]:
    """Rows inserted + updated + deleted per table between two readings (tables that wrote none left out)."""
    out = {}
    for table, now in after.rows.items():
        then = before.rows.get(table, {"ins": 0, "upd": 0, "del": 0})
        written = sum(now[k] - then[k] for k in ("ins", "upd", "del"))
        if written:
            out[table] = written
    return out


# --- the measured process ---------------------------------------------------------------------------


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


def sweep_command(path: str, processes: int | None = None) -> list[str]:
    """``session-sync sweep --once --json`` (the installed script beside this interpreter), or the baseline."""
    if path == "baseline":
        return [sys.executable, "-m", "benchmarks.baseline"]
    args = ["sweep", "--once", "--json", *([f"--processes={processes}"] if processes else [])]
    script = os.path.join(os.path.dirname(sys.executable), "session-sync")
    if os.path.exists(script):
        return [script, *args]
    return [sys.executable, "-c", "from worker.cli import main; main()", *args]


@dataclass(frozen=True, slots=True)
class Measured:
    """What the sweep process printed, how long it ran, and its ``wait4`` rusage."""

    counts: dict[str, Any]
    wall: float
    cpu: float
    max_rss_kb: int


def run_sweep(command: list[str], env: dict[str, str], profile: str | None, emu_pid: int) -> Measured:
    """Run the sweep process to its end; with ``profile``, py-spy it and the emulator meanwhile."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if profile:
        if not os.path.exists(spy):
            raise SystemExit(f"--profile needs py-spy beside {sys.executable}: pip install py-spy")
        os.makedirs(profile, exist_ok=True)
        # --gil: only the thread holding the GIL is sampled, so threads waiting on a queue or a socket
        # (the database threads, the event loop in select) do not pass for CPU.
        record = [spy, "record", "--subprocesses", "--gil", "-r", "250", "-f", "raw"]
        command = [*record, "-o", f"{profile}/sweep.txt", "--", *command]
        emu_spy = subprocess.Popen(
            [*record, "-o", f"{profile}/emulator.txt", "--pid", str(emu_pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        # Through benchmarks.launch: forked from here, the sweep would count this process's memory
        # (the seeded sessions) in its peak RSS (see that module).
        rusage = os.path.join(tmp, "rusage.json")
        launched = [sys.executable, "-m", "benchmarks.launch", rusage, *command]
        started = time.perf_counter()
        proc = subprocess.run(launched, env={**os.environ, **env}, stdout=out, stderr=err, check=False)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        printed, said = out.read().decode(), err.read().decode(errors="replace")
        usage = json.loads(Path(rusage).read_text()) if os.path.exists(rusage) else {}
    if profile:
        emu_spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        emu_spy.wait(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{said[-4000:]}")
    # sweep --once --json prints one indented object (py-spy may print after it)
    counts, _ = json.JSONDecoder().raw_decode(printed[printed.index("{") :])
    return Measured(counts=counts, wall=wall, cpu=usage["utime"] + usage["stime"], max_rss_kb=int(usage["maxrss_kb"]))


def sweep_seconds(db_url: str) -> float | None:
    """How long the sweep itself ran (its ``sweep_runs`` row: claimed at the start, counts added at the end)."""
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT started_at, finished_at FROM sweep_runs ORDER BY slot DESC")).first()
    finally:
        engine.dispose()
    if row is None or row[1] is None:
        return None
    return float((row[1] - row[0]).total_seconds())


def run(o: Options) -> dict[str, Any]:
    """Seed, sweep once, measure; the result as a JSON-ready dict."""
    key = crypto.generate_key()
    name = "ssbench"
    left = timedelta(minutes=50)
    plan = seed.Plan(count=o.sessions, active_left=left, refreshing=o.refreshing_count)
    with pgcluster.private_cluster() as pg:
        db_url = seed.create_database(pg.url, name)
        db_seconds = seed.seed_database(db_url, [key], plan)
        with running_emulator(o.port) as (base_url, emu_pid):
            admin = emulator.EmulatorAdmin(base_url, timeout=300)
            emu_seconds = seed.seed_emulator(admin, plan)
            admin.faults(latency_ms=o.latency_ms)
            env = settings_env(o, db_url, base_url, key)
            checkpoint_and_reset(pg.url)
            before = read_db(db_url)
            emu0, pg0 = cpu_seconds(emu_pid), pg.cpu_seconds()
            measured = run_sweep(sweep_command(o.path, o.processes), env, o.profile, emu_pid)
            after = read_db(db_url)
            emu1, pg1 = cpu_seconds(emu_pid), pg.cpu_seconds()
            stats = admin.stats()["requests"]
            admin.close()
        wal = wal_bytes(pg.url, before.lsn, after.lsn)
        sql = statements(pg.url, name)
        inner = sweep_seconds(db_url) if o.path != "baseline" else None
        settings = pg.settings
    return _result(o, plan, measured, inner, wal, rows_written(before, after), sql, stats, env, settings) | {
        "emulator_cpu_s": round(emu1 - emu0, 3),
        "postgres_cpu_s": round(pg1 - pg0, 3),
        "seed_db_s": round(db_seconds, 1),
        "seed_emulator_s": round(emu_seconds, 1),
    }


def _result(
    o: Options,
    plan: seed.Plan,
    m: Measured,
    inner: float | None,
    wal: int,
    rows: dict[str, int],
    sql: list[dict[str, Any]],
    stats: dict[str, dict[str, int]],
    env: dict[str, str],
    server: dict[str, str],
) -> dict[str, Any]:
    checked = int(m.counts.get("checked", 0)) or o.sessions
    batches = max(1, -(-o.sessions // o.batch_size))
    calls = sum(s["calls"] for s in sql)
    per_batch = sum(s["calls"] for s in sql if _PER_BATCH.search(s["query"]))
    written = sum(rows.values())
    return {
        "path": o.path,
        "sessions": o.sessions,
        "refreshing": plan.refreshing,
        "wall_s": round(m.wall, 3),
        "sweep_s": round(inner, 3) if inner is not None else None,
        "sessions_per_s": round(o.sessions / m.wall, 1),
        "sessions_per_s_in_sweep": round(o.sessions / inner, 1) if inner else None,
        "worker_cpu_s": round(m.cpu, 3),
        "worker_cpu_us_per_session": round(m.cpu / o.sessions * 1e6, 1),
        "peak_rss_mb": round(m.max_rss_kb / 1024, 1),  # of the largest of the sweep's processes
        "sweep_processes": None
        if o.path == "baseline"
        else o.processes or forks.default_processes(Settings.from_env(env)),
        "wal_bytes": wal,
        "wal_bytes_per_check": round(wal / checked, 2),
        "rows_written": rows,
        "rows_per_check": round(written / checked, 4),
        "sql_statements": calls,
        "sql_statements_per_batch": round(per_batch / batches, 2) if o.path != "baseline" else None,
        "sql_by_statement": sql[:12],
        "pangea_requests": {path: sum(codes.values()) for path, codes in stats.items()},
        "counts": m.counts,
        "settings": {k: v for k, v in env.items() if k.startswith("SESSION_SYNC_") and "KEYS" not in k},
        "postgres_settings": {k: v for k, v in server.items() if k not in ("port", "unix_socket_directories")},
        "latency_ms": o.latency_ms,
        "profiled": bool(o.profile),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    """Run once and print the result as one JSON object."""
    print(json.dumps(run(parse(argv))), flush=True)


if __name__ == "__main__":
    main()
