"""Log output: JSON lines with the stable extras, and no token-shaped string in any record."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import logs

TOKENS = {
    "user token": "ptu_" + "abcdefghijklmnopqrstuvwxyz234567",
    "refresh token": "ptr_" + "a" * 32,
    "service token": "pts_sessionsyncemulatorservicetoken2",
    "client token": "pcl_" + "7" * 32,
    "login code": "PMC_" + "B" * 32,
    "jwt": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJwdWlfeHl6In0.MEUCIQD-sig_nature",
    "fernet": "gAAAAABn" + "x" * 60 + "==",
}


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger writing through one handler into a buffer (text formatter until a test installs JSON)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_json_line_carries_time_level_logger_message_and_extras(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    # Given the JSON format on the handler
    logs.install([handler], "json")

    # When the code logs with its stable keys
    logger.info("Sweep fanned out to %d batches", 3, extra={"action": "sweep", "slot": "2026-01-01T00:00:00+00:00"})
    logger.warning("Session revoked", extra={"action": "session_revoked", "session_id": 42})

    # Then each record is one JSON object on one line, with the extras as keys
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == logger.name
    assert first["message"] == "Sweep fanned out to 3 batches"
    assert first["time"].endswith("Z") and first["time"][:4].isdigit()
    assert (first["action"], first["slot"]) == ("sweep", "2026-01-01T00:00:00+00:00")
    assert (second["level"], second["action"], second["session_id"]) == ("WARNING", "session_revoked", 42)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("kind", sorted(TOKENS))
def test_token_shaped_strings_are_scrubbed_everywhere(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler], fmt: logs.LogFormat, kind: str
) -> None:
    logger, stream, handler = capture
    secret = TOKENS[kind]
    # Given the redaction filter on the handler
    logs.install([handler], fmt)

    # When a secret slips into the message, an argument, an extra, a header and a traceback
    logger.warning("token %s in the message", secret, extra={"action": "oops", "detail": {"t": [secret]}})
    logger.error(f"Authorization: Bearer {secret}")
    try:
        raise ValueError(f"bad token {secret}")
    except ValueError:
        logger.exception("failed")

    # Then it never comes out, and the record still does, saying what was there
    out = stream.getvalue()
    assert secret not in out
    assert secret[8:24] not in out
    assert out.count(logs.REDACTED) >= 3 and "ValueError" in out
    if fmt == "json":
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines[0]["action"] == "oops" and lines[-1]["exception"].startswith("Traceback")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a challenge is not a credential: the web app's WWW-Authenticate value stays readable
        ('Bearer realm="session-sync", error="invalid_token"', 'Bearer realm="session-sync", error="invalid_token"'),
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [REDACTED]"),
        ("session pmt_" + "a" * 32 + " of pui_" + "b" * 32, "session pmt_" + "a" * 32 + " of pui_" + "b" * 32),
        ("pts_tooshort", "pts_tooshort"),
        ("ptu_" + "a" * 32, "ptu_[REDACTED]"),
    ],
)
def test_redact_keeps_what_is_not_a_secret(text: str, expected: str) -> None:
    # Given / When / Then: ids and challenges stay, credentials go
    assert logs.redact(text) == expected


def test_cli_logs_json_lines_when_asked(tmp_path: Path) -> None:
    # Given a fresh SQLite database, no encryption key (a warning is due) and JSON logs
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "PANGEA_BASE_URL": "http://127.0.0.1:9",
        "PANGEA_AUTHN_TOKEN": TOKENS["service token"],
        "SESSION_SYNC_LOG_FORMAT": "json",
    }
    cli = [sys.executable, "-m", "worker.cli"]
    upgrade = subprocess.run([*cli, "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert upgrade.returncode == 0, upgrade.stderr

    # When a sweep runs from the command line
    sweep = subprocess.run([*cli, "sweep", "--once"], env=env, cwd=tmp_path, capture_output=True, text=True)

    # Then its warnings are JSON lines with their action key
    assert sweep.returncode == 0, sweep.stderr
    lines = [json.loads(line) for line in sweep.stderr.splitlines()]
    assert any(line["action"] == "dev_key_in_use" and line["level"] == "WARNING" for line in lines), lines
    assert TOKENS["service token"] not in sweep.stderr

    # ... and a bad format is refused with one line naming the variable
    bad = subprocess.run(
        [*cli, "status"], env=env | {"SESSION_SYNC_LOG_FORMAT": "xml"}, cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("session-sync: configuration error: SESSION_SYNC_LOG_FORMAT")
