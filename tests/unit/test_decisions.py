"""The decision table, as examples and as properties over every session, answer and time."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import decisions as d
from worker import wire

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = d.Policy()


def facts(**overrides: object) -> d.SessionFacts:
    base: dict[str, object] = {
        "active_expires_at": NOW + timedelta(hours=1),
        "active_issued_at": NOW - timedelta(hours=1),
        "refresh_expires_at": NOW + timedelta(days=1),
        "has_refresh_token": True,
        "failures": 0,
        "uncertain": False,
    }
    return d.SessionFacts(**(base | overrides))  # type: ignore[arg-type]


def valid(expires: datetime) -> d.Answer:
    return d.Answer(verdict=wire.Verdict.VALID, active_expires_at=expires)


INVALID = d.Answer(verdict=wire.Verdict.INVALID)
EXPIRED = d.Answer(verdict=wire.Verdict.EXPIRED)


@pytest.mark.parametrize(
    ("session", "answer", "action", "reason"),
    [
        (facts(), valid(NOW + timedelta(hours=1)), d.Action.KEEP, None),
        (facts(), valid(NOW + timedelta(seconds=30)), d.Action.REFRESH, None),
        (facts(has_refresh_token=False), valid(NOW + timedelta(seconds=30)), d.Action.KEEP, None),
        (facts(), EXPIRED, d.Action.REFRESH, None),
        (facts(refresh_expires_at=NOW - timedelta(seconds=1)), EXPIRED, d.Action.REVOKE, "expired"),
        (facts(has_refresh_token=False, uncertain=True), EXPIRED, d.Action.REVOKE, "refresh_lost"),
        (facts(), INVALID, d.Action.REVOKE, "invalid_token"),
        (facts(), d.Answer.failed(d.Failure.UNAVAILABLE), d.Action.KEEP, None),
        (facts(), d.Answer.failed(d.Failure.PROTOCOL), d.Action.KEEP, None),
        (facts(), d.Answer.failed(d.Failure.RATE_LIMITED, retry_after=30), d.Action.KEEP, None),
        (facts(), d.Answer.failed(d.Failure.REJECTED_US), d.Action.STOP, None),
    ],
)
def test_after_check_table(session: d.SessionFacts, answer: d.Answer, action: d.Action, reason: str | None) -> None:
    decision = d.after_check(session, answer, NOW, POLICY, random.Random(1))
    assert (decision.action, decision.reason) == (action, reason)


@pytest.mark.parametrize(
    ("session", "answer", "action", "reason"),
    [
        (facts(), valid(NOW + timedelta(hours=2)), d.Action.KEEP, None),
        (facts(), EXPIRED, d.Action.REVOKE, "expired"),
        (facts(), INVALID, d.Action.REVOKE, "refresh_invalid"),
        (facts(uncertain=True), INVALID, d.Action.KEEP, None),
        (facts(uncertain=True, active_expires_at=NOW - timedelta(seconds=1)), INVALID, d.Action.REVOKE, "refresh_lost"),
        (facts(), d.Answer.failed(d.Failure.OUTCOME_UNKNOWN), d.Action.KEEP, None),
        (facts(), d.Answer.failed(d.Failure.UNAVAILABLE), d.Action.KEEP, None),
        (facts(), d.Answer.failed(d.Failure.REJECTED_US), d.Action.STOP, None),
    ],
)
def test_after_refresh_table(session: d.SessionFacts, answer: d.Answer, action: d.Action, reason: str | None) -> None:
    decision = d.after_refresh(session, answer, NOW, POLICY, random.Random(1))
    assert (decision.action, decision.reason) == (action, reason)


def test_lost_refresh_marks_uncertain_and_rechecks_soon() -> None:
    decision = d.after_refresh(facts(), d.Answer.failed(d.Failure.OUTCOME_UNKNOWN), NOW, POLICY, random.Random(1))
    assert decision.uncertain and decision.next_check_at is not None
    assert decision.next_check_at - NOW <= POLICY.refresh_cooloff


def test_spent_refresh_token_after_a_lost_refresh_is_forgotten_not_revoked() -> None:
    decision = d.after_refresh(facts(uncertain=True), INVALID, NOW, POLICY, random.Random(1))
    assert decision.drop_refresh_token and decision.next_check_at is not None
    assert decision.next_check_at <= NOW + timedelta(hours=1)


@pytest.mark.parametrize(
    ("session", "settled", "answer", "action", "drops"),
    [
        # The list still shows our active token: the refresh never happened, send it now
        (facts(uncertain=True), d.Settled.UNSPENT, valid(NOW + timedelta(hours=1)), d.Action.REFRESH, False),
        # Another token, or no session: the refresh token is spent; keep while our active token lives
        (facts(uncertain=True), d.Settled.SPENT, d.Answer(), d.Action.KEEP, True),
        # ... and once it has lapsed there is nothing left to keep the session on
        (facts(uncertain=True, active_expires_at=NOW), d.Settled.SPENT, d.Answer(), d.Action.REVOKE, False),
        # No answer from the list: back off, refresh nothing, revoke nothing
        (facts(uncertain=True), None, d.Answer.failed(d.Failure.UNAVAILABLE), d.Action.KEEP, False),
        (facts(uncertain=True), None, d.Answer.failed(d.Failure.REJECTED_US), d.Action.STOP, False),
    ],
)
def test_an_uncertain_refresh_is_settled_before_its_token_is_sent_again(
    session: d.SessionFacts, settled: d.Settled | None, answer: d.Answer, action: d.Action, drops: bool
) -> None:
    decision = d.after_settling(session, settled, answer, NOW, POLICY, random.Random(1))
    assert decision.action is action and decision.drop_refresh_token is drops
    if action is d.Action.KEEP:
        assert decision.next_check_at is not None and decision.next_check_at <= session.active_expires_at
        assert decision.uncertain
    if action is d.Action.REVOKE:
        assert decision.reason == "refresh_lost"


def test_sessions_minted_together_refresh_apart() -> None:
    # Given a thousand sessions with the same expiry, when each plans its refresh
    rng = random.Random(7)
    same = facts(active_expires_at=NOW + timedelta(minutes=30), active_issued_at=NOW - timedelta(minutes=30))
    times = {d.refresh_due_at(same, POLICY, rng) for _ in range(1000)}
    # Then they spread over a quarter of the margin instead of landing on one instant
    assert len(times) > 900
    assert max(times) - min(times) > timedelta(minutes=1)


times = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC))
offsets = st.timedeltas(min_value=timedelta(days=-2), max_value=timedelta(days=2))
session_facts = st.builds(
    d.SessionFacts,
    active_expires_at=offsets.map(lambda o: NOW + o),
    active_issued_at=st.none() | offsets.map(lambda o: NOW - abs(o)),
    refresh_expires_at=st.none() | offsets.map(lambda o: NOW + o),
    has_refresh_token=st.booleans(),
    failures=st.integers(min_value=0, max_value=10_000),
    uncertain=st.booleans(),
)
failures = st.builds(
    d.Answer.failed,
    st.sampled_from([f for f in d.Failure if f is not d.Failure.REJECTED_US]),
    retry_after=st.none() | st.floats(min_value=0, max_value=3600),
)
policies = st.builds(
    d.Policy,
    check_interval=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(hours=1)),
    refresh_margin_fraction=st.floats(min_value=0, max_value=0.9),
)


@given(session_facts, failures, policies, st.integers())
def test_no_answer_never_revokes(session: d.SessionFacts, answer: d.Answer, policy: d.Policy, seed: int) -> None:
    for decide in (d.after_check, d.after_refresh):
        decision = decide(session, answer, NOW, policy, random.Random(seed))
        assert decision.action is d.Action.KEEP
        assert decision.failures == session.failures + 1
        assert decision.next_check_at is not None and decision.next_check_at > NOW
        if answer.retry_after is not None:
            assert decision.next_check_at >= NOW + timedelta(seconds=answer.retry_after)
        else:
            assert decision.next_check_at <= NOW + max(policy.backoff_cap, timedelta(seconds=1))


@given(session_facts, st.sampled_from(list(wire.Verdict)), offsets, policies, st.integers())
def test_only_invalid_or_expired_answers_revoke(
    session: d.SessionFacts, verdict: wire.Verdict, expiry: timedelta, policy: d.Policy, seed: int
) -> None:
    answer = d.Answer(verdict=verdict, active_expires_at=NOW + expiry)
    for decide in (d.after_check, d.after_refresh):
        decision = decide(session, answer, NOW, policy, random.Random(seed))
        if decision.action is d.Action.REVOKE:
            assert verdict in (wire.Verdict.INVALID, wire.Verdict.EXPIRED)
            assert decision.reason
        if decision.action is d.Action.KEEP:
            assert decision.next_check_at is not None and decision.next_check_at > NOW


@given(session_facts, policies, st.integers())
def test_valid_check_keeps_within_the_interval_or_refreshes(
    session: d.SessionFacts, policy: d.Policy, seed: int
) -> None:
    decision = d.after_check(session, valid(session.active_expires_at), NOW, policy, random.Random(seed))
    assert decision.action in (d.Action.KEEP, d.Action.REFRESH)
    if decision.action is d.Action.REFRESH:
        assert d.can_refresh(session, NOW)
    else:
        assert decision.next_check_at is not None
        assert decision.next_check_at <= NOW + max(policy.check_interval, policy.refresh_cooloff)


@given(session_facts, policies, st.integers())
def test_our_own_token_rejected_stops_and_changes_nothing(session: d.SessionFacts, policy: d.Policy, seed: int) -> None:
    answer = d.Answer.failed(d.Failure.REJECTED_US)
    for decide in (d.after_check, d.after_refresh):
        decision = decide(session, answer, NOW, policy, random.Random(seed))
        assert decision.action is d.Action.STOP and decision.failures == session.failures


@given(session_facts, failures, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3)), st.integers())
def test_staleness_revokes_only_when_fail_closed_and_past_the_limit(
    session: d.SessionFacts, answer: d.Answer, unverified_for: timedelta, seed: int
) -> None:
    from dataclasses import replace

    limit = timedelta(hours=1)
    stale = replace(session, verified_at=NOW - unverified_for)
    for fail_closed in (False, True):
        policy = d.Policy(max_unverified=limit, fail_closed=fail_closed)
        for decide in (d.after_check, d.after_refresh):
            decision = decide(stale, answer, NOW, policy, random.Random(seed))
            if fail_closed and unverified_for > limit:
                assert (decision.action, decision.reason) == (d.Action.REVOKE, "unverifiable")
            else:
                assert decision.action is d.Action.KEEP


@pytest.mark.parametrize(
    ("failure", "uncertain"),
    [
        (d.Failure.PROTOCOL, True),  # an answer we could not read may hide a performed refresh
        (d.Failure.UNAVAILABLE, True),
        (d.Failure.OUTCOME_UNKNOWN, True),
        (d.Failure.RATE_LIMITED, False),  # Pangea refused before acting
    ],
)
def test_a_failed_refresh_stays_uncertain_unless_pangea_refused_it(failure: d.Failure, uncertain: bool) -> None:
    decision = d.after_refresh(facts(), d.Answer.failed(failure), NOW, POLICY, random.Random(1))
    assert decision.action is d.Action.KEEP and decision.uncertain is uncertain


class _Draws(random.Random):
    """A random source that draws the same number every time: the jitter's extremes, on demand."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@given(
    session_facts,
    policies,
    st.timedeltas(min_value=timedelta(seconds=-3), max_value=timedelta(seconds=3)),
    st.sampled_from([0.0, 0.5, 1 - 2**-53]) | st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_a_calm_session_is_decided_as_the_full_rules_decide_it(
    session: d.SessionFacts, policy: d.Policy, slack: timedelta, draw: float
) -> None:
    # The sweep's fast path (worker.engine) decides a healthy session from calm_until alone: no draw,
    # no decision object. Around the edge (a check interval before calm_until, give or take the
    # slack), whatever the jitter draws, the full rules must say the same.
    healthy = replace(session, failures=0, uncertain=False)
    calm = d.calm_until(healthy.active_expires_at, healthy.active_issued_at, policy)
    for now in (calm - policy.check_interval + slack, calm + slack):
        if calm > now:  # not yet inside its margin: checked, never refreshed first
            assert d.before_check(healthy, now, policy, _Draws(draw)) is d.Action.KEEP
        if calm >= now + policy.check_interval:  # its expiry as stored: a routine keep, nothing to write
            decision = d.after_check(healthy, d.Answer(verdict=wire.Verdict.VALID), now, policy, _Draws(draw))
            assert d.is_routine(decision, healthy, now, policy)
            assert decision.active_expires_at == healthy.active_expires_at
            assert not decision.drop_refresh_token and decision.failures == 0


def test_calm_until_is_the_earliest_refresh_any_draw_plans() -> None:
    # A one-hour token (fraction 0.1: a six-minute margin, less up to a quarter of it at random)
    token = facts(active_issued_at=NOW, active_expires_at=NOW + timedelta(hours=1))
    calm = d.calm_until(token.active_expires_at, token.active_issued_at, POLICY)
    assert calm == NOW + timedelta(minutes=54)
    assert min(d.refresh_due_at(token, POLICY, _Draws(x)) for x in (0.0, 0.3, 0.99)) == calm
