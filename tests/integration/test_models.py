"""The schema on real SQLite and PostgreSQL: rows round-trip, constraints hold, the due scan uses its index."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy import exc, orm

from worker import db, models
from worker.models import LocalSession, LogoutEvent, OutboxKind, OutboxState, SessionState

NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def db_session(engine: sa.Engine) -> Iterator[orm.Session]:
    """An ORM session on the test's fresh database."""
    with db.session_factory(engine)() as session:
        yield session


def make_session(n: int = 1, **overrides: object) -> LocalSession:
    values: dict[str, object] = {
        "user_id": f"pui_{n:032d}",
        "email": f"user{n}@example.com",
        "pangea_session_id": f"pmt_session{n:023d}",
        "active_token_id": f"pmt_active{n:024d}",
        "active_token_enc": "gAAAAA-ciphertext",
        "refresh_token_enc": "gAAAAA-refresh",
        "active_token_hash": f"{n:064x}",
        "active_expires_at": NOW + timedelta(minutes=15),
        "refresh_expires_at": NOW + timedelta(days=1),
        "next_check_at": NOW,
    }
    values.update(overrides)
    return LocalSession(**values)


def test_session_round_trip(db_session: orm.Session) -> None:
    # Given a session written with an offset that is not UTC
    paris = timezone(timedelta(hours=1))
    db_session.add(make_session(active_expires_at=NOW.astimezone(paris)))
    db_session.commit()
    db_session.expunge_all()

    # When it is read back
    row = db_session.scalars(sa.select(LocalSession)).one()

    # Then times come back aware, in UTC, to the microsecond, and defaults are filled in
    assert row.active_expires_at == NOW and row.active_expires_at.tzinfo == UTC
    assert row.refresh_expires_at == NOW + timedelta(days=1)
    assert row.state is SessionState.ACTIVE
    assert (row.failures, row.uncertain, row.version) == (0, False, 0)
    assert row.created_at.tzinfo == UTC and row.updated_at >= row.created_at
    assert row.ended_at is None and row.end_reason is None and row.claimed_until is None
    assert "ciphertext" not in repr(row)


def test_rows_written_by_another_app_get_defaults(engine: sa.Engine) -> None:
    # Given a row inserted with plain SQL and only the required columns, as another language would
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sessions (user_id, email, active_token_id, active_token_enc, active_token_hash,"
                " active_expires_at) VALUES ('pui_x', 'x@example.com', 'pmt_x', 'ct', 'h', :expires)"
            ),
            {"expires": NOW.replace(tzinfo=None) if engine.dialect.name == "sqlite" else NOW},
        )

    # Then the database fills in state, counters and times, and the models read them as aware UTC
    with db.session_factory(engine)() as session:
        row = session.scalars(sa.select(LocalSession)).one()
    assert row.state is SessionState.ACTIVE
    assert (row.failures, row.uncertain, row.version) == (0, False, 0)
    assert row.active_expires_at == NOW
    for value in (row.created_at, row.updated_at, row.next_check_at):
        assert value is not None and value.tzinfo == UTC
        assert abs(value - models.utcnow()) < timedelta(minutes=1)


def test_naive_datetimes_are_refused(db_session: orm.Session) -> None:
    db_session.add(make_session(active_expires_at=NOW.replace(tzinfo=None)))
    with pytest.raises(exc.StatementError, match="naive datetime"):
        db_session.commit()


def test_outbox_event_round_trip_and_set_null(db_session: orm.Session) -> None:
    # Given a session and the logout owed for it
    session = make_session()
    db_session.add(session)
    db_session.flush()
    db_session.add(LogoutEvent(kind=OutboxKind.SESSION, session_id=session.id, user_id=session.user_id, token_enc="ct"))
    db_session.add(LogoutEvent(kind=OutboxKind.USER, user_id=session.user_id))
    db_session.commit()

    # Then both read back with their defaults
    events = db_session.scalars(sa.select(LogoutEvent).order_by(LogoutEvent.id)).all()
    assert [(e.kind, e.state, e.attempts) for e in events] == [
        (OutboxKind.SESSION, OutboxState.PENDING, 0),
        (OutboxKind.USER, OutboxState.PENDING, 0),
    ]
    assert events[0].session_id == session.id
    assert events[0].next_attempt_at.tzinfo == UTC

    # When the session row is deleted, the event outlives it (the logout is still owed)
    db_session.execute(sa.delete(LocalSession))
    db_session.commit()
    db_session.expire_all()
    assert db_session.scalars(sa.select(LogoutEvent.session_id).order_by(LogoutEvent.id)).all() == [None, None]


def test_ending_a_session_keeps_reason_and_time(db_session: orm.Session) -> None:
    session = make_session()
    db_session.add(session)
    db_session.commit()

    session.state, session.end_reason, session.ended_at = SessionState.REVOKED, "invalid_token", NOW
    db_session.commit()
    db_session.expunge_all()

    row = db_session.scalars(sa.select(LocalSession)).one()
    assert (row.state, row.end_reason, row.ended_at) == (SessionState.REVOKED, "invalid_token", NOW)


