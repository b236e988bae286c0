"""Push-ready entry points: revoke at once by Pangea session id or user id, in the caller's transaction."""

from __future__ import annotations

from typing import Any

from tests.conftest import RunningEmulator
from tests.helpers import login, row
from worker import models, push


def test_revoke_by_pangea_session_id_and_by_user(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given two sessions of Ann and one of Bob
    ann1, ann2 = login(rt, emu, "ann@example.com"), login(rt, emu, "ann@example.com")
    bob = login(rt, emu, "bob@example.com")
    pmt = row(rt, ann1).pangea_session_id
    assert pmt is not None and pmt.startswith("pmt_")

    # When Pangea pushes "session ended" for one of Ann's sessions
    with rt.sessions.begin() as db:
        assert push.revoke_by_pangea_session_id(db, pmt) == [ann1]
        assert push.revoke_by_pangea_session_id(db, pmt) == []  # a repeated push changes nothing
    # Then only that one ends, with the reason recorded in the audit trail
    assert (row(rt, ann1).state, row(rt, ann1).end_reason) == (models.SessionState.REVOKED, "pangea_push")
    assert row(rt, ann2).state is models.SessionState.ACTIVE

    # When Pangea pushes "user logged out everywhere"
    with rt.sessions.begin() as db:
        assert push.revoke_all_for_user(db, row(rt, ann2).user_id) == [ann2]
    assert row(rt, ann2).state is models.SessionState.REVOKED
    assert row(rt, bob).state is models.SessionState.ACTIVE

    # And a rolled-back push leaves everything as it was
    with rt.sessions() as db:
        push.revoke_all_for_user(db, row(rt, bob).user_id)
        db.rollback()
    assert row(rt, bob).state is models.SessionState.ACTIVE
