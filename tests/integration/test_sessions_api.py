"""The web app's API (``worker.sessions``) and its glue (``worker.web``), on SQLite and PostgreSQL.

Logins are real (hosted-login code → userinfo → record_login against the emulator); sessions are
ended the ways they end in production (logout, a sweep after a kill at Pangea, a worker refresh).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import flask
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import active_token, login, row
from worker import errors, models, runtime, sessions, web
from worker.web import asgi

pytestmark = pytest.mark.timeout(120)


def authenticate(rt: runtime.Runtime, credential: str | int, **options: Any) -> sessions.Authenticated:
    with rt.sessions() as db:
        return sessions.authenticate(db, credential, cipher=rt.cipher, **options)


def refused(rt: runtime.Runtime, credential: str | int, **options: Any) -> errors.SessionInvalid:
    with pytest.raises(errors.SessionInvalid) as caught:
        authenticate(rt, credential, **options)
    return caught.value


def record(rt: runtime.Runtime, emu: RunningEmulator, email: str, *, whole_envelope: bool = True) -> sessions.Login:
    creds = rt.run(rt.client.userinfo(emu.admin.login(email)))
    userinfo = creds.to_userinfo()
    with rt.sessions.begin() as db:
        return sessions.record_login(db, userinfo if whole_envelope else userinfo["result"], cipher=rt.cipher)


def test_login_issues_an_opaque_handle_stored_only_as_a_keyed_hash(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given two logins, one recorded from the whole envelope and one from its result
    first = record(rt, emu, "ann@example.com")
    second = record(rt, emu, "bob@example.com", whole_envelope=False)

    # Then each has a fresh random handle that is not in the database, only its keyed hash
    for login_ in (first, second):
        assert re.fullmatch(r"lss_[A-Z2-7]{32}", login_.handle)
        assert login_.handle not in repr(login_)
        stored = row(rt, login_.id)
        assert stored.handle_hash == rt.cipher.lookup_hash(login_.handle)
        with rt.sessions() as db:
            dumped = [str(v) for r in db.execute(sa.select(models.LocalSession.__table__)) for v in r]
        assert dumped and all(login_.handle not in value for value in dumped)
    assert first.handle != second.handle and first.id != second.id

    # And the handle, the active token and the local id all authenticate the same session
    token = active_token(rt, first.id)
    by = [authenticate(rt, c) for c in (first.handle, token, first.id)]
    assert {a.id for a in by} == {first.id}
    assert by[0].email == "ann@example.com" and by[0].rotated_token is None
    assert by[0].last_checked_at is None and by[0].verified_within(timedelta(minutes=1))


def test_authenticate_asks_pangea_nothing_and_runs_one_query(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "ann@example.com")
    token, stats = active_token(rt, sid), emu.admin.stats()
    statements: list[str] = []
    sa.event.listen(rt.db_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    # When the app authenticates a hundred requests, and a few bad ones
    with rt.sessions() as db:
        for _ in range(100):
            sessions.authenticate(db, token, cipher=rt.cipher)
    statements.clear()
    authenticate(rt, token)
    one_call = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    for bad in ("ptu_" + "x" * 32, "lss_" + "A" * 32, 424242):
        refused(rt, bad)

    # Then Pangea heard nothing, and each call is a single SELECT
    assert emu.admin.stats() == stats
    assert len(one_call) == 1, one_call


def test_each_reason_gets_its_rfc6750_challenge_without_the_token(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given sessions ended every way a session ends
    live, out, killed = (login(rt, emu, f"{n}@example.com") for n in ("live", "out", "killed"))
    tokens = {sid: active_token(rt, sid) for sid in (live, out, killed)}
    with rt.sessions.begin() as db:
        sessions.logout(db, out, kick=False)
    rt.run(rt.client.session_invalidate(row(rt, killed).pangea_session_id or ""))
    rt.run(rt.engine.resync())
    later = row(rt, live).active_expires_at + timedelta(seconds=1)

    # Then each answer names the reason, with exactly the guide's header shape and the 401 status
    cases = {
        "unknown": refused(rt, "ptu_" + "q" * 32),
        "logged_out": refused(rt, tokens[out]),
        "revoked": refused(rt, tokens[killed]),
        "expired": refused(rt, tokens[live], now=later),
        "missing": refused(rt, ""),
    }
    for reason, exc in cases.items():
        assert (exc.reason, exc.status_code) == (reason, 401)
        expected = 'Bearer realm="session-sync"'
        if reason != "missing":
            expected += f', error="invalid_token", error_description="{sessions.DESCRIPTIONS[reason]}"'
        assert exc.www_authenticate == expected
        assert all(t not in str(exc) and t not in exc.www_authenticate for t in tokens.values())
    assert cases["expired"].www_authenticate.endswith('error_description="The token expired"')
    assert refused(rt, tokens[live], realm="example", now=later).www_authenticate == (
        'Bearer realm="example", error="invalid_token", error_description="The token expired"'
    )


@pytest.mark.parametrize(
    ("realm", "description", "expected"),
    [
        ('my "app"', "fine", 'Bearer realm="my \\"app\\"", error="invalid_token", error_description="fine"'),
        ("a\\b", "x", 'Bearer realm="a\\\\b", error="invalid_token", error_description="x"'),
        ("a\r\nX-Evil: 1", "x", 'Bearer realm="aX-Evil: 1", error="invalid_token", error_description="x"'),
        ("r", 'say "no" \\ now\n', 'Bearer realm="r", error="invalid_token", error_description="say \'no\' / now"'),
    ],
)
def test_challenge_quoting(realm: str, description: str, expected: str) -> None:
    # Given awkward characters, When the challenge is rendered
    value = errors.SessionInvalid(description, realm=realm).www_authenticate
    # Then the realm is a valid quoted-string and error_description stays in RFC 6750's character set
    assert value == expected
    described = value.split('error_description="', 1)[1][:-1]
    assert all(c in "\x20\x21" or "\x23" <= c <= "\x5b" or "\x5d" <= c <= "\x7e" for c in described)


def test_a_replaced_token_works_for_the_grace_period_and_hands_back_the_new_one(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime()
    # Given a Bearer client whose token the worker refreshes
    sid = login(rt, emu, "bob@example.com", active_ttl=4)
    old = active_token(rt, sid)
    time.sleep(3)
    assert rt.run(rt.engine.resync()).refreshed == 1
    new, rotated_at = active_token(rt, sid), row(rt, sid).rotated_at
    assert new != old and rotated_at is not None
    assert row(rt, sid).previous_token_hash == rt.cipher.lookup_hash(old)
    grace = timedelta(seconds=2)  # shorter than the new token's 4 s life

    # When the old token comes in within the grace period
    within = authenticate(rt, old, grace=grace, now=rotated_at + grace - timedelta(seconds=1))
    # Then it authenticates, carrying the new token; the new one carries nothing
    assert (within.id, within.rotated_token) == (sid, new)
    assert authenticate(rt, new, grace=grace).rotated_token is None
    assert new not in repr(within)

    # When it comes in after the grace period, it is refused as replaced
    exc = refused(rt, old, grace=grace, now=rotated_at + grace)
    assert exc.reason == "replaced"
    assert exc.www_authenticate.endswith('error_description="The token was replaced by a refresh"')

    # When the session is logged out, neither token authenticates, grace or not
    with rt.sessions.begin() as db:
        sessions.logout(db, sid, kick=False)
    assert refused(rt, old, grace=grace).reason == "logged_out"
    assert refused(rt, new).reason == "logged_out"


def test_flask_decorator(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    made = record(rt, emu, "ann@example.com")
    guard = web.Guard(db=rt.sessions, cipher=rt.cipher, realm="flask")
    app = flask.Flask(__name__)

    @app.get("/me")
    @web.flask_login_required(guard)
    def me() -> dict[str, Any]:
        return {"email": flask.g.session.email}

    client = app.test_client()
    # When a request comes with the cookie, with the Bearer token, and with nothing
    client.set_cookie("session", made.handle)
    by_cookie = client.get("/me")
    client.delete_cookie("session")
    by_bearer = client.get("/me", headers={"Authorization": f"Bearer {active_token(rt, made.id)}"})
    without = client.get("/me")
    wrong = client.get("/me", headers={"Authorization": "Bearer nope"})

    # Then the first two are let in, the others get 401 with the challenge
    assert by_cookie.json == by_bearer.json == {"email": "ann@example.com"}
    assert (without.status_code, without.headers["WWW-Authenticate"]) == (401, 'Bearer realm="flask"')
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"].endswith('error_description="The token is not recognized"')


def test_asgi_middleware(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    made = record(rt, emu, "ann@example.com")
    guard = web.Guard(db=rt.sessions, cipher=rt.cipher)

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        body = scope["state"]["session"].email.encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    app = asgi.SessionSyncMiddleware(inner, guard, protect=("/private",))

    async def get(path: str, **headers: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get(path, headers=headers)

    # When the protected path is asked with the cookie, and with a logged-out session's cookie
    ok = asyncio.run(get("/private/me", cookie=f"theme=dark; session={made.handle}"))
    with rt.sessions.begin() as db:
        sessions.logout(db, made.id, kick=False)
    gone = asyncio.run(get("/private/me", cookie=f"session={made.handle}"))

    # Then the first reaches the app with the session, the second is refused with the challenge
    assert (ok.status_code, ok.text) == (200, "ann@example.com")
    assert gone.status_code == 401
    assert gone.headers["www-authenticate"].endswith('error_description="The session was logged out"')


def test_the_old_middleware_name_still_works_and_says_it_is_renamed() -> None:
    # When an app still uses worker.web.SessionMiddleware (it clashed with Starlette's)
    with pytest.warns(DeprecationWarning, match="renamed worker.web.asgi.SessionSyncMiddleware"):
        old = web.SessionMiddleware
    # Then it is the renamed class, for one more release
    assert old is asgi.SessionSyncMiddleware


FRAMEWORKS = "{'fastapi', 'flask', 'starlette', 'django', 'rest_framework', 'flask_login', 'flask_sqlalchemy'}"


def test_importing_the_package_imports_no_web_framework() -> None:
    # When the package, the sessions API and the shared glue are imported in a fresh interpreter
    imports = "worker, worker.sessions, worker.web, worker.web.asgi"
    code = f"import sys, {imports}; print(sorted({FRAMEWORKS} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Then no web framework was loaded
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "framework"),
    [
        ("worker.web.django", "flask"),
        ("worker.web.flask", "django"),
        ("worker.web.starlette", "flask"),
        ("worker.web.fastapi", "django"),
    ],
)
def test_each_glue_imports_only_its_own_framework(module: str, framework: str) -> None:
    # When one framework's glue is imported
    code = f"import sys, {module}; print('{framework}' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Then another framework was not loaded with it
    assert out.strip() == "False"


def test_framework_settings_win_over_the_environment() -> None:
    # Given the environment and a framework's configuration (Django settings, Flask app.config)
    env = {"SESSION_SYNC_REFRESH_GRACE": "5m", "SESSION_SYNC_CHECK_INTERVAL": "7m"}
    config = {"SESSION_SYNC_REFRESH_GRACE": timedelta(seconds=30), "DEBUG": True, "SESSION_SYNC_OUTBOX_KICK": False}
    # When the worker's settings are read from both
    settings = web.settings_from(config, env)
    # Then the configuration wins, the environment fills in, and foreign keys are ignored
    assert (settings.refresh_grace, settings.check_interval) == (timedelta(seconds=30), timedelta(minutes=7))
    assert settings.outbox_kick is False
    # ... and a bad value is refused naming the variable
    with pytest.raises(errors.ConfigError, match="SESSION_SYNC_REFRESH_GRACE"):
        web.settings_from({"SESSION_SYNC_REFRESH_GRACE": "soon"}, env)


def test_authenticate_by_id_checks_expiry(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    sid = login(rt, emu, "ann@example.com")
    # Then a local id (for tasks and the CLI) authenticates until the token's expiry
    assert authenticate(rt, sid).id == sid
    assert refused(rt, sid, now=datetime.now(UTC) + timedelta(days=1)).reason == "expired"
