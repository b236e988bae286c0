"""What to do with one logout after one delivery attempt: pure functions of the event, the result and the time.

Nothing here imports httpx, SQLAlchemy or Celery. ``worker.outbox`` makes the call, turns what
happened into a :class:`Result`, and applies the :class:`Decision` it gets back.

The table (also in the README)::

    what the delivery attempt got         decision
    ------------------------------------  ------------------------------------------------------------
    Success                               delivered (token erased)
    InvalidToken / ExpiredToken           delivered: the session was already logged out at Pangea
                                            (with a service token, only once /v2/session/invalidate
                                            by the session's id confirmed it: a lapsed active token
                                            does not mean a dead session)
    no answer (5xx, timeout, 429,         retry: attempts + 1, next attempt after an exponential backoff
      malformed body, undecryptable)        with full jitter and a cap, never before Retry-After;
                                            dead once attempts reach max_attempts or the event is
                                            older than max_age
    Unauthorized (our token is wrong)     pause: attempts unchanged, never dead, retry after ``pause``
    Pangea refused the request itself     dead at once: repeating the same request cannot succeed
      (ValidationError, NotFound, ...)
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

#: First backoff step; step n is ``base * 2**(n-1)``, and the wait is drawn uniformly from [0, step].
DEFAULT_BACKOFF_BASE = timedelta(seconds=2)
#: Longest backoff step (reached after about nine failed attempts with the default base).
DEFAULT_BACKOFF_CAP = timedelta(minutes=10)
#: Failed attempts after which an event becomes a dead letter (about 1.5 hours of retries on average).
DEFAULT_MAX_ATTEMPTS = 25
#: Age after which an event that fails again becomes a dead letter.
DEFAULT_MAX_AGE = timedelta(days=1)
#: How long delivery pauses when Pangea refuses our own token (an operator has to fix it).
DEFAULT_PAUSE = timedelta(minutes=1)
#: Shortest wait before any retry, so a failing event never spins.
MIN_WAIT = timedelta(milliseconds=100)
#: Longest text kept in ``last_error``.
MAX_ERROR_LENGTH = 500


class Outcome(enum.StrEnum):
    """What one delivery attempt got."""

    LOGGED_OUT = "logged_out"  #: Success: Pangea ended the session(s) now
    ALREADY = "already"  #: InvalidToken / ExpiredToken: nothing left to end at Pangea
    FAILED = "failed"  #: no usable answer (5xx, timeout, 429, malformed, cannot decrypt): try again
    REJECTED_US = "rejected_us"  #: Unauthorized: our PANGEA_AUTHN_TOKEN is wrong
    REFUSED = "refused"  #: Pangea refused this request for good (ValidationError, NotFound, ...)


class Action(enum.StrEnum):
    """What the delivery does with the event."""

    DELIVERED = "delivered"  #: mark delivered, erase the token
    RETRY = "retry"  #: back to pending, one more attempt counted, due at ``next_attempt_at``
    PAUSE = "pause"  #: back to pending, attempts unchanged, due at ``next_attempt_at``
    DEAD = "dead"  #: a dead letter with ``error``


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The knobs of backoff and dead letters."""

    backoff_base: timedelta = DEFAULT_BACKOFF_BASE
    backoff_cap: timedelta = DEFAULT_BACKOFF_CAP
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_age: timedelta = DEFAULT_MAX_AGE
    pause: timedelta = DEFAULT_PAUSE


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFacts:
    """What a decision needs to know about one outbox event."""

    attempts: int  #: attempts made before this one
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One delivery attempt's result; ``error`` says why it failed and never holds a token."""

    outcome: Outcome
    error: str | None = None
    retry_after: float | None = None
    #: Pangea's answer (valid | invalid | expired) when there was one, and its ``request_id``.
    verdict: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The decision: an action and the facts to write with it."""

    action: Action
    attempts: int
    next_attempt_at: datetime | None = None
    error: str | None = None


def backoff_step(attempts: int, policy: Policy) -> timedelta:
    """The ceiling of the wait after ``attempts`` failed attempts: ``base * 2**(attempts-1)``, capped."""
    exponent = min(max(attempts - 1, 0), 64)  # in float seconds: a timedelta would overflow first
    seconds = min(policy.backoff_base.total_seconds() * 2.0**exponent, policy.backoff_cap.total_seconds())
    return timedelta(seconds=seconds)


def next_attempt_at(
    attempts: int, now: datetime, policy: Policy, rng: random.Random, retry_after: float | None = None
) -> datetime:
    """When to try again after ``attempts`` failed attempts: full jitter under the step, never before Retry-After."""
    wait = backoff_step(attempts, policy) * rng.random()
    if retry_after is not None and retry_after > 0:
        wait = max(wait, timedelta(seconds=retry_after))
    return now + max(wait, MIN_WAIT)


def is_exhausted(attempts: int, created_at: datetime, now: datetime, policy: Policy) -> bool:
    """True when an event that just failed has had enough: too many attempts or too old."""
    return attempts >= policy.max_attempts or now - created_at >= policy.max_age


def decide(event: EventFacts, result: Result, now: datetime, policy: Policy, rng: random.Random) -> Decision:
    """The decision after one delivery attempt of ``event``."""
    attempts = event.attempts + 1
    error = clip(result.error) if result.error else None
    if result.outcome in (Outcome.LOGGED_OUT, Outcome.ALREADY):
        return Decision(action=Action.DELIVERED, attempts=attempts)
    if result.outcome is Outcome.REJECTED_US:
        # Our fault, not the event's: burn nothing, and never let it die of it.
        wait = policy.pause
        if result.retry_after is not None:
            wait = max(wait, timedelta(seconds=result.retry_after))
        return Decision(
            action=Action.PAUSE, attempts=event.attempts, next_attempt_at=now + wait, error=error or "Unauthorized"
        )
    if result.outcome is Outcome.REFUSED:
        return Decision(action=Action.DEAD, attempts=attempts, error=error or "refused by Pangea")
    error = error or "no answer from Pangea"
    if is_exhausted(attempts, event.created_at, now, policy):
        why = f"gave up after {attempts} attempts" if attempts >= policy.max_attempts else "gave up: too old"
        return Decision(action=Action.DEAD, attempts=attempts, error=clip(f"{why}; last error: {error}"))
    return Decision(
        action=Action.RETRY,
        attempts=attempts,
        next_attempt_at=next_attempt_at(attempts, now, policy, rng, result.retry_after),
        error=error,
    )


def clip(text: str) -> str:
    """``text`` cut to :data:`MAX_ERROR_LENGTH` characters."""
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"