def _insert_one(engine: sa.Engine) -> None:
    with db.session_factory(engine)() as session:
        session.add(make_session())
        session.add(LogoutEvent(kind=OutboxKind.USER, user_id="pui_x"))
        session.commit()


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("UPDATE sessions SET state = 'bogus', end_reason = 'x', ended_at = created_at", "ck_sessions_state"),
        ("UPDATE sessions SET state = 'revoked'", "ck_sessions_ended"),
        ("UPDATE sessions SET end_reason = 'x'", "ck_sessions_ended"),
        ("UPDATE logout_outbox SET state = 'lost'", "ck_logout_outbox_state"),
        ("UPDATE logout_outbox SET kind = 'everyone'", "ck_logout_outbox_kind"),
        ("UPDATE logout_outbox SET kind = 'session'", "ck_logout_outbox_token"),
        ("UPDATE logout_outbox SET state = 'delivered'", "ck_logout_outbox_finished"),
        ("UPDATE logout_outbox SET state = 'dead'", "ck_logout_outbox_finished"),
    ],
)
def test_check_constraints_reject_bad_rows(engine: sa.Engine, statement: str, constraint: str) -> None:
    # Given one valid session and one valid event
    _insert_one(engine)

    # When a statement breaks a rule, the database refuses it, naming the constraint
    with pytest.raises(exc.IntegrityError) as raised, engine.begin() as conn:
        conn.execute(sa.text(statement))
    if engine.dialect.name == "postgresql":
        assert constraint in str(raised.value)
    else:
        assert "CHECK constraint failed" in str(raised.value)


def test_the_models_refuse_unknown_states(db_session: orm.Session) -> None:
    db_session.add(make_session(state="bogus"))
    with pytest.raises(exc.StatementError):
        db_session.commit()


@pytest.mark.parametrize("column", ["pangea_session_id", "active_token_hash"])
def test_unique_columns(db_session: orm.Session, column: str) -> None:
    # Given a session
    first = make_session(1)
    db_session.add(first)
    db_session.commit()

    # When another session repeats its unique value, the database refuses it
    db_session.add(make_session(2, **{column: getattr(first, column)}))
    with pytest.raises(exc.IntegrityError):
        db_session.commit()


def test_sessions_without_a_pangea_session_id_may_coexist(db_session: orm.Session) -> None:
    db_session.add_all([make_session(1, pangea_session_id=None), make_session(2, pangea_session_id=None)])
    db_session.commit()
    assert db_session.scalar(sa.select(sa.func.count()).select_from(LocalSession)) == 2


def test_ids_are_not_reused(db_session: orm.Session) -> None:
    db_session.add_all([make_session(1), make_session(2)])
    db_session.commit()
    db_session.execute(sa.delete(LocalSession).where(LocalSession.id == 2))
    db_session.commit()
    db_session.add(make_session(3))
    db_session.commit()
    assert db_session.scalars(sa.select(LocalSession.id).order_by(LocalSession.id)).all() == [1, 3]


def due_sessions(now: datetime) -> sa.Select[int]:
    """The due scan as the sync engine runs it."""
    return (
        sa.select(LocalSession.id)
        .where(models.session_is_active(), LocalSession.next_check_at <= now)
        .order_by(LocalSession.next_check_at)
        .limit(100)
    )


def due_events(now: datetime) -> sa.Select[int]:
    """The outbox's due scan."""
    return (
        sa.select(LogoutEvent.id)
        .where(models.event_is_pending(), LogoutEvent.next_attempt_at <= now)
        .order_by(LogoutEvent.next_attempt_at)
        .limit(100)
    )


def test_due_scan_returns_active_due_sessions_in_order(db_session: orm.Session) -> None:
    db_session.add_all(
        [
            make_session(1, next_check_at=NOW - timedelta(seconds=1)),
            make_session(2, next_check_at=NOW - timedelta(minutes=5)),
            make_session(3, next_check_at=NOW + timedelta(seconds=1)),
            make_session(
                4, next_check_at=NOW - timedelta(hours=1), state=SessionState.LOGGED_OUT, end_reason="x", ended_at=NOW
            ),
        ]
    )
    db_session.commit()
    assert db_session.scalars(due_sessions(NOW)).all() == [2, 1]


def explain(conn: sa.Connection, query: sa.Select[tuple[int]]) -> str:
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    prefix = "EXPLAIN" if conn.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
    return "\n".join(str(row[-1]) for row in conn.exec_driver_sql(f"{prefix} {compiled}"))


@pytest.mark.parametrize(
    ("query", "index"),
    [(due_sessions, "ix_sessions_next_check_at"), (due_events, "ix_logout_outbox_next_attempt_at")],
)
def test_due_scans_use_their_partial_index(engine: sa.Engine, query: object, index: str) -> None:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # Given a planner that avoids a sequential scan whenever it has a choice
            conn.exec_driver_sql("SET enable_seqscan = off")
        # Then the due scan reads the partial index
        assert callable(query)
        assert index in explain(conn, query(NOW))


def test_sqlite_immediate_sessions_take_the_write_lock_up_front(sqlite_url: str) -> None:
    engine = db.create_engine(sqlite_url)
    other = sqlite3.connect(sa.make_url(sqlite_url).database or "", timeout=0, isolation_level=None)
    try:
        # Given a default session that has only read: another writer may still start
        with db.session_factory(engine)() as session:
            session.execute(sa.select(LocalSession.id)).all()
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")

        # When a session from an immediate factory has only read
        with db.session_factory(engine, immediate=True)() as session:
            session.execute(sa.select(LocalSession.id)).all()

            # Then it already holds the write lock
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()
        engine.dispose()


def test_sqlite_engine_settings(sqlite_url: str) -> None:
    engine = db.create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.DEFAULT_SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_postgresql_urls_get_the_psycopg_driver() -> None:
    assert db.normalize_url("postgresql://u:p%40ss@h:5432/d").startswith("postgresql+psycopg://u:p%40ss@h:5432/d")
    assert db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
