"""Every setting refuses nonsense with one line naming its variable; none is skipped.

The cases are derived from ``Settings.model_fields`` (type, bounds, alias), so a setting added
later is tested the day it is added, or this file fails and says which one lacks bad values.
"""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args, get_origin

import annotated_types
import pytest
from pydantic.fields import FieldInfo

from tests.acceptance import harness
from worker import crypto, errors
from worker.settings import Settings

KEY = crypto.generate_key()
FIELDS: dict[str, FieldInfo] = {str(f.alias): f for f in Settings.model_fields.values()}
NAMES = {str(f.alias): name for name, f in Settings.model_fields.items()}

#: Malformed whatever the setting: durations.
BAD_DURATIONS = ["often", "5 parsecs", "-5m", "-00:05:00", "-PT5M", "36501d", "99999999999999d", "1e3s"]
#: Durations that are periods, steps, caps or limits: zero is nonsense for them too.
MUST_BE_ABOVE_ZERO = {
    "SESSION_SYNC_CHECK_INTERVAL",
    "SESSION_SYNC_SWEEP_PERIOD",
    "SESSION_SYNC_LEASE",
    "SESSION_SYNC_BACKOFF",
    "SESSION_SYNC_BACKOFF_CAP",
    "SESSION_SYNC_MAX_UNVERIFIED",  # zero would call every session stale (and revoke it with STALE_POLICY=revoke)
    "SESSION_SYNC_OUTBOX_PERIOD",
    "SESSION_SYNC_OUTBOX_BACKOFF",
    "SESSION_SYNC_OUTBOX_BACKOFF_CAP",
    "SESSION_SYNC_OUTBOX_MAX_AGE",  # zero would make every logout a dead letter at once
}
#: Durations where zero means something (and is accepted).
ZERO_MEANS_SOMETHING = {
    "SESSION_SYNC_REFRESH_MARGIN": "no floor: the fraction of the lifetime alone sets the margin",
    "SESSION_SYNC_REFRESH_GRACE": "a replaced token stops authenticating at once",
    "SESSION_SYNC_AUDIT_RETENTION": "housekeeping keeps no audit trail",
    "SESSION_SYNC_METRICS_CACHE": "every scrape reads the database gauges afresh",
}

#: Malformed values of the free-text settings, which no type or bound describes.
BAD_TEXT: dict[str, list[str]] = {
    "PANGEA_DOMAIN": ["https://aws.us.pangea.cloud", "aws.us.pangea.cloud/v2", "two words", "a..b", "-x.example"],
    "PANGEA_BASE_URL": [
        "127.0.0.1:8900",
        "ftp://x",
        "http://",
        "https://",
        "http:///v2",
        "http://a b",
        "http://h:99999",
    ],
    "PANGEA_AUTHN_TOKEN": ["pts_abc def", "pts_\u00e9t\u00e9", "pts_x\ny"],
    "DATABASE_URL": ["mysql://root@db/app", "sqlite", "sqlitexyz:///x.db", "not a url", "postgres://u@db/app"],
    "CELERY_BROKER_URL": ["nonsense", "redis//host", "gopher://x", "redis://a:6379/0;nonsense"],
    "SESSION_SYNC_ENCRYPTION_KEYS": [",", " , ", "not-a-key", KEY + ",", KEY[:-2], "k" * 44],
    "SESSION_SYNC_METRICS_HOST": ["not a host", "-bad-", "a/b", "http://0.0.0.0"],
    "SESSION_SYNC_QUEUE": ["two words", "a/b", "x" * 201, "queue\n"],
    "SESSION_SYNC_RATE_LIMIT_STORE": ["redis", "memcached://h", "database?", "amqp://guest@h//"],
}
#: Free-form settings for which no value is malformed. None today: each one above can be nonsense.
#: (An empty value is never malformed: it means "not set", so the default applies.)
FREE_FORM: dict[str, str] = {}
#: Settings whose value is a secret: a message must not repeat it.
SECRETS = {"PANGEA_AUTHN_TOKEN", "SESSION_SYNC_ENCRYPTION_KEYS"}


def _out_of_bounds(field: FieldInfo, step: float) -> list[str]:
    """Values just past each bound the field declares (ge/gt/le/lt)."""
    values: list[float] = []
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            values.append(float(bound.ge) - step)  # type: ignore[arg-type]
        elif isinstance(bound, annotated_types.Gt):
            values.append(float(bound.gt))  # type: ignore[arg-type]
        elif isinstance(bound, annotated_types.Le):
            values.append(float(bound.le) + step)  # type: ignore[arg-type]
        elif isinstance(bound, annotated_types.Lt):
            values.append(float(bound.lt))  # type: ignore[arg-type]
    return [str(int(v)) if step == 1 else repr(v) for v in values]


def _kind(field: FieldInfo) -> object:
    """The field's type, without the ``| None`` of an optional number (None: unset, so never malformed)."""
    kind = field.annotation
    if kind == int | None:
        return int
    return kind


def malformed(alias: str) -> list[str]:
    """Values of the right general shape for nothing: chosen from the field's type, bounds and alias."""
    field = FIELDS[alias]
    kind = _kind(field)
    if kind is timedelta:
        return BAD_DURATIONS + (["0", "0s", "0ms"] if alias in MUST_BE_ABOVE_ZERO else [])
    if kind is bool:
        return ["maybe", "2", "yes please"]
    if get_origin(kind) is Literal:
        return ["maybe", str(get_args(kind)[0]).upper(), f" {get_args(kind)[0]}x"]
    if kind is int:
        return ["not-a-number", "1.5", "0x10", "1e3", *_out_of_bounds(field, 1)]
    if kind is float:
        return ["not-a-number", "nan", "inf", "-inf", "1e400", *_out_of_bounds(field, 0.5)]
    return BAD_TEXT.get(alias, [])


