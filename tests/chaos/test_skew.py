"""Skewed clocks (issue #18, item 2): one worker minutes fast and one slow, beside correct ones.

Four ``celery -A worker worker`` processes share the sessions; libfaketime (Debian's
``faketime``) runs one five minutes ahead and one five minutes behind. Users log in and out and
admins end sessions at Pangea as in the soak, with no other fault. Judged by the database's own
clock (:mod:`tests.chaos.leases`) and Pangea's state: no session is taken from a live lease, no
refresh token is presented twice, and nothing is revoked early.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chaos import plan
from tests.chaos.fleet import faketime_env
from tests.chaos.soak import Soak
from tests.conftest import RunningEmulator, require
from tests.faults.test_process_faults import RedisServer

SEED = 2
SECONDS = 40.0
SKEW = "5m"

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(SECONDS + 200)]


def test_skewed_clocks(pg_url: str, emu: RunningEmulator, own_redis: RedisServer, tmp_path: Path, report: Any) -> None:
    try:
        fast, slow = faketime_env(f"+{SKEW}"), faketime_env(f"-{SKEW}")
    except FileNotFoundError as exc:
        require(False, str(exc))
        raise
    # Given a worker five minutes fast, one five minutes slow and two right, and users coming and going
    the_plan = plan.make(SEED, SECONDS, workers=4, faults=False)
    report(f"skew seed={the_plan.seed} plan: {the_plan.summary()}")
    soak = Soak(
        pg_url=pg_url,
        emu=emu,
        redis=own_redis,
        workdir=tmp_path,
        the_plan=the_plan,
        slots=[fast, slow, {}, {}],
        name="skewed_clocks",
    )
    try:
        soak.populate(150)
        # When they work side by side (nothing else fails)
        figures = soak.run()
        report(figures.line())
        for line in soak.world.explain():
            report(f"  {line}")
    finally:
        soak.close()
    # Then no lease was taken from a live holder, no refresh token was presented twice, and nothing
    # was revoked early (a revoked session whose token Pangea still honours counts as wrongly revoked)
    assert figures.notes["leases_taken_live"] == 0, figures.line()
    figures.assert_invariants()
    assert figures.recovered_in < 60, figures.line()
