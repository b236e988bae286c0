"""Pangea misbehaving, one way per scenario: the invariants hold, and each prints its figures.

The sync engine and the logout delivery run in this process, as ``session-sync sweep --once`` and
the outbox task do, against PostgreSQL and the emulator over real HTTP. While the fault is on,
sessions are ended at Pangea and users log out of the app; then the fault heals, and the run is
judged by Pangea's state and the database's (``tests/faults/world.py``), not by the worker's word.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import RunningEmulator
from tests.faults.proxy import ChaosProxy
from tests.faults.world import World, fault_env, wait_caught_up
from worker import operations, runtime
from worker.emulator import store
from worker.settings import Settings

pytestmark = [pytest.mark.timeout(120), pytest.mark.faults]

REFRESH = "/v2/client/session/refresh"
#: How long each fault lasts: long enough for every session to be checked twice and refreshed once.
FAULT_SECONDS = 5.0

SCENARIOS: dict[str, dict[str, Any]] = {
    "5xx_50pct": {"error": "InternalError", "error_rate": 0.5},
    "timeouts": {"error": "Timeout", "error_rate": 0.3},
    "429_storm": {"error": "TooManyRequests", "error_rate": 0.9, "retry_after": 1},
    "html_body": {"error": "Malformed", "error_rate": 0.5},
    "not_json": {"error": "NotJson", "error_rate": 0.5},
    "huge_body": {"error": "Huge", "error_rate": 0.3},
    "wrong_content_type": {"error": "WrongContentType", "error_rate": 0.5},
    "dropped_refresh": {"error": "Dropped", "error_rate": 0.5, "paths": [REFRESH]},
    # a Pangea whose session lists refuse (ValidationError) more than 10 results or filter ids: below our batch
    "list_limits": {"max_size": 10, "max_filter_ids": 10},
}


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Print a scenario's figures past pytest's capture, so CI logs show them."""

    def show(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}")

    yield show


def _step(rt: runtime.Runtime) -> None:
    """One round of the worker's periodic work: a sweep of what is due, then due logouts."""
    rt.run(rt.engine.drain())
    operations.deliver_logouts(rt)
    time.sleep(0.2)


def _through_the_fault(rt: runtime.Runtime, world: World, *, on: Any, off: Any, scenario: str, **notes: Any) -> Any:
    """Doom and log out during the fault, heal, wait for the worker to catch up; returns the figures."""
    _step(rt)  # a calm round first: every session checked once
    world.doom()  # sessions ended at Pangea just as it starts to fail
    on()
    world.leave()  # users log out while Pangea fails
    until = time.monotonic() + FAULT_SECONDS
    while time.monotonic() < until:
        _step(rt)
    off()
    healed = datetime.now(UTC)
    recovered = wait_caught_up(world, healed, step=lambda: _step(rt), timeout=40)
    return world.judge(scenario, recovered_in=recovered, **notes)


def _fault_run(pg_url: str, emu: RunningEmulator, faults: dict[str, Any], *, scenario: str, tag: str) -> Any:
    """The world through one fault set on the emulator; the figures."""
    rt = runtime.Runtime(Settings.from_env(fault_env(pg_url, emu.base_url, emu.service_token)))
    try:
        world = World(rt, emu, tag=tag)
        return _through_the_fault(
            rt,
            world,
            on=lambda: emu.admin.faults(**faults),
            off=emu.admin.clear_faults,
            scenario=scenario,
            verdict_code=emu.verdict_code,
        )
    finally:
        rt.close()


#: Scenarios run again against a Pangea answering token verdicts with HTTP 401: the same figures.
UNDER_401 = ("5xx_50pct", "dropped_refresh")


@pytest.mark.parametrize(
    ("scenario", "emu"),
    [(name, 400) for name in SCENARIOS] + [pytest.param(name, 401, id=f"{name}-verdicts401") for name in UNDER_401],
    indirect=["emu"],
)
def test_pangea_fault(scenario: str, pg_url: str, emu: RunningEmulator, report: Any) -> None:
    figures = _fault_run(pg_url, emu, SCENARIOS[scenario], scenario=scenario, tag=scenario)
    report(figures.line())
    figures.assert_invariants()


@pytest.mark.parametrize("rotation", store.ROTATIONS[1:])
def test_dropped_refreshes_under_another_rotation_rule_with_jwts(
    rotation: str, pg_url: str, emu: RunningEmulator, report: Any
) -> None:
    """The dropped-refresh scenario where refresh tokens get new ids and active tokens are JWTs (issue #23)."""
    emu.admin.config(rotation=rotation, active_tokens="jwt")
    scenario = f"dropped_refresh[{rotation},jwt]"
    figures = _fault_run(pg_url, emu, SCENARIOS["dropped_refresh"], scenario=scenario, tag=rotation)
    report(figures.line())
    figures.assert_invariants()
    # Every refresh whose answer was dropped left a session at Pangea with tokens nobody holds: the
    # worker ended each one there once it knew (with a service token, by Pangea's own session id)
    assert figures.lost_in_transit > 0 and figures.orphaned == 0, figures.line()


def test_connection_resets(pg_url: str, emu: RunningEmulator, report: Any) -> None:
    # Resets before a request reaches Pangea and after Pangea performed it, 30% of requests
    upstream = int(emu.base_url.rsplit(":", 1)[1])
    with ChaosProxy(upstream) as proxy:
        rt = runtime.Runtime(Settings.from_env(fault_env(pg_url, proxy.base_url, emu.service_token)))
        try:
            world = World(rt, emu, tag="reset")

            def heal() -> None:
                proxy.reset_rate = 0.0

            figures = _through_the_fault(
                rt, world, on=lambda: setattr(proxy, "reset_rate", 0.3), off=heal, scenario="connection_resets"
            )
        finally:
            rt.close()
        resets = dict(proxy.resets)
    report(figures.line() + f" resets_before={resets['before']} resets_after={resets['after']}")
    assert resets["before"] > 0 and resets["after"] > 0  # both kinds happened
    figures.assert_invariants()


def test_wrong_project(pg_url: str, emu: RunningEmulator, other_project: str, report: Any) -> None:
    # Given the right worker, and the same worker misconfigured for another project (same token)
    env = fault_env(pg_url, emu.base_url, emu.service_token, SESSION_SYNC_GUARD_MIN="10")
    rt = runtime.Runtime(Settings.from_env(env))
    wrong = runtime.Runtime(Settings.from_env(env | {"PANGEA_BASE_URL": other_project}))
    try:
        world = World(rt, emu, tag="wrong")
        _step(rt)
        # When the wrong setting is deployed, while sessions end at Pangea and users log out
        world.doom()
        world.leave()
        held = 0
        until = time.monotonic() + FAULT_SECONDS
        while time.monotonic() < until:
            held += wrong.run(wrong.engine.drain()).held
            held += wrong.run(wrong.delivery.drain()).held
            time.sleep(0.2)
        tripped = operations.status(rt)["revocation_guard"]["tripped"]
        # ... then the setting is fixed and the operator confirms what Pangea says
        healed = datetime.now(UTC)
        operations.resync(rt, confirm_revocations=True)
        recovered = wait_caught_up(world, healed, step=lambda: _step(rt), timeout=40)
        figures = world.judge("wrong_project", recovered_in=recovered, guard_tripped=tripped, held_answers=held)
    finally:
        rt.close()
        wrong.close()
    report(figures.line())
    # Then nothing was revoked or "delivered" to the wrong project, and the guard said so
    assert tripped is True and held > 0
    figures.assert_invariants()
