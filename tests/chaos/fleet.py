"""The processes a soak runs and breaks: ``celery -A worker worker`` processes, one ``celery -A worker beat``.

Each worker has a slot with its own environment on top of the shared one (the skewed-clock test
runs a slot under libfaketime), so a killed worker comes back as the same kind of worker.
Killing a slot that is already down does nothing; a restart waits until the worker is ready.
A worker refuses to start while the database is unreachable (it exits at once, saying so), so a
restart that falls in a PostgreSQL restart is tried again a second later, as a supervisor
(systemd's ``Restart=on-failure``, Kubernetes) would; ``refused_starts`` counts those.
"""

from __future__ import annotations

import functools
import glob
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.acceptance import harness

#: Each worker process: a prefork pool of two, as an operator would run several on a host.
WORKER_ARGS = ("--pool=prefork", "--concurrency=2")


def faketime_env(offset: str) -> dict[str, str]:
    """Environment that runs a process ``offset`` (``+5m``, ``-5m``) off the real clock (libfaketime).

    The same library the ``faketime`` command preloads. Monotonic clocks stay true: a negative
    offset larger than the uptime would otherwise make them negative, which no program expects.
    """
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not found:
        raise FileNotFoundError("libfaketime is not installed (apt-get install faketime)")
    return {"LD_PRELOAD": found[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


class Fleet:
    """Worker slots and a beat, on ``env``; each slot may add its own environment."""

    def __init__(self, env: Mapping[str, str], workdir: Path, slots: Sequence[Mapping[str, str]]) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.slots = [dict(s) for s in slots]
        self.workers: list[harness.WorkerProcess | None] = [None] * len(slots)
        self.beat: harness.WorkerProcess | None = None
        self.kills = {"worker": 0, "beat": 0}
        self.refused_starts = 0
        #: Processes found not running at the heal: a restart that failed, or one that exited on its own
        #: (Celery 5.7 can, when Redis goes away under it); a supervisor would have started them again.
        self.found_down = 0
        self._locks = [threading.Lock() for _ in slots]
        self._beat_lock = threading.Lock()

    def start(self) -> None:
        """Every worker and the beat, started side by side (each takes seconds to be ready)."""
        threads = [threading.Thread(target=self.start_worker, args=(i,)) for i in range(len(self.slots))]
        for thread in threads:
            thread.start()
        self.start_beat()
        for thread in threads:
            thread.join()

    def start_worker(self, slot: int) -> None:
        workdir = self.workdir / f"w{slot}"
        workdir.mkdir(exist_ok=True)
        env = self.env | self.slots[slot]
        self.workers[slot] = harness.start_worker(env, workdir, *WORKER_ARGS, name=f"w{slot}-{self.kills['worker']}")

    def start_beat(self) -> None:
        workdir = self.workdir / "beat"
        workdir.mkdir(exist_ok=True)
        log = workdir / f"beat-{self.kills['beat']}.log"
        argv = [str(harness.BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO", "-s", str(workdir / "schedule")]
        full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), "PYTHONUNBUFFERED": "1", **self.env}
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=full_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        beat = harness.WorkerProcess(proc, log)
        harness.wait_for(lambda: "beat: Starting" in beat.output() or proc.poll() is not None, timeout=60, what="beat")
        if proc.poll() is not None:
            raise RuntimeError(f"beat exited with {proc.returncode}:\n{beat.output()[-4000:]}")
        self.beat = beat

    def kill_worker(self, slot: int, down: float, stop: threading.Event) -> None:
        """SIGKILL a worker (pool and all), keep it down for ``down`` seconds, start it again."""
        if not self._locks[slot].acquire(blocking=False):
            return  # already down: this kill found nothing to kill
        try:
            worker = self.workers[slot]
            if worker is not None:
                worker.kill(signal.SIGKILL)
            self.kills["worker"] += 1
            stop.wait(down)
            self._supervised(functools.partial(self.start_worker, slot))
        finally:
            self._locks[slot].release()

    def kill_beat(self, down: float, stop: threading.Event) -> None:
        """SIGKILL the beat, keep it down for ``down`` seconds, start it again."""
        with self._beat_lock:
            if self.beat is not None:
                self.beat.kill(signal.SIGKILL)
            self.kills["beat"] += 1
            stop.wait(down)
            self._supervised(self.start_beat)

    def _supervised(self, start: Callable[[], None], *, attempts: int = 60) -> None:
        """Start a process, again a second later while it refuses to (the database is restarting)."""
        for attempt in range(attempts):
            try:
                start()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.refused_starts += 1
                time.sleep(1)

    def ensure_up(self) -> None:
        """Start any worker or beat that is not running (a restart that failed under the faults)."""
        for slot, worker in enumerate(self.workers):
            if worker is None or worker.proc.poll() is not None:
                self.found_down += 1
                self._supervised(functools.partial(self.start_worker, slot))
        if self.beat is None or self.beat.proc.poll() is not None:
            self.found_down += 1
            self._supervised(self.start_beat)

    def stop(self) -> None:
        """Warm shutdown of every process at once (SIGTERM: running tasks finish, answers are stored).

        The signal goes to each main process only: Celery's warm shutdown lets the pool children
        finish their tasks, while a SIGTERM to the whole process group would end the children mid-task
        (a refresh performed at Pangea, its answer never stored: an orphan the judging would count).
        """
        procs = [p for p in [*self.workers, self.beat] if p is not None]
        threads = [threading.Thread(target=_warm_stop, args=(p,)) for p in procs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def close(self) -> None:
        for proc in [*self.workers, self.beat]:
            if proc is not None:
                proc.kill(signal.SIGKILL)


def _warm_stop(process: harness.WorkerProcess, timeout: float = 60) -> None:
    """SIGTERM to the main process, then SIGKILL to the group if it has not finished within ``timeout``."""
    if process.proc.poll() is None:
        try:
            os.kill(process.proc.pid, signal.SIGTERM)
            process.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    process.kill(signal.SIGKILL)  # whatever is left of the group (a child that outlived its parent)
