"""Bad input to the web app's API and the push entry points: a clear error, and nothing written.

Every test starts from a real login (hosted-login code → ``/v2/client/userinfo`` at the emulator)
and runs on SQLite and PostgreSQL. "Nothing written" is judged by every row of every table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import orm

from tests.conftest import RunningEmulator
from tests.helpers import login
from worker import errors, models, push, runtime, sessions

pytestmark = pytest.mark.timeout(120)

Userinfo = dict[str, Any]
TABLES = models.Base.metadata.sorted_tables


def dump(db: orm.Session) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in key order (what "nothing written" is judged by)."""
    return {t.name: [tuple(r) for r in db.execute(sa.select(t).order_by(*t.primary_key.columns))] for t in TABLES}


def dump_all(rt: runtime.Runtime) -> dict[str, list[tuple[Any, ...]]]:
    with rt.sessions() as db:
        return dump(db)


def real_userinfo(rt: runtime.Runtime, emu: RunningEmulator, email: str = "ann@example.com") -> Userinfo:
    """What the app gets for a real login: the ``/v2/client/userinfo`` envelope."""
    return rt.run(rt.client.userinfo(emu.admin.login(email))).to_userinfo()


def secrets_of(userinfo: Userinfo) -> list[str]:
    return [userinfo["result"][kind]["token"] for kind in ("active_token", "refresh_token")]


def at(*path: str | int, value: object = ..., drop: bool = False) -> Callable[[Userinfo], Any]:
    """A malformation: set (or drop) the value at ``path`` of a copy of the real envelope."""

    def malform(good: Userinfo) -> Any:
        bad = copy.deepcopy(good)
        parent: Any = bad
        for key in path[:-1]:
            parent = parent[key]
        if drop:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return bad

    return malform


A, R = ("result", "active_token"), ("result", "refresh_token")

#: (what is wrong, how to make it from a real envelope, what the message must say)
MALFORMED: list[tuple[str, Callable[[Userinfo], object], str]] = [
    ("the active token itself", lambda u: u["result"]["active_token"]["token"], "not a JSON object"),
    ("a list", lambda u: [u], "not a JSON object"),
    ("nothing", lambda u: None, "not a JSON object"),
    ("an error envelope", at("status", value="InvalidToken"), "status is 'InvalidToken', not 'Success'"),
    ("a status of the wrong type", at("status", value=["Success"]), "not 'Success'"),
    ("no result", at("result", drop=True), "result is not an object"),
    ("a result that is a list", at("result", value=[]), "result is not an object"),
    ("no active token", at(*A, drop=True), "result.active_token is not an object"),
    ("no refresh token", at(*R, value=None), "result.refresh_token is not an object"),
    ("an active token without its secret", at(*A, "token", drop=True), "carry no secret"),
    ("a secret that is a number", at(*R, "token", value=12345), "carry no secret"),
    ("an empty active secret", at(*A, "token", value=""), "result.active_token.token is not a token"),
    ("an empty refresh secret", at(*R, "token", value=""), "result.refresh_token.token is not a token"),
    ("a secret with a line break", at(*A, "token", value="ptu_abc\ndef"), "active_token.token is not a token"),
    ("a secret that is not ASCII", at(*R, "token", value="ptr_\u00e9t\u00e9"), "refresh_token.token is not a token"),
    ("a megabyte of garbage secret", at(*A, "token", value="\u2603" * 1_000_000), "active_token.token is not a token"),
    ("an id that is a number", at(*A, "id", value=7), "result.active_token.id is missing or not a string"),
    ("an empty session id", at(*R, "id", value=""), "result.refresh_token.id is not a Pangea id"),
    ("a session id too long to store", at(*R, "id", value="pmt_" + "x" * 61), "refresh_token.id is not a Pangea id"),
    ("a user id with NUL", at(*A, "identity", value="pui_\x00"), "identity is not a Pangea user id"),
    ("a user id too long to store", at(*A, "identity", value="p" * 65), "identity is not a Pangea user id"),
    ("tokens of two users", at(*R, "identity", value="pui_" + "z" * 32), "two tokens belong to different users"),
    ("an email that is a list", at(*A, "email", value=["a@b"]), "active_token.email is missing or not a string"),
    ("an email too long to store", at(*A, "email", value="a" * 310 + "@example.com"), "email is not an email"),
    ("an email with a line break", at(*A, "email", value="a@b\nBcc: c@d"), "email is not an email"),
    ("an email with a lone surrogate", at(*A, "email", value="a\ud800@b"), "email is not an email"),
    ("a profile of numbers", at(*A, "profile", value={"age": 42}), "profile is not an object of strings"),
    ("a profile that is a string", at(*R, "profile", value="Ann"), "profile is not an object of strings"),
    ("scopes that are not strings", at(*A, "scopes", value=[1]), "scopes is not a list of strings"),
    ("a lifetime that is a string", at(*A, "life", value="3600"), "life is missing or not an integer"),
    ("a lifetime that is a boolean", at(*R, "life", value=True), "life is missing or not an integer"),
    ("an expiry in words", at(*A, "expire", value="tomorrow"), "expire is not an ISO-8601 date-time"),
    ("an expiry that is a number", at(*R, "expire", value=1_900_000_000), "expire is missing or not a string"),
    ("an expiry past the end of time", at(*A, "expire", value="9999-12-31T23:59:59-12:00"), "not between 1970"),
    ("a creation before time", at(*R, "created_at", value="0001-01-01T00:00:00+14:00"), "not between 1970"),
    (
        "an expiry before its creation",
        at(*A, "expire", value="2020-01-01T00:00:00Z"),
        "expire is before its created_at",
    ),
    # The bare result (no envelope) is accepted too, and checked just the same.
    ("a bare result with an empty secret", lambda u: at(*A, "token", value="")(u)["result"], "token is not a token"),
    ("a bare result with no refresh token", lambda u: at(*R, drop=True)(u)["result"], "refresh_token is not an object"),
]


