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
from tests.helpers import env_for, login, settings_for
from worker import checks, queries, runtime

pytestmark = [pytest.mark.timeout(180)]


def check_env(db_url: str, redis_url: str, emu: RunningEmulator, **extra: str) -> dict[str, str]:
    """The deployment ``check`` looks at: no HTTP retries, so a failing check fails at once."""
    return (
        env_for(db_url, emu, broker=redis_url)
        | {"SESSION_SYNC_HTTP_TIMEOUT": "2", "SESSION_SYNC_HTTP_RETRIES": "0"}
        | extra
    )


@pytest.mark.redis
def test_check_passes_on_a_ready_deployment(pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path) -> None:
    env = check_env(pg_url, redis_url, emu)
    # When the operator runs the check
    done = harness.run_cli(env, tmp_path, "check")
    # Then every line is ok, one per check, and it exits 0
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", n] for n in checks.NAMES]
    assert "at head revision" in lines[1] and "accepts our service token" in lines[4]
    assert "cannot" not in lines[4] and "bulk revalidation" in lines[4]
    # ... and it says where the rate limit is shared: the Redis broker here
    assert "100 requests/s shared in Redis at 127.0.0.1:6379/" in lines[3]
    # And --json says the same for machines, with what the token can do
    as_json = json.loads(harness.run_cli(env, tmp_path, "check", "--json").stdout)
    assert as_json["ok"] is True and [c["ok"] for c in as_json["checks"]] == [True] * 5
    assert all(as_json["capabilities"].values())
    # With a client token, the operator learns before it matters what it cannot do
    client = harness.run_cli(env | {"PANGEA_AUTHN_TOKEN": emu.client_token}, tmp_path, "check", "--json")
    assert json.loads(client.stdout)["capabilities"] == {
        "per_token_checks": True,
        "bulk_revalidation": False,
        "user_logout_in_one_call": False,
        "invalidate_by_session_id": False,
    }
    line = harness.run_cli(env | {"PANGEA_AUTHN_TOKEN": emu.client_token}, tmp_path, "check").stdout.splitlines()[4]
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
    env = check_env(pg_url, redis_url, emu) | {k: v.format(**fill) for k, v in change.items()}
    # When one thing is wrong
    done = harness.run_cli(env, tmp_path, "check", "--json", timeout=60)
    # Then the check names it, says why, and exits with its code
    assert done.returncode == code, done.stdout + done.stderr
    report = json.loads(done.stdout)
    bad = [c for c in report["checks"] if not c["ok"]]
    assert report["ok"] is False and bad[0]["name"] == failing and says in bad[0]["detail"], report
    assert emu.service_token not in done.stdout + done.stderr


@pytest.mark.redis
def test_readiness_skips_pangea_with_the_same_lines_and_exit_codes(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    # Given a deployment whose database and broker answer, and a Pangea that does not (nothing on its port)
    env = check_env(pg_url, redis_url, emu, PANGEA_BASE_URL=f"http://127.0.0.1:{free_port()}")
    assert harness.run_cli(env, tmp_path, "check", timeout=60).returncode == checks.EXIT_FAILURE
    # When a readiness probe runs the check without Pangea
    done = harness.run_cli(env, tmp_path, "check", "--skip", "pangea", timeout=60)
    # Then it passes, one line per check, and says which one it did not run
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", n] for n in checks.NAMES[:-1]] + [["skip", "pangea"]]
    assert lines[-1].endswith("not checked (--skip pangea)")
    as_json = json.loads(harness.run_cli(env, tmp_path, "check", "--skip", "pangea", "--json").stdout)
    assert as_json["ok"] is True and as_json["skipped"] == ["pangea"]
    assert [c["name"] for c in as_json["checks"]] == list(checks.NAMES[:-1])
    # ... while what it does run still fails as before: a broker down is the broker's line and exit code
    down = env | {"CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    broken = harness.run_cli(down, tmp_path, "check", "--skip", "pangea", timeout=60)
    assert broken.returncode == checks.EXIT_FAILURE and "FAIL  broker" in broken.stdout
    # ... and a check that does not exist (or the settings, which every other check needs) is a usage error
    for bad in ("pangaea", "settings"):
        wrong = harness.run_cli(env, tmp_path, "check", "--skip", bad)
        assert wrong.returncode == 2 and "Invalid value for '--skip'" in wrong.stderr, wrong.stderr


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
    env = check_env(request.getfixturevalue(database), redis_url, emu) | {
        "PATH": str(harness.BIN),
        "HOME": str(tmp_path),
    }
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
    env = check_env(sqlite_url, "memory://", emu, PANGEA_AUTHN_TOKEN="pts_" + "w" * 32)
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
