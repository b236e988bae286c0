"""The database contract's functions and ``worker.sessions``: one behaviour on both engines.

On PostgreSQL ``worker.sessions`` writes through ``session_sync_record_login`` and the logout
functions; on SQLite it runs the same rules in Python. ``authenticate`` runs its own indexed SELECT
on both, and ``session_sync_authenticate`` must answer exactly as it does. These tests hold them to
each other (the same script of logins, requests and logouts writes the same rows and gets the same
answers on both engines, and from the function), prove that a login recorded twice never aborts
the caller's transaction, and that bad input to a function is a clear error that writes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from worker import crypto, errors, models, sessions
from worker import db as dbmod

pytestmark = pytest.mark.timeout(120)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CIPHER = crypto.TokenCipher([crypto.generate_key()])
POLICY = sessions.Policy(refresh_jitter=0.0)  # planned times repeat exactly


def userinfo(n: int, *, user: str = "pui_ann", life: int = 600, issued: datetime = NOW) -> dict[str, Any]:
    """A Pangea userinfo envelope for login ``n`` (ids and tokens derived from ``n``, so runs can repeat it)."""

    def token(kind: str, ttl: int) -> dict[str, Any]:
        return {
            "id": f"pmt_{kind}{n:031d}",
            "token": f"pt{kind}_{n:032d}",
            "type": "user" if kind == "a" else "session",
            "life": ttl,
            "expire": (issued + timedelta(seconds=ttl)).isoformat(),
            "identity": user,
            "email": f"{user}@example.com",
            "profile": {},
            "created_at": issued.isoformat(),
            "scopes": [],
        }

    result = {"active_token": token("a", life), "refresh_token": token("r", life * 10)}
    return {"status": "Success", "request_id": f"prq_{n}", "result": result}


def record(db: orm.Session, n: int, **kw: Any) -> sessions.Login:
    return sessions.record_login(db, userinfo(n, **kw), cipher=CIPHER, now=NOW, policy=POLICY)


@pytest.fixture
def factory(engine: sa.Engine) -> orm.sessionmaker[orm.Session]:
    return dbmod.session_factory(engine)


def count(db: orm.Session, table: str) -> int:
    return int(db.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


# --- a login recorded twice (issue #18, item 4) -----------------------------------------------------


def test_recording_the_same_login_twice_returns_its_session_and_the_transaction_goes_on(
    factory: orm.sessionmaker[orm.Session],
) -> None:
    # Given a login recorded and committed (the callback's first attempt)
    with factory.begin() as db:
        first = record(db, 1)

    # When the retried callback records the same userinfo, inside a transaction that also holds
    # the app's own write
    with factory.begin() as db:
        db.execute(sa.insert(models.SweepRun).values(slot=NOW, kind="once", started_at=NOW))  # "the app's row"
        again = record(db, 1)
        # Then the transaction is still usable: it goes on and commits
        assert db.execute(sa.text("SELECT 1")).scalar_one() == 1

    # And the answer is the same session, with a new handle that replaces the old one
    assert again.id == first.id and again.handle != first.handle
    with factory() as db:
        assert count(db, "sessions") == 1 and count(db, "sweep_runs") == 1
        assert sessions.authenticate(db, again.handle, cipher=CIPHER, now=NOW).id == first.id
        with pytest.raises(errors.SessionInvalid) as caught:
            sessions.authenticate(db, first.handle, cipher=CIPHER, now=NOW)
        assert caught.value.reason == "unknown"


def test_a_retried_callback_finds_its_session_after_the_worker_corrected_its_pangea_id(
    factory: orm.sessionmaker[orm.Session],
) -> None:
    # Given a login whose Pangea session id the worker since learned from Pangea's session list
    with factory.begin() as db:
        first = record(db, 1)
        db.execute(sa.update(models.LocalSession).values(pangea_session_id="pmt_learned_from_the_list"))

    # When the callback is retried with the login's userinfo, Then it is the same session
    with factory.begin() as db:
        assert record(db, 1).id == first.id
    with factory() as db:
        assert count(db, "sessions") == 1


def test_recording_twice_in_one_transaction_is_the_same_session(factory: orm.sessionmaker[orm.Session]) -> None:
    with factory.begin() as db:
        first, again = record(db, 1), record(db, 1)
        # The returned ORM row is the fresh one, not a stale copy
        assert again.session.handle_hash == CIPHER.lookup_hash(again.handle)
    assert again.id == first.id


@pytest.mark.parametrize("how", ["logged_out", "other_active_token"])
def test_a_login_of_an_ended_or_other_session_is_a_clear_error_and_writes_nothing(
    factory: orm.sessionmaker[orm.Session], how: str
) -> None:
    # Given a recorded login that ended, or a userinfo sharing its Pangea session but not its token
    with factory.begin() as db:
        first = record(db, 1)
        if how == "logged_out":
            sessions.logout(db, first.id, now=NOW, kick=False)
    payload = userinfo(1)
    if how == "other_active_token":
        payload["result"]["active_token"] |= {"id": "pmt_other", "token": "pta_other"}

    # When it is recorded again, beside the app's own write
    with factory.begin() as db:
        db.execute(sa.insert(models.SweepRun).values(slot=NOW, kind="once", started_at=NOW))
        with pytest.raises(errors.LoginConflict) as caught:
            sessions.record_login(db, payload, cipher=CIPHER, now=NOW, policy=POLICY)
        # Then the error names the session (never a token) and the transaction commits the app's row
        assert caught.value.session_id == first.id
        assert payload["result"]["active_token"]["token"] not in str(caught.value)

    with factory() as db:
        assert count(db, "sessions") == 1 and count(db, "sweep_runs") == 1
        stored = db.get(models.LocalSession, first.id)
        assert stored is not None and stored.active_token_id == f"pmt_a{1:031d}"


# --- one behaviour on both engines ------------------------------------------------------------------


def script(factory: orm.sessionmaker[orm.Session]) -> dict[str, Any]:
    """Logins, requests (every kind of answer) and logouts; what each answered, and the rows they left."""
    answers: dict[str, Any] = {}

    def ask(name: str, credential: str | int, at: datetime = NOW, grace: timedelta = timedelta(minutes=2)) -> None:
        with factory() as db:
            try:
                found = sessions.authenticate(db, credential, cipher=CIPHER, now=at, grace=grace)
                answers[name] = ("ok", found.id, found.email, found.expires_at, found.rotated_token)
            except errors.SessionInvalid as exc:
                answers[name] = (exc.reason, exc.www_authenticate)
            if db.get_bind().dialect.name == "postgresql" and credential != "":
                # The contract's function (what other languages call) answers as authenticate did
                assert function_answer(db, credential, at, grace) == answers[name], name

    with factory.begin() as db:
        ann, bob, cid = record(db, 1), record(db, 2, user="pui_bob"), record(db, 3, user="pui_cid", life=60)
        dan = record(db, 4, user="pui_dan")
        again = record(db, 1)
    token = {n: userinfo(n)["result"]["active_token"]["token"] for n in (1, 2, 3)}
    ask("handle", again.handle)
    ask("old handle", ann.handle)
    ask("token", token[1])
    ask("id", bob.id)
    ask("unknown", "pta_nobody")
    ask("unknown id", 999)
    ask("expired", token[3], at=NOW + timedelta(seconds=61))
    ask("empty", "")

    # A worker refresh of bob's session (as the engine writes it), then the old token in and after the grace
    with factory.begin() as db:
        db.execute(
            sa.update(models.LocalSession)
            .where(models.LocalSession.id == bob.id)
            .values(
                previous_token_hash=CIPHER.lookup_hash(token[2]),
                rotated_at=NOW,
                active_token_hash=CIPHER.lookup_hash("pta_new"),
                active_token_enc=CIPHER.encrypt("pta_new"),
                updated_at=NOW,
            )
        )
    ask("replaced, in grace", token[2], at=NOW + timedelta(seconds=30))
    ask("replaced, after grace", token[2], at=NOW + timedelta(seconds=121))
    ask("replaced, grace 0", token[2], at=NOW, grace=timedelta(0))
    ask("new token", "pta_new")

    with factory.begin() as db:
        answers["logout"] = sessions.logout(db, ann.id, now=NOW, kick=False).state
        answers["logout again"] = sessions.logout(db, ann.id, reason="again", now=NOW, kick=False).end_reason
        answers["user"] = dataclass_fields(sessions.logout_user(db, "pui_bob", reason="admin", now=NOW, kick=False))
        answers["user again"] = dataclass_fields(sessions.logout_user(db, "pui_bob", now=NOW, kick=False))
        with pytest.raises(errors.UnknownSession):
            sessions.logout(db, 999, now=NOW, kick=False)
        with pytest.raises(errors.UnknownSession):
            sessions.logout_user(db, "pui_nobody", now=NOW, kick=False)
        db.execute(
            sa.update(models.LocalSession)
            .where(models.LocalSession.id == cid.id)
            .values(state="revoked", end_reason="expired", ended_at=NOW, updated_at=NOW)
        )
        db.execute(
            sa.update(models.LocalSession)
            .where(models.LocalSession.id == dan.id)
            .values(state="revoked", end_reason="invalid_token", ended_at=NOW, updated_at=NOW)
        )
    ask("logged out", again.handle)
    ask("revoked expired", cid.id)
    ask("revoked", userinfo(4)["result"]["active_token"]["token"])
    return answers | {"rows": rows(factory)}


def function_answer(db: orm.Session, credential: str | int, at: datetime, grace: timedelta) -> tuple[Any, ...]:
    """``session_sync_authenticate`` (or ``_id``) called as the README says, in authenticate's answer shape."""
    if isinstance(credential, int):
        query = "SELECT * FROM session_sync_authenticate_id(:id, :now)"
        found = db.execute(sa.text(query), {"id": credential, "now": at}).one()
    else:
        query = "SELECT * FROM session_sync_authenticate(:hashes, :handle, :grace, :now)"
        handle = credential.startswith(sessions.HANDLE_PREFIX)
        params = {"hashes": CIPHER.lookup_hashes(credential), "handle": handle, "grace": None if handle else grace}
        found = db.execute(sa.text(query), params | {"now": at}).one()
    if found.reason is not None:
        refused = errors.SessionInvalid(sessions.DESCRIPTIONS[found.reason], reason=found.reason)
        return (found.reason, refused.www_authenticate)
    rotated = CIPHER.decrypt(found.rotated_token_enc) if found.rotated_token_enc is not None else None
    return ("ok", found.session_id, found.email, found.expires_at, rotated)


