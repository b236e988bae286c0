"""Real processes for acceptance tests: a ``celery -A worker worker`` subprocess and its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """A Celery worker running in its own process group, logging to a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        """Everything the worker logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the main process and its pool children, even if the main one died)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_worker(env: Mapping[str, str], workdir: Path, *args: str, name: str = "worker") -> WorkerProcess:
    """Start ``celery -A worker worker`` with ``env`` and wait until it is ready to take tasks."""
    log = workdir / f"{name}.log"
    argv = [str(BIN / "celery"), "-A", "worker", "worker", "--loglevel=INFO", f"--hostname={name}@%h", *args]
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), "PYTHONUNBUFFERED": "1", **env}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=full_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = WorkerProcess(proc, log)
    wait_for(lambda: "ready." in worker.output() or proc.poll() is not None, timeout=60, what="worker ready")
    if proc.poll() is not None:
        raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker.output()[-4000:]}")
    return worker


@contextmanager
def running_worker(env: Mapping[str, str], workdir: Path, *args: str, name: str = "worker") -> Iterator[WorkerProcess]:
    """A worker for the duration of the block; killed (group and all) whatever happens."""
    worker = start_worker(env, workdir, *args, name=name)
    try:
        yield worker
    finally:
        worker.kill(signal.SIGTERM)


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, every: float = 0.2) -> float:
    """Poll until ``condition()`` holds; returns the seconds it took, or raises TimeoutError naming ``what``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def run_cli(
    env: Mapping[str, str], workdir: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``session-sync ARGS`` as an operator would."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), **env}
    return subprocess.run(
        [str(BIN / "session-sync"), *args], cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_cli_celery(
    env: Mapping[str, str], workdir: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A worker ARGS`` (inspect, purge, ...) as an operator would."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), **env}
    return subprocess.run(
        [str(BIN / "celery"), "-A", "worker", *args],
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
