"""The written contract keeps up with the code: the README section and ``session-sync emulator --help``.

An app in another language is written from the README alone; these checks fail when the code grows
something the text does not say (a NOT NULL column, an authenticate answer, a function).
"""

from __future__ import annotations

import re
from pathlib import Path

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
