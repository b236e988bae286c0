"""One drain on several processes: ``sweep --once`` using the machine's cores, as a Celery worker would.

A drain is CPU-bound in one Python process long before Pangea or the database is the limit (its
decisions and row building hold the GIL). Workers already share due work through leases, so a
drain on N processes is N workers taking batches side by side: no session is taken twice, each
lane gives its work back if stopped, and a crashed process's work returns after its lease.

The processes are forked once the modules are imported (a spawned one would import them again,
half a second each), from a parent holding no connection: its pool is emptied first, so no
socket is shared. Each child builds its own :class:`~worker.runtime.Runtime` from the parent's
settings, drains, and sends back its counts or its error; the parent adds them up.

More than one process needs a rate limit the processes share (Redis or the database), else N
processes would each send the whole rate; SQLite's default, a local bucket and one writer, keeps
one process. :func:`default_processes` says how many a sweep takes when not told: the cores, up
to :data:`MAX_DEFAULT`, and no more than the shared rate serves within half a lease.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from worker import errors, ratelimit
from worker.counts import SyncCounts
from worker.runtime import Runtime
from worker.settings import Settings

logger = logging.getLogger(__name__)

#: The most processes a sweep takes of itself, however many cores: each opens its own database
#: pool and HTTP pool (``SESSION_SYNC_CONCURRENCY`` requests each). More with ``--processes``.
MAX_DEFAULT = 4

#: What a drain imports on its first request (httpx loads its transport lazily): imported by the
#: parent before it forks, once, rather than by every child.
_FIRST_REQUEST_IMPORTS = ("httpcore", "anyio._backends._asyncio")


def can_fork() -> bool:
    """Whether this platform forks processes (Linux; not Windows, and macOS only at its own risk)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def shares_rate_limit(settings: Settings) -> bool:
    """Whether every process draws on one rate limit (Redis or the database), not a bucket each."""
    return (settings.rate_limit_store or ratelimit.default_store(settings)) != "local"


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, ``taskset``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_processes(settings: Settings) -> int:
    """How many processes a sweep takes when not told: the cores, up to :data:`MAX_DEFAULT` and
    :func:`served_within_lease`.

    One where processes cannot share the work safely: SQLite (one writer), a local rate-limit
    bucket (N processes would send N times the rate), or a platform that does not fork.
    """
    if one_process_only(settings):
        return 1
    return max(1, min(cores(), MAX_DEFAULT, served_within_lease(settings)))


