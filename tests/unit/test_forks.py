"""How many processes ``sweep --once`` takes, and where it refuses more (``worker.forks``)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import env_for
from worker import errors, forks
from worker.settings import Settings

PG = "postgresql://u@127.0.0.1:5432/db"


def _settings(url: str, **extra: str) -> Settings:
    return Settings.from_env(env_for(url, "http://127.0.0.1:9", token="pts_x", **extra))


def test_a_sweep_takes_the_cores_only_where_its_processes_share_one_rate_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(forks, "cores", lambda: 8)
    fast = {"SESSION_SYNC_RATE_LIMIT": "1000"}  # the rate is not the limit here (see below)
    assert forks.default_processes(_settings(PG, **fast)) == forks.MAX_DEFAULT  # the database holds the bucket
    redis = _settings(PG, CELERY_BROKER_URL="redis://127.0.0.1:6379/0", **fast)
    assert forks.default_processes(redis) == forks.MAX_DEFAULT
    monkeypatch.setattr(forks, "cores", lambda: 2)
    assert forks.default_processes(_settings(PG)) == 2
    # A bucket each would send the rate once per process; SQLite has one writer
    assert forks.default_processes(_settings(PG, SESSION_SYNC_RATE_LIMIT_STORE="local")) == 1
    assert forks.default_processes(_settings(f"sqlite:///{tmp_path / 'a.db'}")) == 1
    with pytest.raises(errors.ConfigError, match="each process the whole rate"):
        forks.check_processes(_settings(PG, SESSION_SYNC_RATE_LIMIT_STORE="local"), 2)
    forks.check_processes(_settings(PG, SESSION_SYNC_RATE_LIMIT_STORE="local"), 1)  # one is always fine


def test_a_sweep_takes_no_more_processes_than_the_rate_serves_within_a_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forks, "cores", lambda: 8)
    # The defaults: 4 batches of 500 in each process's hand, 100 requests/s, a 2-minute lease
    assert forks.default_processes(_settings(PG)) == 3
    # A slower rate: two processes would leave batches waiting on it past their lease
    assert forks.default_processes(_settings(PG, SESSION_SYNC_RATE_LIMIT="20")) == 1
    # A faster one, or smaller batches: the cores are the limit again
    assert forks.default_processes(_settings(PG, SESSION_SYNC_RATE_LIMIT="1000")) == forks.MAX_DEFAULT
    assert forks.default_processes(_settings(PG, SESSION_SYNC_BATCH_SIZE="100")) == forks.MAX_DEFAULT


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_the_cores_are_those_the_process_may_run_on() -> None:
    # A container's cpuset or `taskset -c 0` gives the process one core of the machine's
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        " from worker import forks; print(forks.cores())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"


def test_an_error_that_will_not_travel_is_sent_as_one_line_naming_it() -> None:
    class Local(Exception):  # defined in a function: pickle cannot find it again
        pass

    sent = pickle.loads(forks._pickled(Local("the disk\nis full")))
    assert isinstance(sent, errors.SessionSyncError)
    assert str(sent) == "Local: the disk"
