"""Helpers shared by tests that run the engine against the emulator: settings, logins, row reads."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from tests.acceptance import harness
from tests.conftest import RunningEmulator
from worker import crypto, models, runtime, sessions, wire
from worker.settings import Settings

KEY = crypto.generate_key()


def env_for(
    db_url: str,
    pangea: RunningEmulator | str,
    *,
    token: str | None = None,
    broker: str | None = "memory://",
    **extra: str,
) -> dict[str, str]:
    """The environment a test configures the product with: in-process settings, the worker, the CLI, an app.

    The one builder of the tests, so that a setting renamed or added in ``worker.settings`` is
    changed here once. ``pangea`` is the emulator (its service token unless ``token`` says
    otherwise: an app passes the client token) or the base URL of a proxy in front of it (then
    ``token`` is required). ``broker=None`` leaves ``CELERY_BROKER_URL`` unset, as a web app's
    environment may. The metrics server stays off (port 0) unless ``extra`` names a port: tests
    run side by side (``pytest -n``) and would all take the default one. ``extra`` wins over all.
    """
    if isinstance(pangea, str):
        if token is None:
            raise TypeError("env_for: token= is required when pangea is a base URL")
        base_url = pangea
    else:
        base_url, token = pangea.base_url, token or pangea.service_token
    env = {
        "DATABASE_URL": db_url,
        "PANGEA_BASE_URL": base_url,
        "PANGEA_AUTHN_TOKEN": token,
        "SESSION_SYNC_ENCRYPTION_KEYS": KEY,
        "SESSION_SYNC_METRICS_PORT": "0",
    }
    if broker is not None:
        env["CELERY_BROKER_URL"] = broker
    return env | extra


def settings_for(db_url: str, emu: RunningEmulator, **extra: str) -> Settings:
    """In-process settings for the engine against the emulator: one quick retry, a generous rate limit."""
    return Settings.from_env(
        env_for(
            db_url,
            emu,
            SESSION_SYNC_HTTP_RETRIES="1",
            SESSION_SYNC_HTTP_TIMEOUT="2",
            SESSION_SYNC_RATE_LIMIT="1000",
            SESSION_SYNC_REFRESH_MARGIN="10s",
            SESSION_SYNC_CHECK_INTERVAL="5m",
        )
        | extra
    )


class MovedClock:
    """The runtimes' own clock (the database's, on PostgreSQL) moved on by the time a test lets pass.

    The engine and the outbox decide by the clock they are given (``clock=``): a test that needs a
    token to near its end *as the worker sees it* moves this clock instead of sleeping, and the
    worker makes the decisions a real wait would give, seconds sooner. The emulator keeps real
    time, so a token that must have *lapsed at Pangea* still takes a real wait.
    """

    def __init__(self, real: Callable[[], datetime]) -> None:
        self._real = real
        self.moved = timedelta()

    def __call__(self) -> datetime:
        return self._real() + self.moved

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the engine and the outbox."""
        self.moved += timedelta(seconds=seconds)


def moved_clock(*runtimes: runtime.Runtime) -> MovedClock:
    """One movable clock for the engines and outboxes of ``runtimes``; call it before they are first used."""
    clock = MovedClock(runtimes[0].clock)
    for rt in runtimes:
        # both read the clock once, when they are made
        assert "engine" not in rt.__dict__ and "delivery" not in rt.__dict__, "moved_clock after the engine was made"
        rt.clock = clock
    return clock


def login(rt: runtime.Runtime, emu: RunningEmulator, email: str, **ttl: Any) -> int:
    """A user logs in through the hosted page; the app records the session. Returns its local id."""
    code = emu.admin.login(email, **ttl)
    creds = rt.run(rt.client.userinfo(code))
    with rt.sessions.begin() as db:
        return sessions.record_login(db, creds.to_userinfo(), cipher=rt.cipher, policy=rt.policy).id


def login_many(rt: runtime.Runtime, emu: RunningEmulator, emails: list[str], **ttl: Any) -> list[int]:
    """Many users log in at once (twenty at a time); the app records their sessions in one transaction."""
    import asyncio

    import httpx

    async def everyone() -> list[wire.SessionCreds]:
        gate = asyncio.Semaphore(20)
        async with httpx.AsyncClient(base_url=emu.base_url, timeout=10) as admin:

            async def one(email: str) -> wire.SessionCreds:
                async with gate:
                    answer = await admin.post("/emulator/login", json={"email": email, **ttl})
                    answer.raise_for_status()
                    return await rt.client.userinfo(answer.json()["code"])

            return await asyncio.gather(*(one(e) for e in emails))

    logins = rt.run(everyone())
    with rt.sessions.begin() as db:
        return [sessions.record_login(db, c.to_userinfo(), cipher=rt.cipher, policy=rt.policy).id for c in logins]


def row(rt: runtime.Runtime, session_id: int) -> models.LocalSession:
    with rt.sessions() as db:
        found = db.get(models.LocalSession, session_id)
        assert found is not None
        return found


def active_token(rt: runtime.Runtime, session_id: int) -> str:
    return rt.cipher.decrypt(row(rt, session_id).active_token_enc)


def requests(emu: RunningEmulator, path: str) -> int:
    return sum(emu.admin.stats()["requests"].get(path, {}).values())


def wait_in_flight(emu: RunningEmulator, path: str, *, timeout: float = 20.0) -> None:
    """Wait until the emulator holds a request to ``path`` it has not answered yet (e.g. under latency)."""
    harness.wait_for(
        lambda: bool(emu.admin.stats()["in_flight"].get(path)),
        timeout=timeout,
        what=f"a request to {path} held by the emulator",
        every=0.02,
    )
