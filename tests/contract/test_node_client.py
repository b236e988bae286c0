"""Conformance of another language: a Node.js client written from the README's database contract.

``client.mjs`` records logins, authenticates, logs out and rotates keys through the documented
hashes, Fernet and PostgreSQL functions. Here its answers are compared, answer for answer, with
``worker.sessions``; its rows with the rows ``worker.sessions`` writes; and the worker (its engine
and its logout delivery, against the emulator) must treat them alike: refresh timing, logouts of
sessions whose active token lapsed, the audit trail.

Needs Node.js 20 and ``npm ci`` in this folder (``.ci/run`` does both); skips without them outside CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator, require
from tests.helpers import KEY, settings_for
from worker import audit, crypto, engine, errors, models, operations, queries, runtime, sessions, verification

pytestmark = pytest.mark.timeout(180)

HERE = Path(__file__).resolve().parent
NODE = shutil.which("node")
REALM = "example"


class NodeClient:
    """The Node.js client as a child process: one JSON request per line, one answer per line."""

    def __init__(self, database_url: str) -> None:
        assert NODE is not None
        self._process = subprocess.Popen(
            [NODE, str(HERE / "repl.mjs"), database_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **request: Any) -> Any:
        """The result of one request; AssertionError with the client's message if it failed."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        assert line, "the Node client exited"
        answer = json.loads(line)
        assert answer["ok"], answer
        return answer["result"]

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=10)


@pytest.fixture
def node(pg_url: str) -> Iterator[NodeClient]:
    require(NODE is not None, "node not found: the conformance client needs Node.js 20")
    require((HERE / "node_modules" / "pg").is_dir(), f"the Node client's packages are missing: run npm ci in {HERE}")
    client = NodeClient(sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False))
    yield client
    client.close()


@pytest.fixture
def rt(pg_url: str, emu: RunningEmulator) -> Iterator[runtime.Runtime]:
    made = runtime.Runtime(settings_for(pg_url, emu, SESSION_SYNC_REFRESH_MARGIN="2m"))
    yield made
    made.close()


def userinfo(rt: runtime.Runtime, emu: RunningEmulator, email: str, **ttl: Any) -> dict[str, Any]:
    """A hosted login at the emulator, exchanged at /v2/client/userinfo: the envelope an app gets."""
    return rt.run(rt.client.userinfo(emu.admin.login(email, **ttl))).to_userinfo()


def python_answer(
    rt: runtime.Runtime,
    credential: Any,
    cipher: crypto.TokenCipher,
    now: datetime,
    grace: timedelta = timedelta(minutes=2),
) -> dict[str, Any]:
    """``worker.sessions.authenticate``'s answer at ``now``, in the Node client's shape."""
    with rt.sessions() as db:
        try:
            found = sessions.authenticate(db, credential, cipher=cipher, realm=REALM, grace=grace, now=now)
        except errors.SessionInvalid as exc:
            return {"status": 401, "reason": exc.reason, "challenge": exc.www_authenticate}
    return {"status": 200, "session": {**vars_of(found), "rotated_token": found.rotated_token}}


def vars_of(found: sessions.Authenticated) -> dict[str, Any]:
    return {
        "id": found.id,
        "user_id": found.user_id,
        "email": found.email,
        "expires_at": found.expires_at,
        "created_at": found.created_at,
        "last_checked_at": found.last_checked_at,
        "uncertain": found.uncertain,
    }


def node_answer(node: NodeClient, credential: Any, now: datetime) -> dict[str, Any]:
    """The Node client's answer at ``now`` (both sides are asked at one instant: no race with an expiry)."""
    answer: dict[str, Any] = node.call("authenticate", credential=credential, now=now.isoformat())
    if answer["status"] == 200:
        session = answer["session"]
        for field in ("expires_at", "created_at", "last_checked_at"):
            if session[field] is not None:
                session[field] = datetime.fromisoformat(session[field]).astimezone(UTC)
    return answer


def stored(rt: runtime.Runtime, session_id: int) -> dict[str, Any]:
    with rt.sessions() as db:
        found = db.execute(sa.select(models.LocalSession.__table__).where(models.LocalSession.id == session_id))
        return dict(found.mappings().one())


def outbox_rows(rt: runtime.Runtime, **where: Any) -> list[dict[str, Any]]:
    E = models.LogoutEvent
    with rt.sessions() as db:
        query = sa.select(E.__table__).filter_by(**where).order_by(E.id)
        return [dict(r) for r in db.execute(query).mappings()]


def trail(rt: runtime.Runtime, session_id: int) -> list[tuple[str, str, str | None]]:
    """The session's audit trail, oldest first: (action, outcome, reason)."""
    with rt.sessions() as db:
        return [(e.action, e.outcome, e.reason) for e in reversed(audit.history(db, session_id))]


