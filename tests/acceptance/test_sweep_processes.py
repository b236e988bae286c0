"""``session-sync sweep --once`` on several processes: the work shared, every session checked once.

The CLI as cron runs it, on PostgreSQL against the emulator (a real server). Per-token checks, so
that the emulator's request count is the number of checks: a session checked twice or skipped
shows in it. The processes are read from ``/proc`` while the sweep runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.acceptance import harness
from tests.conftest import RunningEmulator
from tests.helpers import env_for, login_many, requests, settings_for
from worker import checks, models, queries, runtime

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CHECK = "/v2/client/token/check"
SESSIONS = 120


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid``, from ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _sweep(env: dict[str, str], workdir: Path, *args: str) -> subprocess.Popen[str]:
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), **env}
    return subprocess.Popen(
        [str(harness.BIN / "session-sync"), "sweep", "--once", "--json", *args],
        cwd=workdir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _seeded(pg_url: str, emu: RunningEmulator) -> list[int]:
    """SESSIONS healthy sessions, all due for a check."""
    rt = runtime.Runtime(settings_for(pg_url, emu, SESSION_SYNC_REVALIDATION="per_token"))
    try:
        ids = login_many(rt, emu, [f"p{i}@example.com" for i in range(SESSIONS)])
        with rt.sessions.begin() as db:
            queries.make_due(db, now=rt.clock(), session_ids=ids)
    finally:
        rt.close()
    return ids


S = models.LocalSession


def _scalar(pg_url: str, statement: sa.Executable) -> Any:
    """One value read from the database, on a connection of its own (the sweep runs beside it)."""
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as db:
            return db.execute(statement).scalar_one()
    finally:
        engine.dispose()


def _checked_since(pg_url: str, ids: list[int], since: Any) -> int:
    return int(_scalar(pg_url, sa.select(sa.func.count()).where(S.id.in_(ids), S.last_checked_at >= since)))


def _live_claims(pg_url: str) -> int:
    """How many claims hold sessions now (with one batch in flight each, how many processes hold one)."""
    return int(
        _scalar(pg_url, sa.select(sa.func.count(sa.distinct(S.claim_token))).where(S.claimed_until > sa.func.now()))
    )


def _database_now(pg_url: str) -> Any:
    return _scalar(pg_url, sa.select(sa.func.now()))


def test_a_sweep_on_two_processes_checks_every_session_once(pg_url: str, emu: RunningEmulator, tmp_path: Path) -> None:
    # Given healthy sessions due for a check, and a Pangea slow enough to watch the sweep at work
    ids = _seeded(pg_url, emu)
    env = env_for(
        pg_url, emu, SESSION_SYNC_REVALIDATION="per_token", SESSION_SYNC_BATCH_SIZE="10", SESSION_SYNC_CONCURRENCY="4"
    )
    emu.admin.faults(latency_ms=100, paths=[CHECK])
    before, started = requests(emu, CHECK), _database_now(pg_url)

    # When cron runs one sweep on two processes
    sweep = _sweep(env, tmp_path, "--processes", "2")
    seen: set[int] = set()
    while sweep.poll() is None:
        seen.update(_children(sweep.pid))
        time.sleep(0.05)
    out, err = sweep.communicate()

    # Then two processes shared it, and each session was checked once: none twice, none skipped
    assert sweep.returncode == 0, err
    assert len(seen) >= 2, f"sweep processes seen: {seen}"
    counts = json.loads(out)
    assert (counts["checked"], counts["kept"], counts["failed"], counts["revoked"]) == (SESSIONS, SESSIONS, 0, 0)
    assert requests(emu, CHECK) - before == SESSIONS
    assert _checked_since(pg_url, ids, started) == SESSIONS
    assert _children(sweep.pid) == []
    # ... and the sweep's record (what `status` shows) holds the sum
    status = json.loads(harness.run_cli(env, tmp_path, "status", "--json").stdout)
    assert (status["last_sweep"]["kind"], status["last_sweep"]["checked"]) == ("once", SESSIONS)


def test_a_killed_sweep_process_is_reported_and_its_work_is_taken_by_the_next_sweep(
    pg_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    # Given healthy sessions due, a Pangea at 100 ms, and a lease the sweep outlasts by far
    ids = _seeded(pg_url, emu)
    env = env_for(
        pg_url,
        emu,
        SESSION_SYNC_REVALIDATION="per_token",
        SESSION_SYNC_BATCH_SIZE="10",
        SESSION_SYNC_CONCURRENCY="10",  # a batch is checked well within its lease
        SESSION_SYNC_BATCHES_IN_FLIGHT="1",
        SESSION_SYNC_LEASE="8s",
    )
    emu.admin.faults(latency_ms=100, paths=[CHECK])
    started = _database_now(pg_url)

    # When one of the sweep's processes is killed with a batch in hand
    sweep = _sweep(env, tmp_path, "--processes", "2")
    harness.wait_for(lambda: len(_children(sweep.pid)) == 2, timeout=60, what="two sweep processes", every=0.02)
    victim = _children(sweep.pid)[0]
    harness.wait_for(lambda: _live_claims(pg_url) == 2, timeout=60, what="a batch in each process's hand", every=0.01)
    os.kill(victim, signal.SIGKILL)
    out, err = sweep.communicate(timeout=120)

    # Then the sweep says so in one line and fails, with no traceback
    assert sweep.returncode == 1, (out, err)
    assert "ended without its counts (killed by signal 9)" in err and "Traceback" not in err
    # ... the other process did the rest, and what the killed one held waits for its lease to lapse
    left = SESSIONS - _checked_since(pg_url, ids, started)
    assert 0 < left <= 10

    # ... and once it lapses, the next sweep checks exactly that
    emu.admin.clear_faults()
    time.sleep(8.5)
    again = harness.run_cli(env, tmp_path, "sweep", "--once", "--json", "--processes", "2")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["checked"] == left
    assert _checked_since(pg_url, ids, started) == SESSIONS


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_sweep_stopped_by_its_parent_leaves_no_process_behind(
    pg_url: str, emu: RunningEmulator, tmp_path: Path, stop: signal.Signals
) -> None:
    # Given a sweep on two processes, at work on a slow Pangea
    _seeded(pg_url, emu)
    env = env_for(
        pg_url,
        emu,
        SESSION_SYNC_REVALIDATION="per_token",
        SESSION_SYNC_BATCH_SIZE="5",
        SESSION_SYNC_CONCURRENCY="1",  # a minute of work for each process
        SESSION_SYNC_BATCHES_IN_FLIGHT="1",
    )
    emu.admin.faults(latency_ms=1000, paths=[CHECK])
    sweep = _sweep(env, tmp_path, "--processes", "2")
    harness.wait_for(lambda: len(_children(sweep.pid)) == 2, timeout=60, what="two sweep processes", every=0.02)
    children = _children(sweep.pid)

    # When cron's timeout or a supervisor stops the command it started (the parent only)
    sweep.send_signal(stop)
    _, err = sweep.communicate(timeout=30)

    # Then its processes end with it
    harness.wait_for(
        lambda: not any(Path(f"/proc/{c}").exists() and "Z" not in _state(c) for c in children),
        timeout=20,
        what="the sweep's processes to end",
    )
    assert "Traceback" not in err


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2 :].split()[0]


def test_a_refused_token_stops_every_process_with_exit_3(pg_url: str, emu: RunningEmulator, tmp_path: Path) -> None:
    # Given sessions due, and a PANGEA_AUTHN_TOKEN Pangea refuses
    _seeded(pg_url, emu)
    env = env_for(pg_url, emu, token="pts_" + "w" * 32, SESSION_SYNC_REVALIDATION="per_token")
    # When cron sweeps on two processes
    result = harness.run_cli(env, tmp_path, "sweep", "--once", "--json", "--processes", "2")
    # Then it stops with the token's exit code, the counts say so, and nothing was checked
    assert result.returncode == checks.EXIT_TOKEN_REFUSED, result.stderr
    counts = json.loads(result.stdout)
    assert counts["stopped"] is True and counts["checked"] == 0
    assert "Traceback" not in result.stderr


def test_more_processes_than_the_settings_allow_is_a_clear_error_that_sweeps_nothing(tmp_path: Path) -> None:
    # Given a SQLite database (one writer) and a Pangea nobody answers at
    db = tmp_path / "app.db"
    env = env_for(f"sqlite:///{db}", "http://127.0.0.1:9", token="pts_x")
    assert harness.run_cli(env, tmp_path, "db", "upgrade").returncode == 0
    before = db.read_bytes()
    # When an operator asks for two processes
    result = harness.run_cli(env, tmp_path, "sweep", "--once", "--processes", "2")
    # Then one line says why not, and nothing was written (not even the sweep's slot)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "session-sync: configuration error: --processes: SQLite takes one writer: a sweep on it runs in one process"
    )
    assert db.read_bytes() == before
