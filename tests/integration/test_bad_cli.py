"""Bad command lines: unknown ids, wrong types, out-of-range values and conflicts.

Each is a clear error (non-zero exit, the problem named, never a traceback) and changes nothing:
every row of every table is compared before and after, on SQLite and PostgreSQL. The commands
run in-process through click's runner (fast, many cases) and, for a few, as real processes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests.acceptance import harness
from tests.conftest import RunningEmulator
from tests.helpers import env_for, login
from worker import cli, cli_outbox, models, runtime, sessions
from worker.settings import Settings

pytestmark = pytest.mark.timeout(120)

HUGE = str(2**70)
ALIASES = [str(f.alias) for f in Settings.model_fields.values()]


def dump(rt: runtime.Runtime) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in key order."""
    with rt.sessions() as db:
        return {
            t.name: [tuple(r) for r in db.execute(sa.select(t).order_by(*t.primary_key.columns))]
            for t in models.Base.metadata.sorted_tables
        }


def seed(rt: runtime.Runtime, emu: RunningEmulator) -> dict[str, Any]:
    """Ann is active; Bob and Cid are logged out, and their logouts are dead letters after a Pangea outage."""
    ann, bob, cid = (login(rt, emu, f"{n}@example.com") for n in ("ann", "bob", "cid"))
    with rt.sessions.begin() as db:
        sessions.logout(db, bob, kick=False)
        sessions.logout(db, cid, kick=False)
    emu.admin.faults(error="InternalError")
    assert rt.run(rt.delivery.drain()).dead == 2
    emu.admin.clear_faults()
    with rt.sessions() as db:
        dead = list(db.scalars(sa.select(models.LogoutEvent.id).order_by(models.LogoutEvent.id)))
        user = db.get(models.LocalSession, ann)
    assert user is not None
    return {"ann": ann, "ann_user": user.user_id, "dead": dead}


@pytest.fixture
def world(make_runtime: Any, emu: RunningEmulator, db_url: str) -> tuple[runtime.Runtime, dict[str, Any], CliRunner]:
    rt = make_runtime(SESSION_SYNC_HTTP_RETRIES="0", SESSION_SYNC_OUTBOX_MAX_ATTEMPTS="1")
    env: dict[str, str | None] = dict.fromkeys(ALIASES)  # nothing from the outer environment leaks in
    env |= env_for(db_url, emu)
    return rt, seed(rt, emu), CliRunner(env=env)


