"""``resync --all`` on a real worker: one task per batch, the task ids printed, progress on a terminal,
and a timeout that says what is still out instead of "is one running?".
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import redis

from tests.acceptance import harness
from tests.conftest import RunningEmulator
from tests.helpers import env_for, login
from worker import runtime
from worker.settings import DEFAULT_QUEUE, Settings

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.redis]


def on_a_terminal(env: dict[str, str], workdir: Path, *args: str) -> tuple[int, str, str]:
    """Run ``session-sync ARGS`` with stderr on a pseudo-terminal, as an operator's shell has it."""
    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [str(harness.BIN / "session-sync"), *args],
        cwd=workdir,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), **env},
        stdout=subprocess.PIPE,
        stderr=secondary,
        text=True,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    out, _ = proc.communicate(timeout=120)
    os.close(primary)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_resync_all_fans_out_in_batches_with_progress(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    env = env_for(pg_url, emu, broker=redis_url, SESSION_SYNC_BATCH_SIZE="8")
    rt = runtime.Runtime(Settings.from_env(env))
    try:
        # Given 30 sessions, batches of 8, and no worker yet
        for i in range(30):
            login(rt, emu, f"u{i}@example.com")
    finally:
        rt.close()
    # When support resyncs everything and waits, on a terminal
    code, out, err = on_a_terminal(env, tmp_path, "resync", "--all", "--wait", "--timeout", "2s")
    # Then it printed the task ids, showed progress, and timed out saying what is still out and where
    assert code == 1, err
    assert "resync of 30 sessions queued as 4 tasks: " in err
    assert "resync: 0/30 sessions, 0/4 batches" in err
    assert "timed out after 2 s: 4 of 4 tasks still out (4 queued; 30 sessions)" in err
    assert f"no worker took them from queue '{DEFAULT_QUEUE}'" in err
    assert out == ""
    redis.Redis.from_url(redis_url).delete(DEFAULT_QUEUE)  # forget them: the next run is counted on its own

    # When a worker runs and support tries again
    with harness.running_worker(env, tmp_path, "--concurrency=2", name="w") as worker:
        code, out, err = on_a_terminal(env, tmp_path, "resync", "--all", "--wait", "--json", "--timeout", "1m")
        log = worker.output()
    # Then the counts cover every session, progress reached the end, and each task took one batch
    assert code == 0, err
    counts = json.loads(out)
    assert counts["checked"] == 30 and counts["sessions"] == 30 and counts["failed"] == 0
    assert "resync: 30/30 sessions, 4/4 batches" in err
    finished = [line for line in log.splitlines() if "Task session_sync.resync_batch[" in line and "succeeded" in line]
    assert len(finished) == 4, log[-3000:]
    assert sorted(int(line.split("'sessions': ")[1].split("}")[0].split(",")[0]) for line in finished) == [6, 8, 8, 8]
