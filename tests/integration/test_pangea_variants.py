"""Correct under every plausible Pangea: which id is the session's, and JWT active tokens (issue #23).

Pangea documents neither whether a rotated refresh token keeps its id nor which id names the
session, and a project may issue JWT active tokens (about a kilobyte) instead of opaque ``ptu_``
ones. The emulator plays each rule (``/emulator/config``); the same scenarios run under each and
must end the same way, with Pangea's own session list as the judge.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import RunningEmulator
from tests.helpers import active_token, login, moved_clock, row
from worker import models, push, runtime, sessions, wire
from worker.emulator import store

pytestmark = [pytest.mark.timeout(120)]

VARIANTS = [(rotation, kind) for rotation in store.ROTATIONS for kind in store.ACTIVE_TOKENS]


def listed(rt: runtime.Runtime, session_id: int) -> str | None:
    """The id under which Pangea lists the session carrying this local session's active token."""
    page = rt.run(rt.client.session_list(filter={"active_token_id": row(rt, session_id).active_token_id}, size=1))
    return page.sessions[0].id if page.sessions else None


def alive(rt: runtime.Runtime, pangea_id: str) -> bool:
    return bool(rt.run(rt.client.session_list(filter={"id": pangea_id}, size=1)).sessions)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # the rules are Pangea's, not the database's
@pytest.mark.parametrize(("rotation", "active_tokens"), VARIANTS, ids=[f"{r}-{k}" for r, k in VARIANTS])
def test_the_same_outcomes_under_every_rotation_rule_and_kind_of_active_token(
    make_runtime: Any, emu: RunningEmulator, rotation: str, active_tokens: str
) -> None:
    emu.admin.config(rotation=rotation, active_tokens=active_tokens)
    rt = make_runtime(SESSION_SYNC_REFRESH_MARGIN="10s")
    clock = moved_clock(rt)
    # Given four users logged in
    killed, refreshed, pushed = (
        login(rt, emu, "kill@example.com"),
        login(rt, emu, "soon@example.com", active_ttl=6),
        login(rt, emu, "push@example.com"),
    )
    everyone = [killed, refreshed, pushed]
    token = active_token(rt, refreshed)
    if active_tokens == "jwt":
        shape = (token[:3], token.count("."), len(token) > 800)
        assert shape == ("eyJ", 2, True), "a JWT of about a kilobyte"
    # ... each authenticates the web app's requests by its active token, opaque or JWT
    with rt.sessions() as db:
        assert sessions.authenticate(db, token, cipher=rt.cipher).id == refreshed

    # When the worker first checks them, it learns the id Pangea lists each session under
    truth = {sid: listed(rt, sid) for sid in everyone}
    rt.run(rt.engine.resync())
    assert {sid: row(rt, sid).pangea_session_id for sid in everyone} == truth

    # When one is ended at Pangea by its id and another's active token nears its end
    rt.run(rt.client.session_invalidate(truth[killed] or ""))
    clock.advance(3.9)  # the margin is at most half of 6 s, less up to 25 % jitter: due by 3.75 s
    counts = rt.run(rt.engine.resync())
    # Then the first is revoked, the second refreshed, and the session id still is Pangea's
    assert row(rt, killed).state is models.SessionState.REVOKED and row(rt, killed).end_reason == "invalid_token"
    assert row(rt, refreshed).rotated_at is not None and counts.refreshed >= 1
    assert row(rt, refreshed).pangea_session_id == listed(rt, refreshed) == truth[refreshed]
    new_token = active_token(rt, refreshed)
    assert new_token != token, "the refresh rotated the active token"
    assert new_token.startswith("eyJ" if active_tokens == "jwt" else "ptu_"), "of the same kind"
    with rt.sessions() as db:
        assert sessions.authenticate(db, new_token, cipher=rt.cipher).id == refreshed

    # When the app logs out a session whose active token lapsed before the worker ever checked it
    # (its Pangea session lives on, and its stored id is still the guess made at login)
    lapsed = login(rt, emu, "lapse@example.com", active_ttl=1)
    lapsed_id = listed(rt, lapsed)
    time.sleep(1.5)
    verdict = rt.run(rt.client.check_token(active_token(rt, lapsed))).verdict
    assert verdict is wire.Verdict.EXPIRED and alive(rt, lapsed_id or "")
    with rt.sessions.begin() as db:
        sessions.logout(db, lapsed, kick=False)
    delivered = rt.run(rt.delivery.drain())
    # Then the logout ends the session itself at Pangea, by the id Pangea confirmed
    assert delivered.delivered == 1
    assert not alive(rt, lapsed_id or "")

    # When Pangea pushes that a session ended, by its id
    with rt.sessions.begin() as db:
        ended = push.revoke_by_pangea_session_id(db, truth[pushed] or "")
    # Then that local session ends at once
    assert ended == [pushed] and row(rt, pushed).state is models.SessionState.REVOKED
    # ... and no refresh token was ever presented twice
    assert emu.admin.stats()["refresh_reused"] == 0