def assert_login_row(row: dict[str, Any], info: dict[str, Any], cipher: crypto.TokenCipher) -> None:
    """Every column a login writes, from the userinfo it came from."""
    active, refresh = info["result"]["active_token"], info["result"]["refresh_token"]
    assert row["user_id"] == active["identity"] and row["email"] == active["email"]
    assert row["pangea_session_id"] == refresh["id"] and row["active_token_id"] == active["id"]
    assert cipher.decrypt(row["active_token_enc"]) == active["token"]
    assert cipher.decrypt(row["refresh_token_enc"]) == refresh["token"]
    assert row["active_token_hash"] == cipher.lookup_hash(active["token"])
    assert row["active_issued_at"] == datetime.fromisoformat(active["created_at"])
    assert row["active_expires_at"] == datetime.fromisoformat(active["expire"])
    assert row["refresh_expires_at"] == datetime.fromisoformat(refresh["expire"])
    assert (row["state"], row["failures"], row["uncertain"], row["version"]) == ("active", 0, False, 0)
    assert row["created_at"] == row["updated_at"]
    # NULL: on its group's schedule (a fresh login); else its own first check, not before the login
    assert row["next_check_at"] is None or row["next_check_at"] >= row["created_at"]
    for column in ("end_reason", "ended_at", "last_checked_at", "claimed_until", "claim_token", "rotated_at"):
        assert row[column] is None, column


def engine_at(rt: runtime.Runtime, clock: list[datetime]) -> engine.SyncEngine:
    """The worker's sync engine on ``rt``'s resources, reading the time from ``clock[0]``."""
    s = rt.settings
    return engine.SyncEngine(
        sessions=rt.sessions,
        client=rt.client,
        cipher=rt.cipher,
        limiter=rt.limiter,
        policy=rt.policy,
        batch_size=s.batch_size,
        concurrency=s.concurrency,
        lease=s.lease,
        refresh_lease=s.refresh_lease,
        bulk=s.bulk_revalidation,
        clock=lambda: clock[0],
    )


def refreshes(rt: runtime.Runtime, session_id: int) -> int:
    return sum(1 for action, _, _ in trail(rt, session_id) if action == "refreshed")


# --- the tests ------------------------------------------------------------------------------------------