def test_malformed_userinfo_is_named_and_writes_nothing(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given a real login's userinfo, and a database that already holds one session
    good = real_userinfo(rt, emu)
    login(rt, emu, "bob@example.com")
    before = dump_all(rt)

    for problem, malform, says in MALFORMED:
        # When the app hands record_login a malformed copy, catches the error and commits its transaction
        with rt.sessions.begin() as db:
            with pytest.raises(errors.InvalidUserinfo) as caught:
                sessions.record_login(db, malform(good), cipher=rt.cipher, policy=rt.policy)  # type: ignore[arg-type]
            pending = (list(db.new), list(db.dirty))
        # Then the message names the problem, on one line, without a secret
        message = str(caught.value)
        assert says in message, (problem, message)
        assert "\n" not in message and len(message) < 200, problem
        assert not any(secret in message for secret in secrets_of(good)), problem
        assert caught.value.__cause__ is None, problem
        # ... and nothing was written, or left pending to be written by the app's commit
        assert pending == ([], []), problem
        assert dump_all(rt) == before, problem

    # And the real userinfo still records exactly one session (so the checks above could see a write)
    with rt.sessions.begin() as db:
        recorded = sessions.record_login(db, good, cipher=rt.cipher, policy=rt.policy)
    after = dump_all(rt)
    assert len(after["sessions"]) == len(before["sessions"]) + 1
    assert {k: v for k, v in after.items() if k != "sessions"} == {k: v for k, v in before.items() if k != "sessions"}
    with rt.sessions() as db:
        assert sessions.authenticate(db, recorded.handle, cipher=rt.cipher).email == "ann@example.com"


# --- any JSON at all: one session, or InvalidUserinfo and nothing written -----------------------------

odd_text = st.sampled_from(
    ["", " ", "\x00", "\ud800", "ptu_a b", "x" * 70, "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20) | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=12,
)


def paths(value: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path inside a JSON object (the envelope's fields, the tokens' fields...)."""
    if not isinstance(value, dict):
        return []
    return [p for key, inner in value.items() for p in [(*prefix, key), *paths(inner, (*prefix, key))]]


@st.composite
def mutations(draw: st.DrawFn, good: Userinfo) -> object:
    """The real envelope with one field replaced by any JSON value (or dropped), or any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    path = draw(st.sampled_from(paths(good)))
    if draw(st.integers(0, 3)) == 0:
        return at(*path, drop=True)(good)
    return at(*path, value=draw(odd_text | json_values))(good)


def test_any_json_records_one_session_or_is_refused_cleanly(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    good = real_userinfo(rt, emu)
    outcomes: list[str] = []

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(mutations(good))
    def check(userinfo: object) -> None:
        with rt.sessions() as db:
            before = dump(db)
            try:
                recorded = sessions.record_login(db, userinfo, cipher=rt.cipher, policy=rt.policy)  # type: ignore[arg-type]
            except errors.InvalidUserinfo as exc:
                # Refused: nothing written, nothing pending, no secret in the message
                assert not db.new and dump(db) == before
                assert not any(secret in str(exc) for secret in secrets_of(good))
                outcomes.append("refused")
            else:
                # Recorded: exactly one new session, of the user the tokens say, and nothing else
                after = dump(db)
                assert [len(after[t.name]) - len(before[t.name]) for t in TABLES] == [
                    int(t.name == "sessions") for t in TABLES
                ]
                assert isinstance(userinfo, dict)
                result = userinfo["result"] if "status" in userinfo else userinfo
                assert db.get(models.LocalSession, recorded.id) is recorded.session
                assert recorded.user_id == result["active_token"]["identity"]
                # ... which its handle and its active token both authenticate
                for credential in (recorded.handle, result["active_token"]["token"]):
                    assert sessions.authenticate(db, credential, cipher=rt.cipher).id == recorded.id
                outcomes.append("recorded")
            finally:
                db.rollback()  # each example starts from the same database

    check()
    # Both outcomes occurred, so the property was tested from both sides
    assert {"refused", "recorded"} <= set(outcomes)


# --- ids that name nothing ------------------------------------------------------------------------

BAD_LOCAL_IDS: list[object] = [987_654, 0, -1, 2**63, 2**70, True, "1", 1.0]
BAD_PANGEA_IDS = ["pui_nobody", "", "pui_\x00", "pui_\ud800", "x" * 10_000, "pui_a\nb"]


def test_unknown_ids_are_clear_errors_and_change_nothing(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given session 1 (active) and a second one already logged out, its logout queued
    first, second = login(rt, emu, "ann@example.com"), login(rt, emu, "bob@example.com")
    assert first == 1
    with rt.sessions.begin() as db:
        sessions.logout(db, second, kick=False)
    before = dump_all(rt)

    # When the app logs out ids and users that do not exist (or cannot), in a transaction it commits
    with rt.sessions.begin() as db:
        for bad in BAD_LOCAL_IDS:
            with pytest.raises(errors.UnknownSession, match=r"^no local session with id ") as caught:
                sessions.logout(db, bad, kick=False)  # type: ignore[arg-type]
            assert "\n" not in str(caught.value)
        for user in BAD_PANGEA_IDS:
            with pytest.raises(errors.UnknownSession, match=r"^no local session for user ") as caught:
                sessions.logout_user(db, user, kick=False)
            assert "\n" not in str(caught.value) and len(str(caught.value)) < 120

    # ... and a push from Pangea names a session or user nobody has here
    with rt.sessions.begin() as db:
        for pangea_id in ["pmt_nobody", *BAD_PANGEA_IDS]:
            assert push.revoke_by_pangea_session_id(db, pangea_id) == []
            assert push.revoke_all_for_user(db, pangea_id) == []

    # Then nothing changed: session 1 was not logged out by `True`, "1" or 1.0
    assert dump_all(rt) == before

    # When real ids are used, the same calls do end sessions (so the comparison above could fail)
    with rt.sessions.begin() as db:
        sessions.logout(db, first, kick=False)
    assert dump_all(rt) != before


NOT_CREDENTIALS: list[tuple[object, str]] = [
    (True, "unknown"),  # JSON true is not session 1
    (1.0, "unknown"),
    (2**63, "unknown"),
    (-1, "unknown"),
    ("ptu_" + "x" * 32, "unknown"),
    ("lss_" + "A" * 32, "unknown"),
    ("ptu_\ud800", "unknown"),  # a lone surrogate, as json.loads returns for "\ud800"
    ("\x00", "unknown"),
    ("x" * 100_000, "unknown"),
    (None, "missing"),
    ("", "missing"),
]


def test_what_is_not_a_credential_is_refused_with_401(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given a live session with id 1
    assert login(rt, emu, "ann@example.com") == 1
    before = dump_all(rt)
    for credential, reason in NOT_CREDENTIALS:
        # When a request presents something that is not its credential
        with rt.sessions() as db, pytest.raises(errors.SessionInvalid) as caught:
            sessions.authenticate(db, credential, cipher=rt.cipher)  # type: ignore[arg-type]
        # Then it is an RFC 6750 refusal: not a crash, and not session 1
        assert (caught.value.reason, caught.value.status_code) == (reason, 401), repr(credential)[:40]
        assert caught.value.www_authenticate.startswith('Bearer realm="session-sync"')
    # ... and nothing changed, while session 1 still authenticates by its id
    assert dump_all(rt) == before
    with rt.sessions() as db:
        assert sessions.authenticate(db, 1, cipher=rt.cipher).email == "ann@example.com"