def invoke(runner: CliRunner, command: click.Command, args: list[str]) -> tuple[int, str]:
    """Run one command; it must end by exiting (never by an exception escaping); its code and stderr."""
    result = runner.invoke(command, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, args
    return result.exit_code, result.stderr


# (command, arguments, what stderr says): refused before anything runs, exit 2
USAGE_ERRORS: list[tuple[click.Command, list[str], str]] = [
    (cli.resync, [], "say exactly one of --all, --user ID, --session ID"),
    (cli.resync, ["--all", "--session", "1"], "say exactly one of"),
    (cli.resync, ["--session", "seven"], "'seven' is not a valid integer"),
    (cli.resync, ["--session", "0"], "0 is not in the range 1<=x<="),
    (cli.resync, ["--session", "-1"], "-1 is not in the range"),
    (cli.resync, ["--session", HUGE], f"{HUGE} is not in the range"),
    (cli.resync, ["--all", "--timeout", "-5"], "'-5' is not a duration such as 30s, 5m or 2h"),
    (cli.resync, ["--all", "--timeout", "0"], "0 is not a duration above 0 and at most 86400 s"),
    (cli.resync, ["--all", "--timeout", "0s"], "0s is not a duration above 0"),
    (cli.resync, ["--all", "--timeout", "2d"], "2d is not a duration above 0 and at most 86400 s"),
    (cli.resync, ["--all", "--timeout", "nan"], "'nan' is not a duration"),
    (cli.resync, ["--all", "--timeout", "inf"], "'inf' is not a duration"),
    (cli.resync, ["--all", "--timeout", "soon"], "'soon' is not a duration such as 30s, 5m or 2h"),
    (cli.status, ["--session", "0"], "0 is not in the range"),
    (cli.status, ["--session", HUGE], "is not in the range"),
    (cli.status, ["--session", "1.5"], "'1.5' is not a valid integer"),
    (cli_outbox.logout, [], "say exactly one of --session ID, --user ID"),
    (cli_outbox.logout, ["--session", "1", "--user", "pui_x"], "say exactly one of"),
    (cli_outbox.logout, ["--session", HUGE], "is not in the range"),
    (cli_outbox.logout, ["--session", "1", "--reason", ""], "an end reason must be 1 to 64 printable characters"),
    (cli_outbox.logout, ["--session", "1", "--reason", "x" * 65], "an end reason must be 1 to 64"),
    (cli_outbox.logout, ["--session", "1", "--reason", "a\nb"], "an end reason must be 1 to 64"),
    (cli_outbox.outbox, ["--limit", "0"], "0 is not in the range 1<=x<=100000"),
    (cli_outbox.outbox, ["--limit", "many"], "'many' is not a valid integer"),
    (cli_outbox.outbox, ["--id", "1"], "--id goes with --retry-dead"),
    (cli_outbox.outbox, ["--retry-dead", "--id", "0"], "0 is not in the range"),
    (cli_outbox.outbox, ["--retry-dead", "--deliver"], "say at most one of --retry-dead, --purge-delivered, --deliver"),
    (cli_outbox.outbox, ["--retry-dead", "--purge-delivered", "1d"], "say at most one of"),
    (cli_outbox.outbox, ["--purge-delivered", "soon"], "expected a duration such as 30d"),
    (cli_outbox.outbox, ["--purge-delivered", "-00:05:00"], "expected a duration"),  # would purge the future
    (cli_outbox.outbox, ["--purge-delivered", "-PT1H"], "expected a duration"),
    (cli_outbox.outbox, ["--purge-delivered", "99999999999999d"], "expected a duration"),
    (cli.demo, ["--deadline", "-1"], "'-1' is not a duration"),
    (cli.demo, ["--deadline", "nan"], "'nan' is not a duration"),
    (cli.demo, ["--deadline", "2h"], "2h is not a duration above 0 and at most 3600 s"),
    (cli.emulator, ["--port", "0"], "0 is not in the range 1<=x<=65535"),
    (cli.emulator, ["--port", "http"], "'http' is not a valid integer"),
    (cli.worker, ["--concurrency", "0"], "0 is not in the range 1<=x<=256"),
    (cli.worker, ["--pool", "gevent"], "'gevent' is not one of 'solo', 'prefork', 'threads'"),
    (cli.sweep, [], "Missing option '--once'"),
]


def test_bad_arguments_are_usage_errors_and_change_nothing(world: tuple[runtime.Runtime, Any, CliRunner]) -> None:
    rt, _, runner = world
    before = dump(rt)
    for command, args, says in USAGE_ERRORS:
        # When an operator gets an option wrong
        code, err = invoke(runner, command, args)
        # Then click refuses it with the reason (exit 2) before the command does anything
        assert code == 2, (args, code, err)
        assert says in err, (args, err)
    assert dump(rt) == before


def test_unknown_ids_are_one_line_errors_and_change_nothing(world: tuple[runtime.Runtime, Any, CliRunner]) -> None:
    rt, seeded, runner = world
    dead = seeded["dead"]
    # (command, arguments, the one line on stderr)
    cases: list[tuple[click.Command, list[str], str]] = [
        (
            cli.resync,
            ["--session", "999999", "--local"],
            "session-sync: UnknownSession: no local session with id 999999",
        ),
        (
            cli.resync,
            ["--session", "999999", "--wait"],
            "session-sync: UnknownSession: no local session with id 999999",
        ),
        (cli.resync, ["--user", "pui_nobody"], "session-sync: UnknownSession: no local session for user 'pui_nobody'"),
        (cli.status, ["--session", "999999"], "Error: no session with id 999999"),
        (cli.status, ["--session", "999999", "--json"], "Error: no session with id 999999"),
        (cli_outbox.logout, ["--session", "999999"], "session-sync: UnknownSession: no local session with id 999999"),
        (
            cli_outbox.logout,
            ["--user", "pui_nobody"],
            "session-sync: UnknownSession: no local session for user 'pui_nobody'",
        ),
        (cli_outbox.logout, ["--user", "a\nb"], "session-sync: UnknownSession: no local session for user 'a\\nb'"),
        (cli_outbox.logout, ["--user", "x" * 5000], "session-sync: UnknownSession: no local session for user 'xxxx"),
        (cli_outbox.outbox, ["--retry-dead", "--id", "999999"], "Error: no dead letter to retry with id 999999"),
        # One real dead letter and one unknown: neither is retried
        (
            cli_outbox.outbox,
            ["--retry-dead", "--id", str(dead[0]), "--id", "999999"],
            "Error: no dead letter to retry with id 999999; nothing retried",
        ),
        (cli.db_upgrade, ["--revision", "nonsense"], "Error: Can't locate revision identified by 'nonsense'"),
    ]
    before = dump(rt)
    for command, args, line in cases:
        # When support names a session, user or event that is not there
        code, err = invoke(runner, command, args)
        # Then it is one line saying so, exit 1
        assert code == 1, (args, code, err)
        [said] = err.strip().splitlines()
        assert said.startswith(line) and len(said) < 200, (args, said)
        # ... and nothing changed (the real dead letter above stayed dead)
        assert dump(rt) == before, args

    # When the same commands name what exists, they do change things (so the comparison could fail)
    assert invoke(runner, cli_outbox.outbox, ["--retry-dead", "--id", str(dead[0])]) == (0, "")
    assert invoke(runner, cli_outbox.logout, ["--user", seeded["ann_user"]])[0] == 0
    after = dump(rt)
    assert after["logout_outbox"] != before["logout_outbox"] and after["sessions"] != before["sessions"]


def test_real_processes_say_one_line_and_write_nothing(tmp_path: Path, emu: RunningEmulator) -> None:
    # Given a migrated SQLite database with one session in it, and one never migrated
    db_file, empty = tmp_path / "app.db", tmp_path / "empty.db"
    base = {"PATH": os.environ.get("PATH", "")} | env_for(f"sqlite:///{db_file}", emu)
    assert harness.run_cli(base, tmp_path, "db", "upgrade").returncode == 0
    rt = runtime.Runtime(Settings.from_env(base))
    try:
        login(rt, emu, "ann@example.com")
        before = dump(rt)
    finally:
        rt.close()
    runs = [
        (
            base,
            ["resync", "--session", "424242", "--wait", "--timeout", "5"],
            "session-sync: UnknownSession: no local session with id",
        ),
        (base, ["logout", "--user", "pui_nobody"], "session-sync: UnknownSession: no local session for user"),
        (base | {"DATABASE_URL": f"sqlite:///{empty}"}, ["status"], "session-sync: database error: no such table"),
    ]
    # When operators run them as real processes
    procs = [
        subprocess.Popen(
            [str(harness.BIN / "session-sync"), *args],
            env=env | {"HOME": str(tmp_path)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env, args, _ in runs
    ]
    for proc, (_, args, line) in zip(procs, runs, strict=True):
        out, err = proc.communicate(timeout=90)
        # Then each says one line and exits 1
        assert proc.returncode == 1 and out == "", (args, err)
        [said] = err.strip().splitlines()
        assert said.startswith(line), (args, said)
    # ... and nothing was written
    rt = runtime.Runtime(Settings.from_env(base))
    try:
        assert dump(rt) == before
    finally:
        rt.close()