def test_node_records_authenticates_logs_out_and_rotates_keys_like_worker_sessions(
    rt: runtime.Runtime, emu: RunningEmulator, node: NodeClient
) -> None:
    old_cipher = rt.cipher
    node.call("configure", keys=KEY, grace="2m", realm=REALM)

    # Given a login recorded by worker.sessions and one by the Node client (short-lived, so the worker refreshes them)
    py_info, node_info = (userinfo(rt, emu, f"{who}@example.com", active_ttl=6) for who in ("py", "node"))
    with rt.sessions.begin() as db:
        py = sessions.record_login(db, py_info, cipher=old_cipher, policy=rt.policy)
    first = node.call("record", userinfo=node_info)
    assert first["outcome"] == "recorded" and first["handle"].startswith("lss_")

    # Then both rows hold every column a login writes, from the userinfo
    assert_login_row(stored(rt, py.id), py_info, old_cipher)
    assert_login_row(stored(rt, first["id"]), node_info, old_cipher)

    # When the callback is retried, the same login answers with its session, and the transaction goes on
    again = node.call("record_then_query", userinfo=node_info)
    assert (again["outcome"], again["id"], again["still_usable"]) == ("already_recorded", first["id"], True)

    # Then every credential gets the same answer from both, challenge included
    tokens = [info["result"]["active_token"]["token"] for info in (py_info, node_info)]
    credentials: list[Any] = [py.handle, again["handle"], first["handle"], *tokens, py.id, first["id"]]
    credentials += ["", None, "pta_nobody", "lss_NOBODY", 2**62, f"{tokens[0]} "]
    at = datetime.now(UTC)
    for credential in credentials:
        assert node_answer(node, credential, at) == python_answer(rt, credential, old_cipher, at), credential
    assert node_answer(node, first["handle"], at)["reason"] == "unknown"  # replaced by the retried callback's handle

    # When the worker refreshes both sessions (6 s tokens: the lifetime caps the margin at 3 s, less jitter)
    time.sleep(3.8)
    assert rt.run(rt.engine.resync()).refreshed == 2
    # Then a replaced token is answered alike: within the grace with the new token, after it as replaced
    at = max(stored(rt, sid)["rotated_at"] for sid in (py.id, first["id"])) + timedelta(seconds=1)
    for credential in tokens:
        within = node_answer(node, credential, at)
        assert within == python_answer(rt, credential, old_cipher, at) and within["session"]["rotated_token"]
    node.call("configure", keys=KEY, grace="0", realm=REALM)
    for credential in tokens:
        after = node_answer(node, credential, at)
        assert after == python_answer(rt, credential, old_cipher, at, timedelta(0)) and after["reason"] == "replaced"

    # When the keys rotate (a new key first, the old one kept to decrypt and look up)
    new_key = crypto.generate_key()
    rotated = crypto.TokenCipher([new_key, KEY])
    node.call("configure", keys=f"{new_key},{KEY}", grace="2m", realm=REALM)
    late_info = userinfo(rt, emu, "late@example.com")
    late = node.call("record", userinfo=late_info)
    # Then the new row is written under the new key, the old rows are still found, and tokens the
    # worker encrypted under the old key still come back decrypted
    assert stored(rt, late["id"])["active_token_hash"] == rotated.lookup_hash(
        late_info["result"]["active_token"]["token"]
    )
    assert_login_row(stored(rt, late["id"]), late_info, rotated)
    for credential in [*tokens, late["handle"], late_info["result"]["active_token"]["token"], py.handle]:
        assert node_answer(node, credential, at) == python_answer(rt, credential, rotated, at), credential

    # When each side logs a session out, twice, and an unknown one
    before = {sid: stored(rt, sid)["version"] for sid in (py.id, first["id"])}
    with rt.sessions.begin() as db:
        sessions.logout(db, py.id, kick=False)
        assert sessions.logout(db, py.id, kick=False).state == "logged_out"
    out = node.call("logout", id=first["id"])
    assert out == {"found": True, "state": "logged_out", "event_id": out["event_id"]} and out["event_id"]
    assert node.call("logout", id=first["id"]) == {"found": True, "state": "logged_out", "event_id": None}
    assert node.call("logout", id=10**12) == {"found": False}
    # Then both rows ended the same way, each with one outbox row holding its token and one audit row
    for sid, info in ((py.id, py_info), (first["id"], node_info)):
        row = stored(rt, sid)
        assert (row["state"], row["end_reason"], row["refresh_token_enc"]) == ("logged_out", "user_logout", None)
        assert row["ended_at"] == row["updated_at"] and row["version"] == before[sid] + 1
        [event] = outbox_rows(rt, session_id=sid)
        assert (event["kind"], event["state"], event["attempts"], event["user_id"]) == (
            "session",
            "pending",
            0,
            info["result"]["active_token"]["identity"],
        )
        assert event["next_attempt_at"] == event["created_at"] == row["ended_at"]
        assert old_cipher.decrypt(event["token_enc"]) == old_cipher.decrypt(row["active_token_enc"])
        assert trail(rt, sid)[-1] == ("logged_out", "logout_queued", "user_logout")

    # When a user is logged out everywhere, twice, by each side (one user with an active session, one without)
    late_user = late_info["result"]["active_token"]["identity"]
    py_user = py_info["result"]["active_token"]["identity"]
    by_node = [node.call("logout_user", user_id=late_user, reason="admin") for _ in range(2)]
    with rt.sessions.begin() as db:
        by_python = [sessions.logout_user(db, py_user, reason="admin", kick=False) for _ in range(2)]
    # Then one user-wide logout per user is queued (even with no active session left) and reused
    assert [b["session_ids"] for b in by_node] == [[late["id"]], []]
    assert [b.session_ids for b in by_python] == [(), ()]
    assert by_node[0]["event_id"] == by_node[1]["event_id"] and by_python[0].event_id == by_python[1].event_id
    for user in (late_user, py_user):
        [event] = outbox_rows(rt, kind="user", user_id=user)
        assert (event["state"], event["token_enc"], event["session_id"]) == ("pending", None, None)
    assert trail(rt, late["id"])[-1] == ("logged_out", "logout_queued", "admin")
    assert node.call("logout_user", user_id="pui_nobody") == {"found": False}

    # When the worker (holding both keys) delivers every logout
    worker = runtime.Runtime(
        settings_for(rt.settings.database_url, emu, SESSION_SYNC_ENCRYPTION_KEYS=f"{new_key},{KEY}")
    )
    try:
        delivered = worker.run(worker.delivery.drain())
        # Then all four are delivered, Pangea holds none of these sessions, and the trails read alike
        assert (delivered.delivered, delivered.dead) == (4, 0)
        for sid in (py.id, first["id"], late["id"]):
            gone = worker.run(worker.client.session_list(filter={"id": stored(rt, sid)["pangea_session_id"]}))
            assert not gone.sessions, sid
        assert [a for a, _, _ in trail(rt, first["id"])] == [a for a, _, _ in trail(rt, py.id)]
        report = operations.session_report(worker, first["id"])
        assert report is not None and report["events"][0]["action"] == "logout_sent"
    finally:
        worker.close()


