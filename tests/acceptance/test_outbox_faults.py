"""No lost logout: 1,000 logouts delivered through faults, a SIGKILLed worker and a flushed Redis.

A real ``celery -A worker worker -B`` on Redis and PostgreSQL delivers logouts to the emulator while
it fails 30% of logout requests with 5xx and answers bursts of TooManyRequests with Retry-After.
Mid-run the worker is SIGKILLed (its leases are left behind) and restarted, and Redis is flushed
(every queued message lost). Afterwards every event is delivered, Pangea shows every session logged
out, and Pangea saw exactly one successful logout per session: no call follows a recorded delivery.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from tests.acceptance import harness
from tests.conftest import RunningEmulator
from tests.helpers import env_for
from worker import emulator, models, runtime, sessions, task_names, wire
from worker.settings import DEFAULT_QUEUE, Settings

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CLIENT_LOGOUT = "/v2/client/session/logout"
USER_LOGOUT = "/v2/session/logout"
#: 980 session logouts and 20 user-wide logouts (of users with two sessions each): 1,000 events.
SESSION_EVENTS, USERS, SESSIONS_PER_USER = 980, 20, 2
E = models.LogoutEvent


def worker_env(pg_url: str, redis_url: str, emu: RunningEmulator, **extra: str) -> dict[str, str]:
    """Workers that deliver the outbox every second, 25 at a time, under a shared rate limit."""
    return (
        env_for(pg_url, emu, broker=redis_url)
        | {
            "SESSION_SYNC_OUTBOX_PERIOD": "1s",
            "SESSION_SYNC_OUTBOX_BACKOFF": "500ms",
            "SESSION_SYNC_OUTBOX_BACKOFF_CAP": "4s",
            "SESSION_SYNC_OUTBOX_BATCH_SIZE": "25",
            "SESSION_SYNC_CONCURRENCY": "25",
            "SESSION_SYNC_RATE_LIMIT": "150",  # shared by every worker process through Redis
            "SESSION_SYNC_LEASE": "15s",  # far above one batch's worst case (25 calls in parallel, 2 s timeouts)
            "SESSION_SYNC_HTTP_TIMEOUT": "2",
            "SESSION_SYNC_HTTP_RETRIES": "1",
            "SESSION_SYNC_CHECK_INTERVAL": "1h",
        }
        | extra
    )


async def _logins(rt: runtime.Runtime, emu: RunningEmulator, emails: list[str]) -> list[dict[str, Any]]:
    """Each email logs in through the hosted page (admin code → userinfo), 50 at a time."""
    gate = asyncio.Semaphore(50)
    async with httpx.AsyncClient(base_url=emu.base_url, timeout=10) as admin:

        async def one(email: str) -> dict[str, Any]:
            async with gate:
                answer = await admin.post("/emulator/login", json={"email": email})
                creds = await rt.client.userinfo(answer.json()["code"])
                return creds.to_userinfo()

        return await asyncio.gather(*(one(e) for e in emails))


def seed(rt: runtime.Runtime, emu: RunningEmulator, emails: list[str]) -> list[tuple[int, str, str]]:
    """Record the logins as the app would; returns (local id, user id, active token) per session."""
    results = rt.run(_logins(rt, emu, emails))
    with rt.sessions.begin() as db:
        rows = [sessions.record_login(db, r, cipher=rt.cipher, policy=rt.policy) for r in results]
        return [
            (r.id, r.user_id, str(res["result"]["active_token"]["token"])) for r, res in zip(rows, results, strict=True)
        ]


def outbox_counts(rt: runtime.Runtime) -> Counter[str]:
    """Events by state, plus ``leased``: pending events a worker holds right now."""
    now = datetime.now(UTC)
    with rt.sessions() as db:
        found: Counter[str] = Counter(
            {str(state): n for state, n in db.execute(sa.select(E.state, sa.func.count()).group_by(E.state))}
        )
        found["leased"] = db.execute(
            sa.select(sa.func.count()).where(E.state == "pending", E.claimed_until > now)
        ).scalar_one()
    return found


def logout_stats(emu: RunningEmulator) -> dict[str, dict[str, int]]:
    requests = emu.admin.stats()["requests"]
    return {path: dict(requests.get(path, {})) for path in (CLIENT_LOGOUT, USER_LOGOUT)}


class Weather:
    """Pangea's bad day, until stopped: 30% 5xx, with a burst of TooManyRequests every two seconds."""

    def __init__(self, base_url: str) -> None:
        self._admin = emulator.EmulatorAdmin(base_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Weather:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._admin.clear_faults()
        self._admin.close()

    def _run(self) -> None:
        paths = [CLIENT_LOGOUT, USER_LOGOUT]
        while not self._stop.is_set():
            self._admin.faults(error="InternalError", error_rate=0.3, paths=paths)
            if self._stop.wait(1.6):
                return
            self._admin.faults(error="TooManyRequests", error_rate=0.9, retry_after=2, paths=paths)
            self._stop.wait(0.4)


def test_every_logout_reaches_pangea_through_faults_crashes_and_a_flushed_broker(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = worker_env(pg_url, redis_url, emu)
    rt = runtime.Runtime(Settings.from_env(env))
    kicker = Celery("kicker", broker=redis_url)  # the web app's own Celery app, sending by name
    broker = redis.Redis.from_url(redis_url)
    worker: harness.WorkerProcess | None = None
    try:
        # Given 1,020 logged-in sessions: 980 users with one, 20 users with two
        started = time.monotonic()
        emails = [f"u{i}@example.com" for i in range(SESSION_EVENTS)]
        emails += [f"multi{i}@example.com" for i in range(USERS) for _ in range(SESSIONS_PER_USER)]
        seeded = seed(rt, emu, emails)
        singles, multis = seeded[:SESSION_EVENTS], seeded[SESSION_EVENTS:]
        multi_users = sorted({user for _, user, _ in multis})
        assert len(multi_users) == USERS
        seeded_in = time.monotonic() - started
        # ... a worker with embedded beat, and Pangea having a bad day
        worker = harness.start_worker(env, tmp_path, "-B", "--pool=prefork", "--concurrency=2", name="w1")
        with Weather(emu.base_url):
            run_started = time.monotonic()
            # When the app logs every one of them out, 100 per transaction, kicking delivery after each commit
            ids = [sid for sid, _, _ in singles]
            for chunk in range(0, len(ids), 100):
                with rt.sessions.begin() as db:
                    for sid in ids[chunk : chunk + 100]:
                        sessions.logout(
                            db,
                            sid,
                            kick=lambda: kicker.send_task(task_names.DELIVER_LOGOUTS, queue=DEFAULT_QUEUE, expires=30),
                        )
            with rt.sessions.begin() as db:
                for user in multi_users:
                    sessions.logout_user(db, user, kick=False)

            # ... and the worker is SIGKILLed while it holds leases, then restarted
            harness.wait_for(
                lambda: (c := outbox_counts(rt))["delivered"] >= 200 and c["leased"] > 0,
                timeout=30,
                what="200 deliveries and a batch in flight",
            )
            worker.kill(signal.SIGKILL)
            at_kill = outbox_counts(rt)
            orphaned = at_kill["leased"]  # only the dead worker held leases
            worker = harness.start_worker(env, tmp_path, "-B", "--pool=prefork", "--concurrency=2", name="w2")
            # ... and Redis loses every message it held
            harness.wait_for(lambda: outbox_counts(rt)["delivered"] >= 600, timeout=40, what="600 deliveries")
            broker.flushdb()
            flushed_at = datetime.now(UTC)
            # Then every event is delivered, in the end
            harness.wait_for(lambda: outbox_counts(rt)["pending"] == 0, timeout=60, what="an empty backlog")
            took = time.monotonic() - run_started

        # ... and delivering again, by beat and by hand, sends Pangea nothing more
        after = logout_stats(emu)
        kicker.send_task(task_names.DELIVER_LOGOUTS, queue=DEFAULT_QUEUE)
        time.sleep(3)
        assert logout_stats(emu) == after
    finally:
        if worker is not None:
            worker.kill(signal.SIGKILL)
        broker.close()
        kicker.close()

    try:
        final = outbox_counts(rt)
        with rt.sessions() as db:
            dump = repr(db.execute(sa.select(sa.text("*")).select_from(sa.table("logout_outbox"))).all())
            states = Counter(str(s) for s in db.scalars(sa.select(models.LocalSession.state)))
            after_flush = db.execute(sa.select(sa.func.count()).where(E.delivered_at > flushed_at)).scalar_one()
        # Every event delivered, none dead, every session logged out locally
        assert (final["delivered"], final["dead"], final["pending"]) == (SESSION_EVENTS + USERS, 0, 0)
        assert states == {"logged_out": len(seeded)}
        # ... including events delivered after Redis lost every message: the database was the truth
        assert after_flush > 0
        # Pangea shows every one of those sessions logged out
        verdicts = Counter(rt.run(_check_all(rt, [token for _, _, token in seeded])))
        assert verdicts == {wire.Verdict.INVALID: len(seeded)}
        # Exactly one successful logout per session at Pangea; an InvalidToken answer only for calls the
        # killed worker made but never recorded; user logouts once each (plus the same crash window)
        by_token, by_user = after[CLIENT_LOGOUT], after[USER_LOGOUT]
        assert by_token.get("200") == SESSION_EVENTS, by_token
        assert by_token.get("400", 0) <= orphaned, (by_token, orphaned)
        assert USERS <= by_user.get("200", 0) <= USERS + orphaned, (by_user, orphaned)
        assert set(by_token) <= {"200", "400", "429", "500"} and set(by_user) <= {"200", "429", "500"}
        # No token left in the outbox, in clear or encrypted
        assert not any(token in dump for _, _, token in seeded) and "gAAAA" not in dump
        with capsys.disabled():
            print(
                f"\noutbox fault run: events={SESSION_EVENTS + USERS} (session={SESSION_EVENTS}, user={USERS}) "
                f"delivered={final['delivered']} dead={final['dead']} pending={final['pending']}\n"
                f"  emulator {CLIENT_LOGOUT}: {by_token}   {USER_LOGOUT}: {by_user}\n"
                f"  SIGKILL at delivered={at_kill['delivered']} leaving {orphaned} leased; "
                f"Redis flushed at delivered>=600, {after_flush} delivered after the flush\n"
                f"  seeded {len(seeded)} sessions in {seeded_in:.1f} s; delivered all in {took:.1f} s"
            )
    finally:
        rt.close()


async def _check_all(rt: runtime.Runtime, tokens: list[str]) -> list[wire.Verdict]:
    gate = asyncio.Semaphore(50)

    async def one(token: str) -> wire.Verdict:
        async with gate:
            return (await rt.client.check_token(token)).verdict

    return await asyncio.gather(*(one(t) for t in tokens))


def test_a_logout_from_the_shell_is_kicked_to_the_worker_at_once(
    pg_url: str, redis_url: str, emu: RunningEmulator, tmp_path: Path
) -> None:
    # Given a worker whose periodic delivery would not run for an hour
    env = worker_env(pg_url, redis_url, emu, SESSION_SYNC_OUTBOX_PERIOD="1h")
    rt = runtime.Runtime(Settings.from_env(env))
    try:
        [(sid, _, token)] = seed(rt, emu, ["shell@example.com"])
        with harness.running_worker(env, tmp_path, "--pool=solo", name="kicked"):
            # When support logs the session out from the shell (the command commits, then kicks)
            command = "from worker import cli_outbox; cli_outbox.logout()"
            done = subprocess.run(
                [sys.executable, "-c", command, "--session", str(sid)],
                cwd=tmp_path,
                env={"PATH": "", "HOME": str(tmp_path), **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            # Then the worker delivers it within seconds, kicked through the broker
            took = harness.wait_for(lambda: outbox_counts(rt)["delivered"] == 1, timeout=15, what="the kicked delivery")
        assert rt.run(rt.client.check_token(token)).verdict is wire.Verdict.INVALID
        print(f"\nshell logout delivered {took:.1f} s after the command returned")
    finally:
        rt.close()