def served_within_lease(settings: Settings) -> int:
    """How many processes the shared rate serves within half a lease, at one request a session.

    Each process holds ``batches_in_flight`` batches of ``batch_size`` sessions, and they all wait
    on one rate limit: a batch that waits past its lease is taken again by another lane and its
    first checks are wasted. Per-token checks send one request a session (a bulk list one a batch),
    so this counts the worst case. The defaults (4 batches of 500, 100 requests/s, 2 min) give 3.
    """
    in_hand = settings.batches_in_flight * settings.batch_size
    return int(settings.rate_limit * settings.lease.total_seconds() / 2 // in_hand)


def one_process_only(settings: Settings) -> str | None:
    """Why a sweep with these settings must run in one process, in words; None when it may run on more."""
    if settings.is_sqlite:
        return "SQLite takes one writer: a sweep on it runs in one process"
    if not shares_rate_limit(settings):
        return (
            "a local rate-limit bucket (SESSION_SYNC_RATE_LIMIT_STORE=local) would give each process the whole "
            "rate: share it in Redis or the database, or sweep in one process"
        )
    if not can_fork():
        return f"{sys.platform} does not fork: a sweep here runs in one process"
    return None


def check_processes(settings: Settings, processes: int) -> None:
    """Refuse a number of processes that would break a promise, in words (a ConfigError)."""
    why = one_process_only(settings) if processes > 1 else None
    if why is not None:
        raise errors.ConfigError("--processes", why)


def drain(rt: Runtime, processes: int, *, confirm_revocations: bool = False) -> SyncCounts:
    """Drain every due batch on ``processes`` forked processes and add up their counts.

    Waits for every child even after one fails (none is cut short: its refreshes in flight finish),
    then raises the first failure as the child raised it. Interrupted (Ctrl-C, a signal) or unable
    to start them all, the parent stops the children it started (SIGTERM, as a killed one-process
    sweep stops: what they held returns after its lease) and waits for them before it raises; a
    parent killed outright takes them with it (:func:`_end_with`). Call it from the main thread.
    """
    if processes <= 1:
        return rt.run(rt.engine.drain(confirm_revocations=confirm_revocations))
    check_processes(rt.settings, processes)
    if "db_engine" in rt.__dict__:
        rt.db_engine.dispose()  # no pooled connection crosses the fork; the parent reconnects after
    for name in _FIRST_REQUEST_IMPORTS:
        importlib.import_module(name)
    ctx = multiprocessing.get_context("fork")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    total, failures = SyncCounts(), []
    try:
        for _ in range(processes):
            receive, send = ctx.Pipe(duplex=False)
            started = ctx.Process(target=_child, args=(os.getpid(), rt.settings, confirm_revocations, send))
            try:
                started.start()
            except OSError as exc:  # out of processes or memory
                raise errors.SessionSyncError(f"could not start a sweep process: {exc}") from exc
            finally:
                send.close()
            children.append((started, receive))
        for child, receive in children:
            outcome = _receive(receive)
            child.join()
            if isinstance(outcome, SyncCounts):
                total.add(outcome)
            else:
                failures.append(outcome if outcome else _died(child.exitcode))
    except BaseException:
        _stop(children)
        raise
    for failure in failures[1:]:
        logger.error("A sweep process also failed: %s: %s", type(failure).__name__, failure)
    if failures:
        raise failures[0]
    return total


def _stop(children: list[tuple[multiprocessing.process.BaseProcess, Connection]]) -> None:
    """SIGTERM to each child still running, then wait for them all."""
    for child, receive in children:
        receive.close()
        if child.is_alive():
            child.terminate()
    for child, _ in children:
        child.join()


def _child(parent: int, settings: Settings, confirm_revocations: bool, send: Connection) -> None:
    """In the child: a runtime of its own, one drain, its counts or its error sent to the parent.

    Never raises: whatever happens is what it sends (an error with its traceback as a note, for the
    parent to show if it is not one the CLI words itself), so no traceback of its own reaches stderr.
    """
    _end_with(parent)
    outcome: object
    try:
        rt = Runtime(settings)
        try:
            outcome = rt.run(rt.engine.drain(confirm_revocations=confirm_revocations))
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # done: a late Ctrl-C loses nothing
            _close(rt)
    except BaseException as exc:  # the parent raises it; KeyboardInterrupt included
        exc.add_note(f"in sweep process {os.getpid()}:\n{traceback.format_exc().rstrip()}")
        outcome = exc
    try:
        send.send_bytes(_pickled(outcome))
        send.close()
    except OSError:  # the parent is gone
        pass


def _close(rt: Runtime) -> None:
    try:
        rt.close()
    except Exception:
        logger.warning("A sweep process could not close its connections", exc_info=True)


def _end_with(parent: int) -> None:
    """Be sent SIGTERM when the parent ends (cron's timeout, an operator's kill), as its own work would
    stop: a stopped ``sweep --once`` leaves no process behind, and its leases lapse as they would."""
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        logger.warning("A sweep process will outlive its parent: prctl failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def _pickled(outcome: object) -> bytes:
    """``outcome`` pickled; an error that will not make the round trip goes as a SessionSyncError naming it."""
    try:
        pickled = pickle.dumps(outcome)
        pickle.loads(pickled)
        return pickled
    except Exception:
        said = (str(outcome).strip().splitlines() or [""])[0]
        return pickle.dumps(errors.SessionSyncError(f"{type(outcome).__name__}: {said}"))


def _receive(receive: Connection) -> Any:
    """What a child sent: its counts, its error, or None when it died before sending."""
    try:
        return pickle.loads(receive.recv_bytes())
    except EOFError:
        return None
    finally:
        receive.close()


def _died(exitcode: int | None) -> errors.SessionSyncError:
    """The error of a child that ended without a word (killed, or out of memory)."""
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    return errors.SessionSyncError(
        f"a sweep process ended without its counts ({how}); its work returns to the queue after its lease"
    )