def test_the_worker_refreshes_nodes_rows_on_time_like_its_own(
    rt: runtime.Runtime, emu: RunningEmulator, node: NodeClient
) -> None:
    node.call("configure", keys=KEY)
    # Given two 24 s sessions, one recorded by worker.sessions and one by Node (which leaves next_check_at to the
    # worker), under the default 2 min margin floor: the lifetime caps it at 12 s, so refresh is due at 12 to 15 s
    infos = [userinfo(rt, emu, f"{who}@example.com", active_ttl=24, refresh_ttl=600) for who in ("py", "node")]
    with rt.sessions.begin() as db:
        py = sessions.record_login(db, infos[0], cipher=rt.cipher, policy=rt.policy).id
    nd = node.call("record", userinfo=infos[1])["id"]
    issued = [stored(rt, sid)["active_issued_at"] for sid in (py, nd)]
    clock = [min(issued) + timedelta(seconds=1)]
    worker = engine_at(rt, clock)

    def sweep_at(seconds: float) -> None:
        clock[0] = min(issued) + timedelta(seconds=seconds)
        while rt.run(worker.process_batch(due_by=clock[0])).checked:
            pass

    # When the worker sweeps at 1 s and 11 s, Then neither is refreshed (the Node row is checked once first)
    sweep_at(1)
    with rt.sessions() as db:  # derived: the Node row is on its group, whose round writes no row of it
        checked = db.execute(sa.select(verification.last_checked_at()).where(models.LocalSession.id == nd)).scalar_one()
    assert checked is not None
    sweep_at(11)
    assert (refreshes(rt, py), refreshes(rt, nd)) == (0, 0)
    # When it sweeps at 16 s, Then each is refreshed exactly once
    sweep_at(16)
    assert (refreshes(rt, py), refreshes(rt, nd)) == (1, 1)
    for sid in (py, nd):
        row = stored(rt, sid)
        assert row["rotated_at"] == clock[0] and row["previous_token_hash"] is not None


def test_a_logout_from_node_of_a_lapsed_session_ends_it_at_pangea(
    rt: runtime.Runtime, emu: RunningEmulator, node: NodeClient
) -> None:
    node.call("configure", keys=KEY)
    # Given a session recorded by Node whose active token lapsed (no refresh came) while Pangea still holds it
    info = userinfo(rt, emu, "fay@example.com", active_ttl=1)
    sid = node.call("record", userinfo=info)["id"]
    time.sleep(1.3)

    # When Node logs it out and the worker delivers
    assert node.call("logout", id=sid)["event_id"]
    counts = rt.run(rt.delivery.drain())

    # Then the session was ended at Pangea by its id (not taken for "already logged out")
    assert (counts.delivered, counts.already) == (1, 0)
    assert emu.admin.stats()["requests"]["/v2/session/invalidate"] == {"200": 1}
    pangea_id = info["result"]["refresh_token"]["id"]
    assert not rt.run(rt.client.session_list(filter={"id": pangea_id})).sessions
    assert [a for a, _, _ in trail(rt, sid)] == ["logged_out", "logout_sent"]


def test_node_reads_when_pangea_last_vouched_as_the_worker_derives_it(
    rt: runtime.Runtime, emu: RunningEmulator, node: NodeClient
) -> None:
    node.call("configure", keys=KEY, grace="2m", realm=REALM)
    # Given a session recorded by Node, checked once on its own, then on its group's schedule
    info = userinfo(rt, emu, "vouched@example.com")
    sid = node.call("record", userinfo=info)["id"]
    with rt.sessions.begin() as db:
        queries.make_due(db, now=rt.clock(), session_ids=[sid])
    rt.run(rt.engine.drain())
    column = stored(rt, sid)
    assert column["next_check_at"] is None and column["last_checked_at"] is not None

    # When its group's round checks it again (and writes no row of it)
    with rt.sessions.begin() as db:
        db.execute(sa.update(models.CheckGroup).values(next_check_at=rt.clock()))
    started = rt.clock()
    assert rt.run(rt.engine.drain()).kept == 1
    assert stored(rt, sid)["last_checked_at"] == column["last_checked_at"]

    # Then Node, through session_sync_authenticate, reads the round's time, as worker.sessions does
    token = info["result"]["active_token"]["token"]
    at = datetime.now(UTC)
    answer = node_answer(node, token, at)
    assert answer == python_answer(rt, token, rt.cipher, at)
    assert answer["session"]["last_checked_at"] >= started > column["last_checked_at"]
