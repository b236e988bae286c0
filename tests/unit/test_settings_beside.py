"""Settings for running beside an app: secrets from files, our own queue, the rate limit's store, durations."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tests.helpers import KEY
from worker import errors, ratelimit
from worker.settings import BROKER_SCHEMES, DEFAULT_QUEUE, Settings, parse_duration

TOKEN = "pts_" + "b" * 32
BASE = {"PANGEA_BASE_URL": "https://authn.example.com"}
PG = "postgresql://app@db.example/app"


def test_secrets_come_from_files_as_docker_and_kubernetes_mount_them(tmp_path: Path) -> None:
    # Given secret files with the trailing newline editors and `kubectl create secret` leave
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "keys").write_text(KEY + "\n")
    # When settings are read with the *_FILE variables
    settings = Settings.from_env(
        BASE
        | {
            "PANGEA_AUTHN_TOKEN_FILE": str(tmp_path / "token"),
            "SESSION_SYNC_ENCRYPTION_KEYS_FILE": str(tmp_path / "keys"),
        }
    )
    # Then the secrets are the files' contents, newline dropped
    assert settings.authn_token == TOKEN
    assert settings.encryption_keys is not None and settings.encryption_keys.get_secret_value() == KEY


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"PANGEA_AUTHN_TOKEN_FILE": "/nonexistent/token"}, "PANGEA_AUTHN_TOKEN_FILE: cannot read /nonexistent/token"),
        ({"PANGEA_AUTHN_TOKEN_FILE": "{dir}"}, "PANGEA_AUTHN_TOKEN_FILE: cannot read"),
        ({"PANGEA_AUTHN_TOKEN_FILE": "{empty}"}, "PANGEA_AUTHN_TOKEN_FILE: {empty} is empty"),
        (
            {"PANGEA_AUTHN_TOKEN_FILE": "{bad}"},
            "PANGEA_AUTHN_TOKEN (from PANGEA_AUTHN_TOKEN_FILE): must be a single Pangea token",
        ),
        (
            {"PANGEA_AUTHN_TOKEN_FILE": "{token}", "PANGEA_AUTHN_TOKEN": TOKEN},
            "PANGEA_AUTHN_TOKEN_FILE: set together with PANGEA_AUTHN_TOKEN",
        ),
        (
            {"SESSION_SYNC_ENCRYPTION_KEYS_FILE": "{bad}"},
            "SESSION_SYNC_ENCRYPTION_KEYS (from SESSION_SYNC_ENCRYPTION_KEYS_FILE)",
        ),
    ],
)
def test_a_bad_secret_file_is_one_clear_error_naming_the_variable(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    paths = {"dir": tmp_path, "empty": tmp_path / "empty", "bad": tmp_path / "bad", "token": tmp_path / "token"}
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "bad").write_text("two words\n")
    (tmp_path / "token").write_text(TOKEN)
    env = {k: v.format(**{n: str(p) for n, p in paths.items()}) for k, v in env.items()}
    with pytest.raises(errors.ConfigError) as caught:
        Settings.from_env(BASE | env)
    assert str(caught.value).startswith(says.format(**{n: str(p) for n, p in paths.items()}))
    assert "two words" not in str(caught.value)  # a secret's content never appears in the message


def test_broker_schemes_are_kombus() -> None:
    # Listed in settings so a web process never imports kombu; kept in step with kombu here
    from kombu.transport import TRANSPORT_ALIASES

    assert set(TRANSPORT_ALIASES) == BROKER_SCHEMES


def test_our_queue_is_not_celerys_default() -> None:
    assert Settings.from_env({}).queue == DEFAULT_QUEUE == "session_sync"
    assert Settings.from_env({"SESSION_SYNC_QUEUE": "billing.session_sync"}).queue == "billing.session_sync"


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}, ratelimit.RedisRateLimiter),
        ({"CELERY_BROKER_URL": "amqp://guest@127.0.0.1//"}, ratelimit.LocalRateLimiter),
        (
            {"CELERY_BROKER_URL": "amqp://guest@127.0.0.1//", "SESSION_SYNC_RATE_LIMIT_STORE": "redis://127.0.0.1/1"},
            ratelimit.RedisRateLimiter,
        ),
        (
            {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "SESSION_SYNC_RATE_LIMIT_STORE": "local"},
            ratelimit.LocalRateLimiter,
        ),
        # RabbitMQ and PostgreSQL, no Redis: the database every worker shares holds the bucket
        ({"CELERY_BROKER_URL": "amqp://guest@127.0.0.1//", "DATABASE_URL": PG}, ratelimit.DatabaseRateLimiter),
        (
            {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "SESSION_SYNC_RATE_LIMIT_STORE": "database"},
            ratelimit.DatabaseRateLimiter,
        ),
        (
            {
                "CELERY_BROKER_URL": "amqp://guest@127.0.0.1//",
                "DATABASE_URL": PG,
                "SESSION_SYNC_RATE_LIMIT_STORE": "local",
            },
            ratelimit.LocalRateLimiter,
        ),
    ],
)
def test_the_rate_limit_store_is_shared_whatever_the_broker(env: dict[str, str], kind: type) -> None:
    settings = Settings.from_env(BASE | {"PANGEA_AUTHN_TOKEN": TOKEN} | env)
    assert isinstance(ratelimit.from_settings(settings), kind)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("250ms", 0.25)]
)
def test_one_duration_syntax(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["soon", "-5", "5 minutes", "nan", ""])
def test_a_bad_duration_says_what_a_duration_looks_like(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration such as 30s, 5m or 2h"):
        parse_duration(text)
