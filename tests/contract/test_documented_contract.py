"""The written contract keeps up with the code: the README section and ``session-sync emulator --help``.

An app in another language is written from the README alone; these checks fail when the code grows
something the text does not say (a NOT NULL column, an authenticate answer, a function).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from worker import cli, emulator, models, sessions, sessions_pg

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def contract() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### Database contract (for apps in other languages)")
    return text[start : text.index("\n## ", start)]


def test_the_emulator_help_names_its_development_tokens() -> None:
    result = CliRunner().invoke(cli.main, ["emulator", "--help"])
    assert result.exit_code == 0
    assert emulator.DEFAULT_SERVICE_TOKEN in result.output and emulator.DEFAULT_CLIENT_TOKEN in result.output


def test_the_readme_names_every_function_answer_and_required_column(contract: str) -> None:
    # The functions worker.sessions calls, and the development tokens
    for name in (sessions_pg.RECORD_LOGIN, sessions_pg.AUTHENTICATE, sessions_pg.AUTHENTICATE_ID):
        assert f"{name}(" in contract, name
    for name in (sessions_pg.LOGOUT, sessions_pg.LOGOUT_USER):
        assert f"{name}(" in contract, name
    assert emulator.DEFAULT_SERVICE_TOKEN in contract and emulator.DEFAULT_CLIENT_TOKEN in contract
    # Every answer of authenticate with its description (the challenge's error_description)
    for reason, description in sessions.DESCRIPTIONS.items():
        assert re.search(rf"`{reason}` \| 401", contract), reason
        assert reason == "missing" or f'error_description="{description}"' in contract, reason
    # Every NOT NULL column of the tables an app writes
    for model in (models.LocalSession, models.LogoutEvent, models.SessionEvent):
        required = {c.name for c in model.__table__.columns if not c.nullable}
        listed = re.search(rf"`{model.__tablename__}` \(NOT NULL: ([^;)]*)", contract)
        assert listed is not None, model.__tablename__
        assert set(re.findall(r"`(\w+)`", listed[1])) == required, model.__tablename__


def test_the_readme_sql_for_when_pangea_last_vouched_reads_what_the_worker_derives(
    contract: str, pg_url: str, emu: Any
) -> None:
    from datetime import timedelta

    import sqlalchemy as sa

    from tests.helpers import login_many, settings_for
    from worker import queries, runtime, verification

    # The documented query, as written
    block = next(b for b in re.findall(r"```sql\n(.*?)```", contract, re.S) if "check_groups g" in b)
    rt = runtime.Runtime(settings_for(pg_url, emu))
    try:
        # Given sessions: one never checked, one on its own schedule, some on groups behind and ahead of
        # a round's cursor, and groups verified at various times
        ids = login_many(rt, emu, [f"doc{i}@example.com" for i in range(8)])
        with rt.sessions.begin() as db:
            queries.make_due(db, now=rt.clock(), session_ids=ids[1:])
        rt.run(rt.engine.drain())
        now = rt.clock()
        S, G = models.LocalSession, models.CheckGroup
        with rt.sessions.begin() as db:
            db.execute(sa.update(S).where(S.id.in_(ids[1:])).values(bucket=5))
            db.execute(sa.update(S).where(S.id == ids[1]).values(next_check_at=now))
            db.execute(
                sa.update(G)
                .where(G.lo <= 5, G.hi > 5)
                .values(
                    verified_at=now + timedelta(seconds=1),
                    round_started_at=now + timedelta(seconds=2),
                    cursor_bucket=5,
                    cursor_id=ids[4],
                )
            )
        # Then the README's SQL answers, for each, what the worker derives (and what authenticate answers)
        with rt.sessions() as db:
            for sid in ids:
                documented = db.execute(sa.text(block.split(";")[0]), {"id": sid}).scalar_one()
                derived = db.execute(sa.select(verification.last_checked_at()).where(S.id == sid)).scalar_one()
                assert documented == derived, sid
            answers = {sid: db.execute(sa.text(block.split(";")[0]), {"id": sid}).scalar_one() for sid in ids}
        assert answers[ids[2]] == now + timedelta(seconds=2)  # behind the cursor: the round in progress
        assert answers[ids[6]] == now + timedelta(seconds=1)  # ahead of it: the last completed round
        assert answers[ids[1]] is not None and answers[ids[1]] < now + timedelta(seconds=1)  # its own schedule
    finally:
        rt.close()
