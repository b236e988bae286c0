"""The chaos soak's schedule: every fault and every user action of a run, drawn from one seed.

The plan is data, made before the run starts and printed with its seed, so a failing run replays
exactly: the same seed gives the same events at the same offsets, and each event's ``pick``
chooses its target from the test's own records (never from what the worker did), so the targets
are the same too. Only the timing of the worker's reactions differs from one replay to the next.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REFRESH = "/v2/client/session/refresh"
#: Revalidation paths (per token and in bulk) and the logout paths the outbox delivers on.
CHECKS = ["/v2/client/token/check", "/v2/session/list"]
LOGOUTS = ["/v2/client/session/logout", "/v2/session/logout"]

#: What the app and Pangea do while the faults run, with their weights (about 3 a second in all).
#: Endings balance logins (a user-wide ending ends one or two sessions), so however long the run,
#: the sessions stay about as many as at the start and keep being refreshed.
ACTIONS = {
    "login": 40,  # a user logs in (hosted page, userinfo exchange, record_login)
    "logout": 16,  # the app logs one session out (worker.sessions.logout)
    "logout_user": 2,  # the app logs a user out everywhere (worker.sessions.logout_user)
    "pangea_invalidate": 16,  # an admin ends one session at Pangea (/v2/session/invalidate)
    "pangea_logout_user": 2,  # an admin ends a user's sessions at Pangea (/v2/session/logout)
}
ACTIONS_PER_SECOND = 3.0
#: Pangea's failure modes, as ``/emulator/faults`` takes them (latency may come on top of each).
PANGEA_FAULTS = ("InternalError", "TooManyRequests", "Timeout", "Dropped", "Malformed", None)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happens ``at`` seconds into the run; ``pick`` selects its target."""

    at: float
    kind: str
    pick: int = 0
    #: How long a process stays down, or a Pangea fault window lasts (seconds).
    lasts: float = 0.0
    #: For ``pangea_faults``: the body for ``POST /emulator/faults``.
    faults: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = f" for {self.lasts:.1f}s" if self.lasts else ""
        shown = f" {self.faults}" if self.faults else ""
        return f"{self.at:7.2f}s {self.kind}{extra}{shown}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Every event of one run, by time."""

    seed: int
    seconds: float
    events: tuple[Event, ...]

    def summary(self) -> str:
        counts = Counter(e.kind for e in self.events)
        return " ".join(f"{kind}={n}" for kind, n in sorted(counts.items()))


def make(seed: int, seconds: float, *, workers: int, postgres: bool = False, faults: bool = True) -> Plan:
    """The plan for a run of ``seconds`` with ``workers`` worker processes.

    ``postgres`` adds PostgreSQL restarts; ``faults=False`` keeps only the users and admins (a calm
    run, for tests whose trouble is elsewhere, such as skewed clocks).
    """
    rng = random.Random(seed)
    events = _actions(rng, seconds)
    if faults:
        events += [*_pangea_windows(rng, seconds), *_processes(rng, seconds, workers, postgres)]
    return Plan(seed=seed, seconds=seconds, events=tuple(sorted(events, key=lambda e: e.at)))


def _actions(rng: random.Random, seconds: float) -> list[Event]:
    kinds, weights = list(ACTIONS), list(ACTIONS.values())
    events, at = [], rng.expovariate(ACTIONS_PER_SECOND)
    while at < seconds:
        events.append(Event(at, rng.choices(kinds, weights)[0], pick=rng.randrange(1 << 30)))
        at += rng.expovariate(ACTIONS_PER_SECOND)
    return events


def _pangea_windows(rng: random.Random, seconds: float) -> list[Event]:
    """Back-to-back windows of one fault each (the emulator holds one at a time), with calm gaps.

    The kinds come round in shuffled cycles, so even a one-minute run meets every one of them.
    """
    events, at, kinds = [], rng.uniform(2, 5), list[str | None]()
    while at < seconds - 3:
        if not kinds:
            kinds = list(PANGEA_FAULTS)
            rng.shuffle(kinds)
        lasts = min(rng.uniform(4, 9), seconds - at)
        events.append(Event(at, "pangea_faults", lasts=lasts, faults=_one_fault(rng, kinds.pop())))
        at += lasts + rng.choice([0.0, 0.0, rng.uniform(1, 3)])
    return events


def _one_fault(rng: random.Random, error: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if error == "TooManyRequests":
        # Throttled and slow, as in issue #12: each refresh may wait out a Retry-After inside the call
        body |= {"latency_ms": rng.choice([500, 700, 900]), "retry_after": rng.choice([3, 5])}
    elif (latency := rng.choice([0, 0, 150, 400, 800, 1500])) or error is None:
        body["latency_ms"] = latency or rng.choice([400, 700, 1500])
    if error is not None:
        body["error"] = error
        body["error_rate"] = round(rng.uniform(0.3, 0.8), 2)
    scope = rng.choice(["all", "all", "refresh", "checks", "logouts"])
    if scope != "all":
        body["paths"] = {"refresh": [REFRESH], "checks": CHECKS, "logouts": LOGOUTS}[scope]
    return body


def _processes(rng: random.Random, seconds: float, workers: int, postgres: bool) -> list[Event]:
    """Worker and beat SIGKILLs, Redis killed (back empty), PostgreSQL restarted: overlapping at will."""
    events = [
        Event(rng.uniform(3, seconds - 3), "kill_worker", pick=rng.randrange(workers), lasts=rng.uniform(0.5, 5))
        for _ in range(max(2, round(seconds / 12)))
    ]
    events += [
        Event(rng.uniform(3, seconds - 3), "kill_beat", lasts=rng.uniform(1, 6))
        for _ in range(max(1, round(seconds / 60)))
    ]
    events += [
        Event(rng.uniform(3, seconds - 6), "kill_redis", lasts=rng.uniform(1.5, 5))
        for _ in range(max(1, round(seconds / 30)))
    ]
    if postgres:
        events += [
            Event(rng.uniform(5, seconds - 6), "restart_postgres", lasts=rng.uniform(1, 3))
            for _ in range(max(1, round(seconds / 60)))
        ]
    return events
