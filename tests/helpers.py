"""Helpers shared by tests that run the engine against the emulator: settings, logins, row reads."""

from __future__ import annotations

from tests.conftest import RunningEmulator
from worker import crypto, models, runtime, sessions, wire
from worker.settings import Settings

KEY = crypto.generate_key()


def settings_for(db_url: str, emu: RunningEmulator, **extra: str) -> Settings:
    env = {
        "DATABASE_URL": db_url,
        "PANGEA_BASE_URL": emu.base_url,
        "PANGEA_AUTHN_TOKEN": emu.service_token,
        "SESSION_SYNC_ENCRYPTION_KEYS": KEY,
        "SESSION_SYNC_HTTP_RETRIES": "1",
        "SESSION_SYNC_HTTP_TIMEOUT": "2",
        "SESSION_SYNC_RATE_LIMIT": "1000",
        "SESSION_SYNC_REFRESH_MARGIN": "10s",
        "SESSION_SYNC_CHECK_INTERVAL": "5m",
        "CELERY_BROKER_URL": "memory://",
    }
    return Settings.from_env(env | extra)


def login(rt: runtime.Runtime, emu: RunningEmulator, email: str, **ttl: float) -> int:
    """A user logs in through the hosted page; the app records the session. Returns its local id."""
    code = emu.admin.login(email, **ttl)
    creds = rt.run(rt.client.userinfo(code))
    with rt.sessions.begin() as db:
        return sessions.record_login(db, creds.to_userinfo(), cipher=rt.cipher, policy=rt.policy).id


def login_many(rt: runtime.Runtime, emu: RunningEmulator, emails: list[str], **ttl: float) -> list[int]:
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
