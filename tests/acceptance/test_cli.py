"""The command line as an operator uses it: real processes, real files, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pangea.exceptions as pe
import pytest
from pangea.config import PangeaConfig
from pangea.services import AuthN

from tests.acceptance import harness
from tests.conftest import RunningEmulator, free_port
from tests.helpers import KEY, env_for
from worker import emulator

pytestmark = pytest.mark.timeout(120)

SERVICE = "pts_" + "s" * 32
CLIENT = "pcl_" + "c" * 32


def test_sdk_session_lifecycle_against_session_sync_emulator(tmp_path: Path) -> None:
    # Given `session-sync emulator` started as an operator would, with tokens of their own, answering
    # token verdicts with HTTP 401 as a Pangea that mirrors Unauthorized might
    port = free_port()
    env = {
        **os.environ,
        "EMULATOR_SERVICE_TOKEN": SERVICE,
        "EMULATOR_CLIENT_TOKEN": CLIENT,
        "EMULATOR_HTTP_CODES": "InvalidToken=401,ExpiredToken=401",
    }
    proc = subprocess.Popen(
        [str(harness.BIN / "session-sync"), "emulator", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        harness.wait_for(lambda: _answers(base), timeout=20, what="the emulator to listen")
        admin = emulator.EmulatorAdmin(base)
        sdk = AuthN(SERVICE, config=PangeaConfig(base_url_template=base, request_retries=0))

        # When the official SDK walks a whole session: code → userinfo → check → refresh → logout
        creds = sdk.client.userinfo(admin.login("ada@example.com")).result
        assert creds is not None and creds.active_token is not None
        assert sdk.client.token_endpoints.check(creds.active_token.token).status == "Success"
        new = sdk.client.session.refresh(creds.refresh_token.token).result
        assert new is not None and new.active_token is not None
        with pytest.raises(pe.PangeaAPIException) as reused:
            sdk.client.session.refresh(creds.refresh_token.token)
        assert sdk.client.session.logout(new.active_token.token).status == "Success"
        with pytest.raises(pe.PangeaAPIException) as after:
            sdk.client.token_endpoints.check(new.active_token.token)

        # Then each step answers as Pangea does
        assert reused.value.response.status == "InvalidToken"
        assert after.value.response.status == "InvalidToken"
        assert after.value.response.http_status == 401
        # ... and a token it was not given is refused
        with pytest.raises(pe.UnauthorizedException):
            AuthN(emulator.DEFAULT_SERVICE_TOKEN, config=PangeaConfig(base_url_template=base)).session.list()
        admin.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def _answers(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/emulator/stats", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_db_upgrade_sweep_and_status_on_a_fresh_sqlite_file(tmp_path: Path, emu: RunningEmulator) -> None:
    env = env_for(f"sqlite:///{tmp_path / 'app.db'}", emu, broker=None)
    # Given a new database, migrated by the CLI
    upgraded = harness.run_cli(env, tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("database at revision ")
    # When cron runs one sweep with nothing to do, and an operator asks for status
    swept = harness.run_cli(env, tmp_path, "sweep", "--once", "--json")
    status = harness.run_cli(env, tmp_path, "status", "--json")
    human = harness.run_cli(env, tmp_path, "status")
    # Then both answer, and status shows the sweep
    assert swept.returncode == 0, swept.stderr
    assert json.loads(swept.stdout)["checked"] == 0
    report = json.loads(status.stdout)
    assert report["sessions"] == {"active": 0, "logged_out": 0, "revoked": 0}
    assert report["last_sweep"]["kind"] == "once"
    assert "last sweep" in human.stdout and "(once)" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resync"], "exactly one of --all, --user ID, --session ID"),
        (["resync", "--all", "--user", "pui_x"], "exactly one of"),
        (["resync", "--session", "seven"], "'seven' is not a valid integer"),
        (["status", "--session", "999"], "no session with id 999"),
        (["emulator", "--port", "70000"], "70000 is not in the range"),
    ],
)
def test_bad_arguments_get_a_clear_error_and_change_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "SESSION_SYNC_ENCRYPTION_KEYS": KEY}
    assert harness.run_cli(env, tmp_path, "db", "upgrade").returncode == 0
    before = (tmp_path / "app.db").read_bytes()
    result = harness.run_cli(env, tmp_path, *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "app.db").read_bytes() == before


def test_a_bad_emulator_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    result = harness.run_cli({"EMULATOR_HTTP_CODES": "InvalidToken=teapot"}, tmp_path, "emulator", "--port", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "EMULATOR_HTTP_CODES: expected Status=code pairs" in result.stderr


def test_missing_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "SESSION_SYNC_ENCRYPTION_KEYS": KEY}
    assert harness.run_cli(env, tmp_path, "db", "upgrade").returncode == 0
    result = harness.run_cli(env, tmp_path, "sweep", "--once")
    assert result.returncode == 2
    assert result.stderr.strip() == "session-sync: configuration error: PANGEA_DOMAIN: not set (or set PANGEA_BASE_URL)"
    celery = subprocess.run(
        [str(harness.BIN / "celery"), "-A", "worker", "status"],
        env={"PATH": os.environ["PATH"], "SESSION_SYNC_BATCH_SIZE": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert celery.returncode == 2 and "SESSION_SYNC_BATCH_SIZE" in celery.stderr
    assert "Traceback" not in celery.stderr
