"""What to do with one local session: pure functions of the session, Pangea's answer and the time.

Nothing here imports httpx, SQLAlchemy or Celery. The engine gathers the facts, calls
:func:`after_check` or :func:`after_refresh`, and applies the :class:`Decision` it gets back.

The table (also in the README)::

    Pangea's answer                 decision
    ------------------------------  ---------------------------------------------------------------
    check: Success                  keep; record expiry; refresh now if inside the refresh margin
    check: ExpiredToken             refresh if the refresh token is alive, else revoke (expired)
    check: InvalidToken             revoke (invalid_token)
    refresh: Success                keep with the new tokens
    refresh: InvalidToken           revoke (refresh_invalid), unless the refresh before it was lost:
                                    then forget the spent refresh token and keep the session while
                                    its active token lives (revoked as refresh_lost when it lapses)
    refresh: ExpiredToken           revoke (expired)
    no answer for longer than       fail-open (default): keep, flagged stale for the app;
      max_unverified                  fail-closed: revoke (unverifiable)
    refresh: answer lost            keep, mark uncertain, re-check the active token soon
    before refreshing an uncertain  ask Pangea which active token the session carries now: ours
      session                         (the refresh never happened): refresh; another, or none
                                      (spent, or the session ended): never send that refresh
                                      token again; keep while the active token lives
    no answer (5xx, timeout, 429,   keep; count the failure; retry after a backoff with full jitter
      malformed body)                 (at least Retry-After)
    Unauthorized (our token)        stop the sweep; change nothing
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from worker import errors, wire


class Action(enum.StrEnum):
    """What the engine does with a session after an answer."""

    KEEP = "keep"  #: write the new facts (expiry, next check, failures) and leave it active
    REFRESH = "refresh"  #: call /v2/client/session/refresh next
    REVOKE = "revoke"  #: end the local session with ``reason``
    STOP = "stop"  #: our own credentials are wrong: change nothing, stop the sweep


class Failure(enum.StrEnum):
    """Why there was no answer from Pangea."""

    UNAVAILABLE = "unavailable"  #: timeout, connection error, 5xx
    RATE_LIMITED = "rate_limited"  #: 429 / TooManyRequests
    PROTOCOL = "protocol"  #: the body was not Pangea's envelope
    OUTCOME_UNKNOWN = "outcome_unknown"  #: a refresh may have happened but its answer was lost
    REJECTED_US = "rejected_us"  #: Unauthorized: our PANGEA_AUTHN_TOKEN is wrong


#: Shortest wait before looking at a session again, whatever else the plan says.
MIN_RECHECK = timedelta(seconds=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The tuning knobs the decisions depend on."""

    check_interval: timedelta = timedelta(minutes=5)
    refresh_margin_floor: timedelta = timedelta(minutes=2)
    refresh_margin_fraction: float = 0.1
    #: Share of the margin drawn at random and taken off it, so sessions minted together spread out.
    refresh_jitter: float = 0.25
    #: Wait before re-checking a session whose refresh answer was lost.
    refresh_cooloff: timedelta = timedelta(seconds=10)
    backoff_base: timedelta = timedelta(seconds=5)
    backoff_cap: timedelta = timedelta(minutes=5)
    #: How long a session may go without a verdict from Pangea before the staleness policy applies.
    max_unverified: timedelta | None = None
    #: Staleness policy: False keeps stale sessions (fail-open), True revokes them (fail-closed).
    fail_closed: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> Policy:
        """The policy from a ``worker.settings.Settings`` (duck-typed: this module imports no settings)."""
        return cls(
            check_interval=settings.check_interval,
            refresh_margin_floor=settings.refresh_margin_floor,
            refresh_margin_fraction=settings.refresh_margin_fraction,
            backoff_base=settings.backoff,
            backoff_cap=settings.backoff_cap,
            refresh_cooloff=settings.backoff * 2,
            max_unverified=settings.max_unverified,
            fail_closed=settings.stale_policy == "revoke",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFacts:
    """What a decision needs to know about one local session."""

    active_expires_at: datetime
    active_issued_at: datetime | None
    refresh_expires_at: datetime | None
    has_refresh_token: bool
    failures: int
    uncertain: bool
    #: When Pangea last answered for this session (or when it was recorded); None: unknown.
    verified_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """Pangea's answer to a check or a refresh: a verdict, or the failure that stood in for one."""

    verdict: wire.Verdict | None = None
    failure: Failure | None = None
    active_expires_at: datetime | None = None
    retry_after: float | None = None
    #: Pangea's ``request_id`` of the answer (or of the failed attempt), for the audit trail.
    request_id: str | None = None
    #: Pangea refused the request itself (ValidationError, NotFound, ...): the same request cannot succeed.
    #: The outbox dead-letters such a logout at once; a check keeps the session and tries again later.
    final: bool = False

    @classmethod
    def failed(cls, failure: Failure, *, retry_after: float | None = None, request_id: str | None = None) -> Answer:
        """No answer, for this reason."""
        return cls(failure=failure, retry_after=retry_after, request_id=request_id)


def failed(exc: errors.SessionSyncError) -> Answer:
    """The no-answer that an error from the tree stands for: the one mapping, for the sync engine and the outbox.

    Not an answer about a user's token (those are values, never errors), so nothing here may revoke.
    An error outside the AuthN branch (a token we cannot decrypt) counts as Pangea unavailable: retried.
    """
    retry_after = None
    if isinstance(exc, errors.AuthnRejectedUs):
        failure = Failure.REJECTED_US
    elif isinstance(exc, errors.AuthnRateLimited):
        failure, retry_after = Failure.RATE_LIMITED, exc.retry_after
    elif isinstance(exc, errors.AuthnOutcomeUnknown):
        failure = Failure.OUTCOME_UNKNOWN
    elif isinstance(exc, errors.AuthnProtocolError | errors.AuthnRequestRejected):
        failure = Failure.PROTOCOL
    else:
        failure = Failure.UNAVAILABLE
    request_id = exc.request_id if isinstance(exc, errors.AuthnError) else None
    final = isinstance(exc, errors.AuthnRequestRejected)
    return Answer(failure=failure, retry_after=retry_after, request_id=request_id, final=final)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome: an action, and the facts to write with it."""

    action: Action
    next_check_at: datetime | None = None
    failures: int = 0
    reason: str | None = None
    uncertain: bool = False
    active_expires_at: datetime | None = None
    #: The refresh token is known to be spent: forget it, so it is never tried again.
    drop_refresh_token: bool = False

    @property
    def counted_as(self) -> str:
        """The outcome name for counts and the audit trail (kept, refresh, revoked, failed, stopped)."""
        if self.action is Action.KEEP and self.failures:
            return "failed"
        return {Action.KEEP: "kept", Action.REFRESH: "refresh", Action.REVOKE: "revoked", Action.STOP: "stopped"}[
            self.action
        ]


def is_routine(decision: Decision, facts: SessionFacts, now: datetime, policy: Policy) -> bool:
    """Whether ``decision`` leaves the session as it was, on its group's schedule: nothing to write.

    Kept, healthy (no failure, no uncertain refresh, nothing to forget), its expiry as stored, and
    nothing due before the next check interval: its group's next round looks at it in time.
    """
    return (
        decision.action is Action.KEEP
        and decision.failures == 0
        and not decision.uncertain
        and not decision.drop_refresh_token
        and decision.next_check_at is not None
        and decision.next_check_at >= now + policy.check_interval
    )


def refresh_margin(facts: SessionFacts, policy: Policy, rng: random.Random) -> timedelta:
    """How long before expiry to refresh: max(floor, fraction of lifetime), less random jitter."""
    issued = facts.active_issued_at
    margin = _widest_margin(facts.active_expires_at - issued if issued is not None else None, policy)
    return timedelta(microseconds=margin * (1 - policy.refresh_jitter * rng.random()))


def _widest_margin(lifetime: timedelta | None, policy: Policy) -> float:
    """The refresh margin of a token of this ``lifetime`` (None: unknown) before jitter, in microseconds:
    the widest any draw can make it."""
    # In microseconds, as numbers: timedelta times a float is dearer, and this runs for every check.
    span = lifetime // _MICROSECOND if lifetime is not None else 0
    margin = max(policy.refresh_margin_floor // _MICROSECOND, span * policy.refresh_margin_fraction)
    # Never plan to refresh before the token was issued: short-lived tokens refresh at mid-life.
    if span > 0:
        margin = min(margin, span / 2)
    return float(margin)


def calm_until(expires_at: datetime, issued_at: datetime | None, policy: Policy) -> datetime:
    """Until when a healthy session (no failure, no uncertain refresh) needs nothing but its group's rounds.

    Its expiry less the widest refresh margin: no jitter draw puts its refresh earlier, so before
    then :func:`before_check` keeps it, and a check that finds its expiry unchanged is routine
    (:func:`is_routine`) once this is a check interval away. That is the sweep's fast path: a kept
    session that is calm for the next interval is decided with no draw and no object made for it
    (``worker.engine``; ``tests/unit/test_decisions.py`` proves it agrees with the full decision).
    """
    return CalmBounds(policy).until(expires_at, issued_at)


class CalmBounds:
    """:func:`calm_until` for many sessions under one policy, the widest margin kept per token lifetime.

    A batch's tokens are mostly minted alike, so the margin is worked out once per lifetime, not per
    session. Keep one for a batch: it holds every lifetime it was asked about.
    """

    __slots__ = ("_margins", "_policy")

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._margins: dict[timedelta | None, timedelta] = {}

    def until(self, expires_at: datetime, issued_at: datetime | None) -> datetime:
        """:func:`calm_until` of a session whose active token expires at ``expires_at``."""
        lifetime = expires_at - issued_at if issued_at is not None else None
        margin = self._margins.get(lifetime)
        if margin is None:
            margin = self._margins[lifetime] = timedelta(microseconds=_widest_margin(lifetime, self._policy))
        return expires_at - margin


_MICROSECOND = timedelta(microseconds=1)


def refresh_due_at(facts: SessionFacts, policy: Policy, rng: random.Random) -> datetime:
    """When the active token should be refreshed."""
    return facts.active_expires_at - refresh_margin(facts, policy, rng)


def can_refresh(facts: SessionFacts, now: datetime) -> bool:
    """True when the session holds a refresh token that has not expired."""
    return facts.has_refresh_token and (facts.refresh_expires_at is None or facts.refresh_expires_at > now)


def plan_next_check(facts: SessionFacts, now: datetime, policy: Policy, rng: random.Random) -> datetime:
    """The next time to look at a healthy session: the check interval, or the refresh time if sooner."""
    due = refresh_due_at(facts, policy, rng) if can_refresh(facts, now) else facts.active_expires_at
    planned: datetime = min(now + policy.check_interval, due)
    return max(planned, now + MIN_RECHECK)


def backoff(failures: int, now: datetime, policy: Policy, rng: random.Random, retry_after: float | None) -> datetime:
    """When to try again after ``failures`` consecutive failures: exponential, capped, full jitter."""
    step: timedelta = min(policy.backoff_base * 2 ** min(max(failures - 1, 0), 30), policy.backoff_cap)
    wait = step * rng.random()
    if retry_after is not None:
        wait = max(wait, timedelta(seconds=retry_after))
    return now + max(wait, timedelta(seconds=1))


def is_stale(facts: SessionFacts, now: datetime, policy: Policy) -> bool:
    """True when Pangea has not answered for this session for longer than ``max_unverified``."""
    if policy.max_unverified is None or facts.verified_at is None:
        return False
    return now - facts.verified_at > policy.max_unverified


def before_check(facts: SessionFacts, now: datetime, policy: Policy, rng: random.Random) -> Action:
    """Refresh straight away when the token is inside its margin (the refresh answers for it), else check."""
    if can_refresh(facts, now) and now >= refresh_due_at(facts, policy, rng):
        return Action.REFRESH
    return Action.KEEP


def after_check(facts: SessionFacts, answer: Answer, now: datetime, policy: Policy, rng: random.Random) -> Decision:
    """The decision after ``/v2/client/token/check`` (or the bulk list) answered, or failed to."""
    if answer.verdict is None:
        return _no_answer(facts, answer, now, policy, rng)
    if answer.verdict is wire.Verdict.INVALID:
        if facts.uncertain and not facts.has_refresh_token:
            # Kept after a refresh whose answer was lost (settling found its token spent): the session
            # is gone now, ended where its orphaned tokens were (by us, or by Pangea). Say so.
            return Decision(action=Action.REVOKE, reason="refresh_lost")
        return Decision(action=Action.REVOKE, reason="invalid_token")
    if answer.verdict is wire.Verdict.EXPIRED:
        if can_refresh(facts, now):
            return Decision(action=Action.REFRESH)
        return Decision(action=Action.REVOKE, reason="refresh_lost" if facts.uncertain else "expired")
    told = answer.active_expires_at
    # The routine case (the expiry Pangea tells is the one we hold) copies nothing: replace() is the
    # dearest call of a kept check after the database's.
    known = facts if told is None or told == facts.active_expires_at else replace(facts, active_expires_at=told)
    if can_refresh(known, now) and now >= refresh_due_at(known, policy, rng):
        return Decision(action=Action.REFRESH, active_expires_at=known.active_expires_at)
    return Decision(
        action=Action.KEEP,
        next_check_at=plan_next_check(known, now, policy, rng),
        uncertain=known.uncertain,
        active_expires_at=known.active_expires_at,
    )


def after_refresh(facts: SessionFacts, answer: Answer, now: datetime, policy: Policy, rng: random.Random) -> Decision:
    """The decision after ``/v2/client/session/refresh`` answered, or failed to.

    On Success the caller passes the *new* token's facts; ``next_check_at`` is planned from them.
    """
    if answer.verdict is wire.Verdict.VALID:
        fresh = replace(facts, uncertain=False, failures=0)
        return Decision(
            action=Action.KEEP,
            next_check_at=plan_next_check(fresh, now, policy, rng),
            active_expires_at=facts.active_expires_at,
        )
    if answer.verdict is wire.Verdict.EXPIRED:
        return Decision(action=Action.REVOKE, reason="expired")
    if answer.verdict is wire.Verdict.INVALID:
        if facts.uncertain and facts.active_expires_at > now:
            # Our earlier refresh may have spent this token. The active token still works: keep the
            # session until it lapses, checking it as usual, instead of revoking a live user.
            return Decision(
                action=Action.KEEP,
                next_check_at=min(now + policy.check_interval, facts.active_expires_at),
                uncertain=True,
                drop_refresh_token=True,
            )
        return Decision(action=Action.REVOKE, reason="refresh_lost" if facts.uncertain else "refresh_invalid")
    if answer.failure is Failure.OUTCOME_UNKNOWN and not (policy.fail_closed and is_stale(facts, now, policy)):
        wait = max(policy.refresh_cooloff, timedelta(seconds=answer.retry_after or 0))
        return Decision(action=Action.KEEP, next_check_at=now + wait, failures=facts.failures + 1, uncertain=True)
    decision = _no_answer(facts, answer, now, policy, rng)
    if decision.action is Action.KEEP and answer.failure not in _REFUSED:
        # A 5xx or an answer we could not read may stand in front of a refresh Pangea performed:
        # the refresh token may be spent, so it is settled before it is sent again.
        return replace(decision, uncertain=True)
    return decision


#: Failures that prove Pangea performed nothing: it refused the call before acting on it.
_REFUSED = frozenset({Failure.RATE_LIMITED, Failure.REJECTED_US})


class Settled(enum.StrEnum):
    """What Pangea's session list says about a refresh whose outcome we never learned."""

    #: The session still carries our active token: the refresh never happened, the token is unspent.
    UNSPENT = "unspent"
    #: It carries another active token, or is gone: our refresh token is spent (or dead).
    SPENT = "spent"
    #: It carried another active token (our lost refresh happened), and we ended it at Pangea: the
    #: tokens that refresh minted reached nobody, so no one may hold a live session through them.
    ORPHAN_ENDED = "orphan_ended"


def after_settling(
    facts: SessionFacts, settled: Settled | None, answer: Answer, now: datetime, policy: Policy, rng: random.Random
) -> Decision:
    """The decision for an ``uncertain`` session before its refresh token is sent again.

    A refresh token is one-time use: sending a spent one again is what Pangea (like any OAuth
    server) may treat as token theft. So an uncertain refresh is settled first, from the session
    list (``settled``; None when the list gave no answer, then ``answer`` says why).
    """
    if settled is Settled.UNSPENT:
        return Decision(action=Action.REFRESH)
    if settled is Settled.ORPHAN_ENDED:
        return Decision(action=Action.REVOKE, reason="refresh_lost")
    if settled is Settled.SPENT:
        if facts.active_expires_at > now:
            # The tokens the refresh minted never reached us; the active one we hold still works
            # until it lapses. Keep the session that long, checking it as usual.
            return Decision(
                action=Action.KEEP,
                next_check_at=max(min(now + policy.check_interval, facts.active_expires_at), now + MIN_RECHECK),
                uncertain=True,
                drop_refresh_token=True,
            )
        return Decision(action=Action.REVOKE, reason="refresh_lost")
    return _no_answer(facts, answer, now, policy, rng)


def _no_answer(facts: SessionFacts, answer: Answer, now: datetime, policy: Policy, rng: random.Random) -> Decision:
    if answer.failure is Failure.REJECTED_US:
        return Decision(action=Action.STOP, failures=facts.failures)
    if is_stale(facts, now, policy) and policy.fail_closed:
        return Decision(action=Action.REVOKE, reason="unverifiable")
    failures = facts.failures + 1
    return Decision(
        action=Action.KEEP,
        next_check_at=backoff(failures, now, policy, rng, answer.retry_after),
        failures=failures,
        uncertain=facts.uncertain or answer.failure is Failure.OUTCOME_UNKNOWN,
    )
