"""``POST /emulator/seed``: many sessions at once, each one's secrets derivable from its index (benchmarks)."""

from __future__ import annotations

import pytest
from pangea.services import AuthN

from tests.conftest import RunningEmulator
from worker.emulator import EmulatorAdminError, store

pytestmark = pytest.mark.timeout(60)


def test_seeded_sessions_are_real_sessions_whose_secrets_follow_from_the_index(
    emu: RunningEmulator, sdk: AuthN
) -> None:
    # Given 300 sessions seeded in two calls
    assert emu.admin.seed(200, active_ttl=600)["sessions"] == 200
    assert emu.admin.seed(100, start=200, active_ttl=600)["sessions"] == 300

    # Then each answers the official SDK as a login would, under the ids its index names
    first, last = store.seeded(0), store.seeded(299)
    for ids in (first, last):
        checked = sdk.client.token_endpoints.check(ids.active_secret).result
        assert checked is not None
        assert (checked.id, checked.email, checked.type) == (ids.active_id, ids.email, "user")
    # ... the bulk list finds them by active token id
    listed = sdk.session.list(filter={"active_token_id__in": [first.active_id, last.active_id]}).result
    assert listed is not None and {s.id for s in listed.sessions} == {first.session_id, last.session_id}
    # ... and the refresh token rotates as usual, keeping the session id
    refreshed = sdk.client.session.refresh(last.refresh_secret, user_token=last.active_secret).result
    assert refreshed is not None and refreshed.refresh_token.id == last.session_id
    assert refreshed.active_token.token != last.active_secret


def test_seed_refuses_bad_bodies_and_duplicates(emu: RunningEmulator) -> None:
    emu.admin.seed(5)
    with pytest.raises(EmulatorAdminError, match="already seeded"):
        emu.admin.seed(1, start=4)
    with pytest.raises(EmulatorAdminError, match="count must be"):
        emu.admin.seed(0)
    with pytest.raises(EmulatorAdminError, match="active_ttl"):
        emu.admin.seed(1, start=10, active_ttl=-1)
    # A different key gives different sessions for the same indexes
    assert emu.admin.seed(5, key="other")["sessions"] == 10
    assert store.seeded(0, key="other").active_secret != store.seeded(0).active_secret
