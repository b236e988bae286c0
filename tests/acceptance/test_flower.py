"""Flower against a live worker on Redis and PostgreSQL: support staff resync everything through its API.

A real ``celery -A worker worker -B`` and a real ``celery -A worker flower --basic-auth=...``, both
subprocesses. Flower must see the worker, refuse its API without credentials, apply
``session_sync.resync`` with no arguments (everything, fanned out as batches) and report the counts,
and list the tasks by their readable names with ids and counts only: no token anywhere in what it shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance import harness
from tests.acceptance.test_worker import worker_env
from tests.conftest import RunningEmulator, free_port
from tests.helpers import active_token, login, row
from worker import runtime, task_names
from worker.settings import Settings

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

AUTH = ("support", "s3cret-for-tests")


@contextmanager
def running_flower(env: dict[str, str], workdir: Path, port: int) -> Iterator[harness.WorkerProcess]:
    """``celery -A worker flower`` with basic auth on ``port``; killed (group and all) whatever happens."""
    log = workdir / "flower.log"
    argv = [
        str(harness.BIN / "celery"),
        "-A",
        "worker",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth={AUTH[0]}:{AUTH[1]}",
    ]
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), "PYTHONUNBUFFERED": "1", **env}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=full_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    flower = harness.WorkerProcess(proc, log)
    try:
        yield flower
    finally:
        flower.kill(signal.SIGTERM)


def get(base: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{base}{path}", auth=AUTH, timeout=10, **kwargs)


def answers(base: str) -> bool:
    try:
        return get(base, "/healthcheck").status_code == 200
    except httpx.TransportError:
        return False


def test_support_resyncs_everything_from_flower(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    # (beat sweeps every second, but nothing falls due within the test: only the resync checks)
    env = worker_env(pg_url, redis_url, emu, SESSION_SYNC_CHECK_INTERVAL="1h", SESSION_SYNC_METRICS_PORT="0")
    rt = runtime.Runtime(Settings.from_env(env))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        # Given five sessions, one killed at Pangea, and their secrets and user ids (Flower must show none)
        ids = [login(rt, emu, f"flower{i}@example.com") for i in range(5)]
        rows = [row(rt, i) for i in ids]
        secrets = [active_token(rt, i) for i in ids] + [emu.service_token, env["SESSION_SYNC_ENCRYPTION_KEYS"]]
        secrets += [rt.cipher.decrypt(r.refresh_token_enc) for r in rows if r.refresh_token_enc]
        secrets += [r.active_token_enc for r in rows] + [r.user_id for r in rows]
        rt.run(rt.client.session_invalidate(row(rt, ids[0]).pangea_session_id or ""))

        # ... a worker with beat, and Flower watching it
        with (
            harness.running_worker(env, tmp_path, "-B", "--concurrency=2", name="flowered") as worker,
            running_flower(env, tmp_path, port) as flower,
        ):
            harness.wait_for(lambda: answers(base), timeout=30, what="Flower to answer")
            harness.wait_for(
                lambda: any(name.startswith("flowered@") for name in get(base, "/api/workers?refresh=1").json()),
                timeout=30,
                what="Flower to see the worker",
            )

            # When someone without credentials tries the API
            anonymous = httpx.post(f"{base}/api/task/async-apply/{task_names.RESYNC}", json={}, timeout=10)
            listing = httpx.get(f"{base}/api/tasks", timeout=10)
            # Then Flower refuses
            assert (anonymous.status_code, listing.status_code) == (401, 401)

            # When support applies session_sync.resync with no arguments (everything)
            applied = httpx.post(f"{base}/api/task/async-apply/{task_names.RESYNC}", json={}, auth=AUTH, timeout=10)
            assert applied.status_code == 200, applied.text
            task_id = applied.json()["task-id"]

            # Then the task fans everything out as batches (one here: five sessions), as a sweep does
            def finished(task: str) -> dict[str, Any] | None:
                answer = get(base, f"/api/task/result/{task}").json()
                return answer if answer["state"] in ("SUCCESS", "FAILURE") else None

            harness.wait_for(lambda: finished(task_id) is not None, timeout=40, what="the resync to finish")
            result = finished(task_id)
            assert result is not None and result["state"] == "SUCCESS", (result, worker.output()[-3000:])
            assert result["result"] == {"batches": 1, "sessions": 5}

            # ... and Flower lists tasks by their readable names (beat's sweeps too), once events arrive
            def by_name() -> dict[str, list[str]]:
                found: dict[str, list[str]] = {}
                for tid, t in get(base, "/api/tasks").json().items():
                    found.setdefault(str(t.get("name")), []).append(tid)
                return found

            harness.wait_for(
                lambda: {task_names.RESYNC, task_names.RESYNC_BATCH, task_names.SWEEP} <= by_name().keys(),
                timeout=30,
                what="task events",
            )
            # ... where the batch reports the counts: five checked, the killed one revoked
            [batch_id] = by_name()[task_names.RESYNC_BATCH]
            harness.wait_for(lambda: finished(batch_id) is not None, timeout=40, what="the batch to finish")
            batch = finished(batch_id)
            assert batch is not None and batch["state"] == "SUCCESS", (batch, worker.output()[-3000:])
            counts = batch["result"]
            assert (counts["checked"], counts["revoked"], counts["failed"]) == (5, 1, 0), counts
            assert counts["revoked_by_reason"] == {"invalid_token": 1}
            tasks = get(base, "/api/tasks").text
            info = get(base, f"/api/task/info/{task_id}").json()
            assert info["name"] == task_names.RESYNC and info["state"] == "SUCCESS"
            assert info["args"] == "()" and info["kwargs"] == "{}"
            assert "'batches': 1" in info["result"]
            # ... where no token, ciphertext or key shows, in any task's args, kwargs or result
            shown = tasks + str(info) + get(base, "/api/workers").text
            assert not [s for s in secrets if s in shown]
            assert "gAAAA" not in shown
        assert "Unknown task" not in flower.output()
    finally:
        rt.close()
