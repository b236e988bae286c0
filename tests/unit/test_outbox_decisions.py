"""The outbox's decisions, as a table of examples and as properties over every event, result and time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import outbox_decisions as od

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = od.Policy()
OUT = od.Outcome


def fresh(attempts: int = 0, age: timedelta = timedelta(0)) -> od.EventFacts:
    return od.EventFacts(attempts=attempts, created_at=NOW - age)


@pytest.mark.parametrize(
    ("event", "result", "action", "attempts"),
    [
        (fresh(), od.Result(outcome=OUT.LOGGED_OUT), od.Action.DELIVERED, 1),
        (fresh(3), od.Result(outcome=OUT.ALREADY), od.Action.DELIVERED, 4),
        (fresh(24, timedelta(days=9)), od.Result(outcome=OUT.ALREADY), od.Action.DELIVERED, 25),
        (fresh(), od.Result(outcome=OUT.FAILED, error="AuthnUnavailable: HTTP 500"), od.Action.RETRY, 1),
        (fresh(), od.Result(outcome=OUT.FAILED, retry_after=30), od.Action.RETRY, 1),
        (fresh(24), od.Result(outcome=OUT.FAILED), od.Action.DEAD, 25),
        (fresh(0, timedelta(days=1)), od.Result(outcome=OUT.FAILED), od.Action.DEAD, 1),
        (fresh(5), od.Result(outcome=OUT.REJECTED_US), od.Action.PAUSE, 5),
        (fresh(24, timedelta(days=9)), od.Result(outcome=OUT.REJECTED_US), od.Action.PAUSE, 24),
        (fresh(), od.Result(outcome=OUT.REFUSED, error="AuthnRequestRejected: ValidationError"), od.Action.DEAD, 1),
    ],
)
def test_decision_table(event: od.EventFacts, result: od.Result, action: od.Action, attempts: int) -> None:
    decision = od.decide(event, result, NOW, POLICY, random.Random(1))
    assert (decision.action, decision.attempts) == (action, attempts)


def test_dead_letters_say_why() -> None:
    # Given an event that failed for the last time, by attempts and by age
    failed = od.Result(outcome=OUT.FAILED, error="AuthnUnavailable: /v2/session/logout: HTTP 503")
    by_attempts = od.decide(fresh(24), failed, NOW, POLICY, random.Random(1))
    by_age = od.decide(fresh(2, timedelta(days=2)), failed, NOW, POLICY, random.Random(1))
    # Then the reason and the last error are both in it
    assert by_attempts.error == "gave up after 25 attempts; last error: AuthnUnavailable: /v2/session/logout: HTTP 503"
    assert by_age.error == "gave up: too old; last error: AuthnUnavailable: /v2/session/logout: HTTP 503"
    assert od.decide(fresh(), od.Result(outcome=OUT.FAILED, error="x" * 2000), NOW, POLICY, random.Random(1)).error == (
        "x" * (od.MAX_ERROR_LENGTH - 1) + "…"
    )


def test_the_default_backoff_steps() -> None:
    # The ceilings of the waits after 1, 2, ... failed attempts: 2 s doubling up to the 10 min cap
    steps = [od.backoff_step(n, POLICY).total_seconds() for n in range(1, 12)]
    assert steps == [2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]


events = st.builds(
    od.EventFacts,
    attempts=st.integers(min_value=0, max_value=1000),
    created_at=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2026, 11, 28, 12), timezones=st.just(UTC)
    ),
)
results = st.builds(
    od.Result,
    outcome=st.sampled_from(od.Outcome),
    error=st.none() | st.text(max_size=800),
    retry_after=st.none() | st.floats(min_value=0, max_value=86400),
)
policies = st.builds(
    od.Policy,
    backoff_base=st.timedeltas(min_value=timedelta(milliseconds=1), max_value=timedelta(minutes=5)),
    backoff_cap=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(hours=6)),
    max_attempts=st.integers(min_value=1, max_value=100),
    max_age=st.timedeltas(min_value=timedelta(minutes=1), max_value=timedelta(days=30)),
)
seeds = st.integers(min_value=0, max_value=2**32)


@given(events, results, policies, seeds)
def test_every_decision_is_well_formed(event: od.EventFacts, result: od.Result, policy: od.Policy, seed: int) -> None:
    decision = od.decide(event, result, NOW, policy, random.Random(seed))
    # Pending again means a time in the future; delivered and dead need none
    if decision.action in (od.Action.RETRY, od.Action.PAUSE):
        assert decision.next_attempt_at is not None and decision.next_attempt_at > NOW
    else:
        assert decision.next_attempt_at is None
    # An error is kept only when something went wrong, and it is short
    assert (decision.error is None) == (decision.action is od.Action.DELIVERED)
    assert decision.error is None or len(decision.error) <= od.MAX_ERROR_LENGTH


@given(events, results, policies, seeds)
def test_only_an_answer_delivers_and_only_our_token_spares_attempts(
    event: od.EventFacts, result: od.Result, policy: od.Policy, seed: int
) -> None:
    decision = od.decide(event, result, NOW, policy, random.Random(seed))
    assert (decision.action is od.Action.DELIVERED) == (result.outcome in (OUT.LOGGED_OUT, OUT.ALREADY))
    # Unauthorized is our fault: it never counts an attempt and never kills
    if result.outcome is OUT.REJECTED_US:
        assert decision.action is od.Action.PAUSE and decision.attempts == event.attempts
    else:
        assert decision.attempts == event.attempts + 1


@given(events, policies, seeds, st.none() | st.floats(min_value=0, max_value=86400))
def test_failures_retry_until_attempts_or_age_run_out(
    event: od.EventFacts, policy: od.Policy, seed: int, retry_after: float | None
) -> None:
    result = od.Result(outcome=OUT.FAILED, error="AuthnUnavailable", retry_after=retry_after)
    decision = od.decide(event, result, NOW, policy, random.Random(seed))
    exhausted = event.attempts + 1 >= policy.max_attempts or NOW - event.created_at >= policy.max_age
    assert decision.action is (od.Action.DEAD if exhausted else od.Action.RETRY)
    if decision.action is od.Action.DEAD:
        assert decision.error is not None and decision.error.startswith("gave up")


@given(st.integers(min_value=0, max_value=10_000), policies, seeds, st.none() | st.floats(min_value=0, max_value=86400))
def test_backoff_is_full_jitter_under_a_capped_step_and_never_before_retry_after(
    attempts: int, policy: od.Policy, seed: int, retry_after: float | None
) -> None:
    at = od.next_attempt_at(attempts, NOW, policy, random.Random(seed), retry_after)
    wait = at - NOW
    step = od.backoff_step(attempts, policy)
    assert step <= policy.backoff_cap
    assert wait >= od.MIN_WAIT
    if retry_after:
        assert wait >= timedelta(seconds=retry_after)
        assert wait <= max(step, timedelta(seconds=retry_after), od.MIN_WAIT)
    else:
        assert wait <= max(step, od.MIN_WAIT)


@given(st.integers(min_value=1, max_value=60), policies)
def test_backoff_steps_double_until_the_cap(attempts: int, policy: od.Policy) -> None:
    step, following = od.backoff_step(attempts, policy), od.backoff_step(attempts + 1, policy)
    assert following == min(step * 2, policy.backoff_cap) or following == policy.backoff_cap


def test_jitter_spreads_events_that_failed_together() -> None:
    # Given a thousand events that failed at the same moment for the fifth time
    rng = random.Random(7)
    times = [od.next_attempt_at(5, NOW, POLICY, rng) for _ in range(1000)]
    # Then their retries spread over the whole step instead of arriving as one stampede
    waits = sorted((t - NOW).total_seconds() for t in times)
    assert waits[0] < 2 and waits[-1] > 30 and len(set(waits)) > 950
