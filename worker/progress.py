"""Waiting for queued tasks from the command line: the task ids, progress on a terminal, a timeout that explains.

``resync --wait`` used to say "is one running?" when it gave up. Here it says what is still
queued or running, on which queue, and how many sessions were done, so an operator can tell a
missing worker (everything still PENDING: nothing consumes our queue) from a slow one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from worker import errors

#: How often the results are polled while waiting, in seconds.
POLL_EVERY = 0.5


def describe_pending(results: Sequence[Any], sizes: Sequence[int], *, queue: str) -> str:
    """What is still out: counts by state (PENDING: queued, STARTED: running), sessions, the first ids."""
    states: dict[str, int] = {}
    out: list[str] = []
    left = 0
    for result, size in zip(results, sizes, strict=True):
        if not result.ready():
            state = str(result.state)
            states[state] = states.get(state, 0) + 1
            out.append(str(result.id))
            left += size
    by_state = ", ".join(f"{n} {_WORDS.get(state, state)}" for state, n in sorted(states.items()))
    shown = ", ".join(out[:3]) + (", ..." if len(out) > 3 else "")
    hint = ""
    if states.get("PENDING") == len(out):
        hint = (
            f"; no worker took them from queue {queue!r}: is one consuming it? (celery -A worker inspect active_queues)"
        )
    return f"{len(out)} of {len(results)} tasks still out ({by_state}; {left} sessions): {shown}{hint}"


_WORDS = {"PENDING": "queued", "STARTED": "running", "RETRY": "retrying"}


def wait(
    results: Sequence[Any],
    sizes: Sequence[int],
    *,
    timeout: float,
    queue: str,
    show: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Any]:
    """Wait until every result is ready and return their values (a task's exception is raised as is).

    ``sizes`` is the number of sessions behind each result. ``show`` (a terminal) gets a progress
    line such as ``resync: 1500/5000 sessions, 3/10 batches`` whenever it changes.
    """
    deadline = clock() + timeout
    total = sum(sizes)
    last = ""
    while True:
        ready = [result.ready() for result in results]
        done = sum(size for size, is_ready in zip(sizes, ready, strict=True) if is_ready)
        line = f"resync: {done}/{total} sessions, {sum(ready)}/{len(results)} batches"
        if show is not None and line != last:
            show(line)
            last = line
        if all(ready):
            return [result.get(propagate=True, disable_sync_subtasks=False) for result in results]
        if clock() >= deadline:
            raise errors.WaitTimeout(describe_pending(results, sizes, queue=queue))
        sleep(POLL_EVERY)
