"""The check-groups revision in place, on both engines: existing sessions keep their schedule and their record.

Upgrade: every session gets a bucket, keeps its own ``next_check_at`` (nothing planned is skipped), the
32 groups cover every bucket once. Downgrade: what the groups knew goes back into the rows (the derived
``last_checked_at``, a ``next_check_at`` for every session on a group's schedule), nothing else changes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from worker import db

BEFORE = "3b8f0c6d2e41"
REVISION = "3b9e6f1d2c47"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'groups.db'}"
    return str(request.getfixturevalue("empty_pg_url"))


def _at(value: object) -> datetime:
    """A timestamp as the driver returns it (SQLite: text), aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _seed(engine: sa.Engine, n: int) -> None:
    rows = [
        {
            "user_id": f"pui_{i:032d}",
            "email": f"u{i}@example.com",
            "pangea_session_id": f"pmt_s{i:031d}",
            "active_token_id": f"pmt_a{i:031d}",
            "active_token_enc": "gAAAAA-x",
            "active_token_hash": f"{i:064x}",
            "active_expires_at": T0 + timedelta(hours=1),
            "next_check_at": T0 + timedelta(minutes=i),
            "last_checked_at": T0 - timedelta(minutes=1) if i % 2 else None,
            "created_at": T0 - timedelta(hours=1),
            "updated_at": T0 - timedelta(hours=1),
        }
        for i in range(1, n + 1)
    ]
    if engine.dialect.name == "sqlite":  # naive UTC text, as the models store it
        rows = [{k: v.replace(tzinfo=None) if isinstance(v, datetime) else v for k, v in r.items()} for r in rows]
    table = sa.Table("sessions", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)


def test_upgrade_keeps_every_schedule_and_downgrade_writes_back_what_the_groups_knew(url: str) -> None:
    # Given a database at the revision before, with sessions
    db.upgrade(url, BEFORE)
    engine = db.create_engine(url)
    try:
        _seed(engine, 50)
        with engine.connect() as conn:
            planned: dict[int, object] = dict(conn.execute(sa.text("SELECT id, next_check_at FROM sessions")).all())

        # When it is upgraded
        db.upgrade(url, REVISION)

        # Then each session has a bucket and kept its own due time, and the groups cover the buckets once
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, bucket, next_check_at FROM sessions")).all()
            groups = conn.execute(sa.text("SELECT lo, hi FROM check_groups ORDER BY lo")).all()
        assert {r.id: r.next_check_at for r in rows} == planned
        assert all(0 <= r.bucket < 1024 for r in rows) and len({r.bucket for r in rows}) > 10
        assert [g.lo for g in groups] == [0, *(g.hi for g in groups[:-1])] and groups[-1].hi == 1024

        # Given sessions 1-10 on their groups' schedule, and their groups verified at T0 + 5 min
        verified = T0 + timedelta(minutes=5)
        stamp = verified.replace(tzinfo=None) if engine.dialect.name == "sqlite" else verified
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE sessions SET next_check_at = NULL WHERE id <= 10"))
            conn.execute(
                sa.text("UPDATE check_groups SET verified_at = :v, next_check_at = :n"), {"v": stamp, "n": stamp}
            )

        # When it is downgraded again
        db.downgrade(url, BEFORE)

        # Then those sessions carry the groups' verification and next round; the others are untouched
        with engine.connect() as conn:
            after = {r.id: r for r in conn.execute(sa.text("SELECT id, next_check_at, last_checked_at FROM sessions"))}
            columns = {c["name"] for c in sa.inspect(conn).get_columns("sessions")}
        assert "bucket" not in columns
        for sid in range(1, 11):
            assert _at(after[sid].last_checked_at) == verified and _at(after[sid].next_check_at) == verified
        for sid in range(11, 51):
            assert _at(after[sid].next_check_at) == _at(planned[sid])
            assert (after[sid].last_checked_at is None) == (sid % 2 == 0)
    finally:
        engine.dispose()
    # ... and the upgrade runs again on the downgraded database
    db.upgrade(url)
    assert db.current_revision(url) == db.head_revision()