def dataclass_fields(value: sessions.UserLogout) -> tuple[Any, ...]:
    return (value.user_id, value.session_ids, value.event_id)


def rows(factory: orm.sessionmaker[orm.Session]) -> dict[str, list[dict[str, Any]]]:
    """Every row of the contract's tables; ciphertexts as what they decrypt to (Fernet is randomized)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with factory() as db:
        for model in (models.LocalSession, models.LogoutEvent, models.SessionEvent):
            table = model.__table__
            found = []
            for row in db.execute(sa.select(table).order_by(table.c.id)).mappings():
                item = dict(row)
                for column in ("active_token_enc", "refresh_token_enc", "token_enc"):
                    if item.get(column) is not None:
                        item[column] = CIPHER.decrypt(item[column])
                if item.get("handle_hash") is not None:
                    item["handle_hash"] = "set"
                if "bucket" in item:  # drawn at random on insert, by either path
                    assert 0 <= item.pop("bucket") < models.BUCKETS
                found.append(item)
            out[model.__tablename__] = found
    return out


@pytest.fixture
def both(sqlite_url: str, pg_url: str) -> Iterator[list[orm.sessionmaker[orm.Session]]]:
    engines = [dbmod.create_engine(sqlite_url), dbmod.create_engine(pg_url)]
    yield [dbmod.session_factory(e) for e in engines]
    for e in engines:
        e.dispose()


def test_the_functions_and_the_python_path_answer_and_write_alike(
    both: list[orm.sessionmaker[orm.Session]],
) -> None:
    # Given the same script of logins, requests and logouts on SQLite (Python) and PostgreSQL (the functions)
    on_sqlite, on_pg = (script(factory) for factory in both)

    # Then every answer and every row of the contract's tables is the same
    assert on_pg.pop("rows") == on_sqlite.pop("rows")
    assert on_pg == on_sqlite
    # ... and the script covered every answer authenticate can give
    reasons = {a[0] for a in on_pg.values() if isinstance(a, tuple) and isinstance(a[0], str)}
    assert reasons >= set(sessions.DESCRIPTIONS) | {"ok"}


# --- the functions' own input checks (PostgreSQL) ------------------------------------------------


@pytest.fixture
def pg(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False)) as conn:
        yield conn


HASH = "ab" * 32
GOOD_LOGIN = {
    "p_user_id": "pui_x",
    "p_email": "x@example.com",
    "p_pangea_session_id": "pmt_r",
    "p_active_token_id": "pmt_a",
    "p_active_token_enc": "enc",
    "p_active_token_hash": HASH,
    "p_refresh_token_enc": "enc",
    "p_active_issued_at": NOW,
    "p_active_expires_at": NOW + timedelta(minutes=10),
    "p_refresh_expires_at": NOW + timedelta(hours=1),
}


def call_record_login(conn: psycopg.Connection[Any], **changes: object) -> Any:
    args = GOOD_LOGIN | changes
    named = ", ".join(f"{k} => %({k})s" for k in args)
    return conn.execute(f"SELECT * FROM session_sync_record_login({named})", args).fetchone()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: call_record_login(c, p_pangea_session_id=None), "is required"),
        (lambda c: call_record_login(c, p_active_token_hash=HASH.upper()), "64 lowercase hex"),
        (lambda c: call_record_login(c, p_handle_hash="abc"), "64 lowercase hex"),
        (lambda c: call_record_login(c, p_user_id="pui with space"), "Pangea id"),
        (lambda c: call_record_login(c, p_email="x" * 321), "p_email"),
        (lambda c: call_record_login(c, p_active_expires_at=NOW - timedelta(seconds=1)), "before"),
        (lambda c: c.execute("SELECT * FROM session_sync_logout(1, '')"), "p_reason"),
        (lambda c: c.execute("SELECT * FROM session_sync_logout_user('pui_x', %s)", ["x" * 65]), "p_reason"),
        (lambda c: c.execute("SELECT * FROM session_sync_authenticate('{}')"), "p_hashes"),
        (lambda c: c.execute(f"SELECT * FROM session_sync_authenticate('{{{HASH}}}', false, '-1s')"), "p_grace"),
        (lambda c: c.execute(f"SELECT * FROM session_sync_authenticate('{{{HASH}}}', false, NULL)"), "p_grace"),
    ],
)
def test_bad_input_to_a_function_is_a_clear_error_and_writes_nothing(
    pg: psycopg.Connection[Any], call: Any, message: str
) -> None:
    # Given one recorded login
    assert call_record_login(pg, p_pangea_session_id="pmt_first", p_active_token_hash="cd" * 32)[1] == "recorded"
    pg.commit()

    # When a function is called with bad input, Then SQLSTATE 22023 names the parameter
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        call(pg)
    pg.rollback()

    # And nothing was written
    for table, expected in (("sessions", 1), ("logout_outbox", 0), ("session_events", 0)):
        assert pg.execute(f"SELECT count(*) FROM {table}").fetchone() == (expected,)


def test_a_handle_needs_no_grace_and_the_grace_reads_the_settings_syntax(pg: psycopg.Connection[Any]) -> None:
    # Given a login whose handle is hashed, and whose active token the worker replaced 90 s ago
    handle_hash = secrets.token_hex(32)
    call_record_login(pg, p_handle_hash=handle_hash)
    pg.execute(
        "UPDATE sessions SET previous_token_hash = %s, active_token_hash = %s, rotated_at = %s",
        [HASH, "ef" * 32, NOW - timedelta(seconds=90)],
    )
    ask = "SELECT reason FROM session_sync_authenticate(%s, %s, %s, %s)"

    # Then a handle authenticates without a grace, and SESSION_SYNC_REFRESH_GRACE's spellings read as durations
    assert pg.execute(ask, [[handle_hash], True, None, NOW]).fetchone() == (None,)
    for grace, reason in (("2m", None), ("90", "replaced"), ("91s", None), ("1.5m", "replaced"), ("1d", None)):
        assert pg.execute(ask, [[HASH], False, grace, NOW]).fetchone() == (reason,), grace
