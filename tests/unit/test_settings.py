"""Settings: one typed object from the environment; bad input names the variable."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from worker import crypto, errors
from worker.settings import Settings


def test_embedded_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.celery_broker_url.startswith("sqla+sqlite:///")
    assert settings.is_sqlite


def test_base_url_from_domain_or_override() -> None:
    assert Settings.from_env({"PANGEA_DOMAIN": "aws.us.pangea.cloud"}).authn_base_url == (
        "https://authn.aws.us.pangea.cloud"
    )
    both = {"PANGEA_DOMAIN": "aws.us.pangea.cloud", "PANGEA_BASE_URL": "http://127.0.0.1:8900/"}
    assert Settings.from_env(both).authn_base_url == "http://127.0.0.1:8900"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("45", timedelta(seconds=45)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("250ms", timedelta(milliseconds=250)),
    ],
)
def test_durations_take_units(value: str, expected: timedelta) -> None:
    assert Settings.from_env({"SESSION_SYNC_CHECK_INTERVAL": value}).check_interval == expected


def test_postgres_urls_use_psycopg3() -> None:
    url = Settings.from_env({"DATABASE_URL": "postgresql://u@db/app"}).database_url
    assert url == "postgresql+psycopg://u@db/app"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PANGEA_BASE_URL": "127.0.0.1:8900"}, "PANGEA_BASE_URL"),
        ({"PANGEA_DOMAIN": "https://aws.us.pangea.cloud"}, "PANGEA_DOMAIN"),
        ({"PANGEA_AUTHN_TOKEN": "pts_abc def"}, "PANGEA_AUTHN_TOKEN"),
        ({"DATABASE_URL": "mysql://root@db/app"}, "DATABASE_URL"),
        ({"SESSION_SYNC_BATCH_SIZE": "lots"}, "SESSION_SYNC_BATCH_SIZE"),
        ({"SESSION_SYNC_BATCH_SIZE": "0"}, "SESSION_SYNC_BATCH_SIZE"),
        ({"SESSION_SYNC_BULK_CHUNK": "0"}, "SESSION_SYNC_BULK_CHUNK"),
        ({"SESSION_SYNC_BULK_CHUNK": "all"}, "SESSION_SYNC_BULK_CHUNK"),
        ({"SESSION_SYNC_CHECK_INTERVAL": "often"}, "SESSION_SYNC_CHECK_INTERVAL"),
        ({"SESSION_SYNC_REFRESH_FRACTION": "1.5"}, "SESSION_SYNC_REFRESH_FRACTION"),
    ],
)
def test_malformed_setting_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")


def test_missing_required_settings_are_named_when_needed() -> None:
    settings = Settings.from_env({})
    with pytest.raises(errors.ConfigError, match=r"^PANGEA_DOMAIN: "):
        _ = settings.authn_base_url
    with pytest.raises(errors.ConfigError, match=r"^PANGEA_AUTHN_TOKEN: not set"):
        _ = settings.authn_token


def test_secrets_stay_out_of_repr() -> None:
    key = crypto.generate_key()
    settings = Settings.from_env({"PANGEA_AUTHN_TOKEN": "pts_" + "s" * 32, "SESSION_SYNC_ENCRYPTION_KEYS": key})
    assert "sss" not in repr(settings) and key not in repr(settings)
    assert settings.authn_token == "pts_" + "s" * 32


def test_cli_prints_one_line_and_exits_non_zero(tmp_path: object) -> None:
    # Given a malformed setting, when any command starts
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "db", "upgrade"],
        env={"SESSION_SYNC_BATCH_SIZE": "lots", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then one clear line names the variable, with no traceback
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "session-sync: configuration error: SESSION_SYNC_BATCH_SIZE: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]
