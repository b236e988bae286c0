"""``session-sync check``, the worker's refusal to start on a stale schema, and one exit code for a refused token.

Run as an operator (or a compose health check) runs them: real processes, a real database,
broker and emulator; each failure is one line and a documented exit code.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.acceptance import harness
from tests.conftest import RunningEmulator, free_port
from tests.helpers import KEY, login, settings_for
from worker import checks, queries, runtime

pytestmark = [pytest.mark.timeout(180)]


def env_for(db_url: str, redis_url: str, emu: RunningEmulator, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": redis_url,
        "PANGEA_BASE_URL": emu.base_url,
        "PANGEA_AUTHN_TOKEN": emu.service_token,
        "SESSION_SYNC_ENCRYPTION_KEYS": KEY,
        "SESSION_SYNC_HTTP_TIMEOUT": "2",
        "SESSION_SYNC_HTTP_RETRIES": "0",
    } | extra


@pytest.mark.redis
def test_check_passes_on_a_ready_deployment(pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path) -> None:
    env = env_for(pg_url, redis_url, emu)
    # When the operator runs the check
    done = harness.run_cli(env, tmp_path, "check")
    # Then every line is ok, one per check, and it exits 0
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", n] for n in ("settings", "database", "broker", "pangea")]
    assert "at head revision" in lines[1] and "accepts our service token" in lines[3]
    assert "cannot" not in lines[3] and "bulk revalidation" in lines[3]
    # And --json says the same for machines, with what the token can do
    as_json = json.loads(harness.run_cli(env, tmp_path, "check", "--json").stdout)
    assert as_json["ok"] is True and [c["ok"] for c in as_json["checks"]] == [True] * 4
    assert all(as_json["capabilities"].values())
    # With a client token, the operator learns before it matters what it cannot do
    client = harness.run_cli(env | {"PANGEA_AUTHN_TOKEN": emu.client_token}, tmp_path, "check", "--json")
    assert json.loads(client.stdout)["capabilities"] == {
        "per_token_checks": True,
        "bulk_revalidation": False,
        "user_logout_in_one_call": False,
        "invalidate_by_session_id": False,
    }
    line = harness.run_cli(env | {"PANGEA_AUTHN_TOKEN": emu.client_token}, tmp_path, "check").stdout.splitlines()[3]
    assert "accepts our client token" in line and "cannot: bulk revalidation" in line


@pytest.mark.redis
@pytest.mark.parametrize(
    ("change", "failing", "code", "says"),
    [
        ({"PANGEA_AUTHN_TOKEN": "pts_" + "w" * 32}, "pangea", checks.EXIT_TOKEN_REFUSED, "Pangea refused"),
        ({"CELERY_BROKER_URL": "redis://127.0.0.1:{port}/0"}, "broker", checks.EXIT_FAILURE, "unreachable"),
        ({"PANGEA_BASE_URL": "http://127.0.0.1:{port}"}, "pangea", checks.EXIT_FAILURE, "no usable answer"),
        ({"DATABASE_URL": "{empty}"}, "database", checks.EXIT_FAILURE, "run `session-sync db upgrade`"),
        (
            {"SESSION_SYNC_ENCRYPTION_KEYS": ""},
            "settings",
            checks.EXIT_CONFIG,
            "SESSION_SYNC_ENCRYPTION_KEYS: not set (required with PostgreSQL)",
        ),
        ({"SESSION_SYNC_BATCH_SIZE": "lots"}, "settings", checks.EXIT_CONFIG, "SESSION_SYNC_BATCH_SIZE"),
    ],
)
def test_each_failure_is_one_line_and_a_non_zero_exit(
    pg_url: str,
    redis_url: str,
    emu: RunningEmulator,
    tmp_path: Path,
    change: dict[str, str],
    failing: str,
    code: int,
    says: str,
) -> None:
    fill = {"port": str(free_port()), "empty": f"sqlite:///{tmp_path / 'empty.db'}"}
    env = env_for(pg_url, redis_url, emu) | {k: v.format(**fill) for k, v in change.items()}
    # When one thing is wrong
    done = harness.run_cli(env, tmp_path, "check", "--json", timeout=60)
    # Then the check names it, says why, and exits with its code
    assert done.returncode == code, done.stdout + done.stderr
    report = json.loads(done.stdout)
    bad = [c for c in report["checks"] if not c["ok"]]
    assert report["ok"] is False and bad[0]["name"] == failing and says in bad[0]["detail"], report
    assert emu.service_token not in done.stdout + done.stderr


@pytest.mark.redis
@pytest.mark.parametrize(
    ("database", "unset", "says"),
    [
        ("empty_pg_url", None, "the database has no session-sync schema; run `session-sync db upgrade`"),
        ("pg_url", "PANGEA_AUTHN_TOKEN", "PANGEA_AUTHN_TOKEN: not set"),
    ],
)
def test_the_worker_refuses_to_start_on_a_stale_schema_or_a_missing_setting(
    database: str,
    unset: str | None,
    says: str,
    redis_url: str,
    emu: RunningEmulator,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # Given a database nobody migrated, or a required setting missing
    env = env_for(request.getfixturevalue(database), redis_url, emu) | {"PATH": str(harness.BIN), "HOME": str(tmp_path)}
    env.pop(unset or "", None)
    # When the worker is started
    done = subprocess.run(
        [str(harness.BIN / "celery"), "-A", "worker", "worker", "--loglevel=INFO"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it stops at once with one clear line instead of failing every task later
    assert done.returncode == checks.EXIT_CONFIG, done.stderr[-2000:]
    assert f"session-sync: worker not started: {says}" in done.stderr
    assert "ready." not in done.stdout + done.stderr


def test_a_refused_token_is_exit_3_in_sweep_resync_and_status(
    sqlite_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    # Given a session due for its check, and then a PANGEA_AUTHN_TOKEN that Pangea refuses
    rt = runtime.Runtime(settings_for(sqlite_url, emu))
    try:
        sid = login(rt, emu, "ann@example.com")
        with rt.sessions.begin() as db:
            queries.make_due(db, now=datetime.now(UTC), session_ids=[sid])
    finally:
        rt.close()
    env = env_for(sqlite_url, "memory://", emu, PANGEA_AUTHN_TOKEN="pts_" + "w" * 32)
    # When the operator runs each command that talks to Pangea, and then status
    sweep = harness.run_cli(env, tmp_path, "sweep", "--once")
    resync = harness.run_cli(env, tmp_path, "resync", "--all", "--local")
    status = harness.run_cli(env, tmp_path, "status")
    # Then each exits with the same code and says why in one line
    assert [sweep.returncode, resync.returncode, status.returncode] == [checks.EXIT_TOKEN_REFUSED] * 3, (
        sweep.stderr + resync.stderr + status.stderr
    )
    assert "Pangea refused PANGEA_AUTHN_TOKEN" in sweep.stderr
    assert resync.stderr.strip().splitlines()[-1].startswith("session-sync: Pangea refused PANGEA_AUTHN_TOKEN; nothing")
    assert "STOPPED" in status.stdout