CASES = [(alias, value) for alias in FIELDS for value in malformed(alias)]


def test_no_setting_is_skipped() -> None:
    # Every alias has malformed values, or is a declared free-form text; nothing else exists
    tested = {alias for alias, _ in CASES}
    assert tested | FREE_FORM.keys() == FIELDS.keys(), sorted(FIELDS.keys() - tested - FREE_FORM.keys())
    assert not tested & FREE_FORM.keys()
    assert BAD_TEXT.keys() <= FIELDS.keys()
    durations = {alias for alias, f in FIELDS.items() if f.annotation is timedelta}
    assert MUST_BE_ABOVE_ZERO | ZERO_MEANS_SOMETHING.keys() == durations
    assert len(CASES) > 4 * len(FIELDS)


def _case_id(alias: str, value: str) -> str:
    """The case's id, with the random KEY named: every xdist worker must collect the same test ids."""
    return f"{alias}={value.replace(KEY, '<KEY>').replace(KEY[:-2], '<KEY[:-2]>')[:24]!r}"


@pytest.mark.parametrize(("alias", "value"), CASES, ids=[_case_id(a, v) for a, v in CASES])
def test_malformed_setting_is_one_line_naming_its_variable(alias: str, value: str) -> None:
    # Given one malformed setting among good ones, When the settings are read
    with pytest.raises(errors.ConfigError) as caught:
        Settings.from_env({"SESSION_SYNC_ENCRYPTION_KEYS": KEY, alias: value})
    # Then the error names that variable, says what is wrong on one line, and repeats no secret
    message = str(caught.value)
    assert caught.value.variable == alias
    assert message.startswith(f"{alias}: ") and len(message) > len(alias) + 5
    assert "\n" not in message and "Traceback" not in message
    if alias in SECRETS and value.strip(" ,"):
        assert value.strip(" ,") not in message and KEY not in message
    assert caught.value.__cause__ is None


def good_value(alias: str) -> str:
    """A well-formed value other than the default, so the malformed ones are refused for themselves."""
    field = FIELDS[alias]
    kind = _kind(field)
    if kind is timedelta:
        return "0" if alias in ZERO_MEANS_SOMETHING else "90s"
    if kind is bool:
        return "false"
    if get_origin(kind) is Literal:
        return str(get_args(kind)[-1])
    if kind is int:
        return str((field.default or 99) + 1)
    if kind is float:
        return str(field.default / 2)
    good = {
        "PANGEA_DOMAIN": "aws.us.pangea.cloud",
        "PANGEA_BASE_URL": "http://127.0.0.1:8900/",
        "PANGEA_AUTHN_TOKEN": "pts_" + "a" * 32,
        "DATABASE_URL": "postgresql://app@db:5432/app",
        "CELERY_BROKER_URL": "redis://redis:6379/0",
        "SESSION_SYNC_ENCRYPTION_KEYS": f"{crypto.generate_key()}, {KEY}",
        "SESSION_SYNC_METRICS_HOST": "::1",
        "SESSION_SYNC_QUEUE": "myapp.session_sync",
        "SESSION_SYNC_RATE_LIMIT_STORE": "redis://cache:6379/3",
    }
    return good[alias]


@pytest.mark.parametrize("alias", sorted(FIELDS))
def test_a_well_formed_value_of_each_setting_is_read(alias: str) -> None:
    # Given a well-formed value that is not the default, When the settings are read
    settings = Settings.from_env({alias: good_value(alias)})
    # Then it is taken, not left at the default
    assert getattr(settings, NAMES[alias]) != FIELDS[alias].get_default(call_default_factory=True), alias


def test_an_empty_value_means_not_set() -> None:
    # Given every setting present but empty (as `VAR=` in a .env file), Then the defaults apply
    assert Settings.from_env(dict.fromkeys(FIELDS, "")) == Settings.from_env({})


# --- the real command line and Celery app: exit 2, one line, nothing written ------------------------

REAL_RUNS = [
    (["session-sync", "status"], "SESSION_SYNC_SWEEP_PERIOD", "0"),
    (["session-sync", "sweep", "--once"], "SESSION_SYNC_OUTBOX_PERIOD", "-00:00:10"),
    (["session-sync", "status", "--json"], "SESSION_SYNC_CHECK_INTERVAL", "99999999999999d"),
    (["session-sync", "db", "upgrade"], "DATABASE_URL", "sqlite"),
    (["session-sync", "logout", "--session", "1"], "SESSION_SYNC_ENCRYPTION_KEYS", "k" * 44),
    (["session-sync", "outbox"], "SESSION_SYNC_HTTP_TIMEOUT", "inf"),
    (["session-sync", "resync", "--all"], "CELERY_BROKER_URL", "nonsense"),
    (["celery", "-A", "worker", "status"], "SESSION_SYNC_METRICS_HOST", "not a host"),
]


def test_commands_stop_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    # Given one malformed setting each, in an empty working directory, When operators start commands
    runs = []
    for argv, alias, value in REAL_RUNS:
        workdir = tmp_path / alias
        workdir.mkdir()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), "SESSION_SYNC_ENCRYPTION_KEYS": KEY}
        proc = subprocess.Popen(
            [str(harness.BIN / argv[0]), *argv[1:]],
            env=env | {alias: value},
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((alias, workdir, proc))
    for alias, workdir, proc in runs:
        out, err = proc.communicate(timeout=90)
        # Then each exits 2 with exactly one line on stderr naming the variable, and writes nothing
        assert proc.returncode == 2, (alias, out, err)
        [line] = err.strip().splitlines()
        assert line.startswith(f"session-sync: configuration error: {alias}: "), line
        assert out == ""
        assert list(workdir.iterdir()) == [], alias
