"""The soak's schedule: one seed, one schedule, and even a short run meets every fault."""

from __future__ import annotations

from tests.chaos import plan


def test_the_same_seed_replays_the_same_schedule() -> None:
    # Given one seed, twice
    first, again = plan.make(7, 60, workers=3, postgres=True), plan.make(7, 60, workers=3, postgres=True)
    # Then every event is the same, at the same offset, with the same target and faults
    assert first == again
    assert plan.make(8, 60, workers=3, postgres=True) != first


def test_a_one_minute_run_meets_every_fault_kind_and_process_fault() -> None:
    for seed in range(20):
        events = plan.make(seed, 60, workers=3, postgres=True).events
        kinds = {e.faults.get("error") for e in events if e.kind == "pangea_faults"}
        assert kinds == set(plan.PANGEA_FAULTS), seed
        assert {"kill_worker", "kill_beat", "kill_redis", "restart_postgres"} <= {e.kind for e in events}, seed
        assert all(0 <= e.at < 60 for e in events), seed


def test_postgres_restarts_only_when_asked_and_calm_runs_have_no_faults() -> None:
    assert "restart_postgres" not in {e.kind for e in plan.make(3, 120, workers=3).events}
    calm = plan.make(3, 120, workers=3, faults=False)
    assert {e.kind for e in calm.events} <= set(plan.ACTIONS)


def test_throttling_windows_hold_refreshes_past_their_hold() -> None:
    # 429 windows are slow and ask for a Retry-After of 3-5 s, as issue #12's reproduction did
    windows = [e.faults for s in range(20) for e in plan.make(s, 60, workers=3).events if e.kind == "pangea_faults"]
    throttled = [w for w in windows if w.get("error") == "TooManyRequests"]
    assert throttled and all(w["retry_after"] >= 3 and w["latency_ms"] >= 500 for w in throttled)
