"""``session-sync demo``: the whole product on embedded defaults, on a fresh machine, in under a minute.

SQLite for the database, kombu's SQLAlchemy transport for the broker, the built-in emulator for
Pangea, and a real Celery worker with embedded beat in a child process. It seeds groups of
sessions with different fates, does things to them at "Pangea", shows progress, and ends with a
table of what happened to each group against what should have: exit status 1 if anything is off.
Everything lives in a temporary folder and every process it started is stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
import uvicorn

from worker import crypto, emulator, models, runtime, sessions, wire
from worker import db as dbmod
from worker.settings import Settings

#: How long the demo waits for every group to reach its expected end, at most.
DEFAULT_DEADLINE = 50.0
#: How long the demo watches, at least, so refreshes can be seen keeping sessions alive.
MIN_WATCH = 14.0


@dataclass
class Group:
    """Sessions seeded alike, and what should become of them."""

    name: str
    expected: str
    done: Callable[[list[models.LocalSession]], bool]
    ids: list[int] = field(default_factory=list)
    first_tokens: dict[int, str] = field(default_factory=dict)


def _all(state: models.SessionState, reason: str | None = None) -> Callable[[list[models.LocalSession]], bool]:
    return lambda rows: bool(rows) and all(r.state is state and r.end_reason == reason for r in rows)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        pass


@contextmanager
def _emulator(port: int) -> Iterator[str]:
    app = emulator.create_app(service_token=emulator.DEFAULT_SERVICE_TOKEN, client_token=emulator.DEFAULT_CLIENT_TOKEN)
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _worker(env: dict[str, str], folder: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = folder / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--loglevel=info"],
            cwd=folder,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def run(*, deadline: float = DEFAULT_DEADLINE, echo: Callable[[str], None] = click.echo) -> bool:
    """Run the demo; True when every group ended as it should."""
    with tempfile.TemporaryDirectory(prefix="session-sync-demo-") as tmp:
        folder = Path(tmp)
        with _emulator(_free_port()) as base_url:
            env = {
                "DATABASE_URL": f"sqlite:///{folder / 'sessions.db'}",
                "CELERY_BROKER_URL": f"sqla+sqlite:///{folder / 'broker.db'}",
                "PANGEA_BASE_URL": base_url,
                "PANGEA_AUTHN_TOKEN": emulator.DEFAULT_SERVICE_TOKEN,
                "SESSION_SYNC_ENCRYPTION_KEYS": crypto.generate_key(),
                "SESSION_SYNC_CHECK_INTERVAL": "4s",
                "SESSION_SYNC_SWEEP_PERIOD": "1s",
                "SESSION_SYNC_REFRESH_MARGIN": "3s",
                "SESSION_SYNC_OUTBOX_PERIOD": "1s",
                "SESSION_SYNC_OUTBOX_BACKOFF": "500ms",
            }
            rt = runtime.Runtime(Settings.from_env(env))
            try:
                return _show(rt, env, folder, deadline, echo)
            finally:
                rt.close()


def _show(rt: runtime.Runtime, env: dict[str, str], folder: Path, deadline: float, echo: Callable[[str], None]) -> bool:
    dbmod.upgrade(rt.settings.database_url)
    admin = emulator.EmulatorAdmin(rt.settings.authn_base_url)
    groups = [
        Group("healthy", "still active, untouched", _all(models.SessionState.ACTIVE)),
        Group("killed at Pangea", "revoked (invalid_token)", _all(models.SessionState.REVOKED, "invalid_token")),
        Group("about to expire", "refreshed, still active", lambda rows: False),
        Group("expired, worker down", "revoked (expired)", _all(models.SessionState.REVOKED, "expired")),
        Group("logged out, Pangea 5xx", "logged out here and at Pangea", lambda rows: False),
    ]
    healthy, killed, expiring, mortal, logged_out = groups
    logged_out.done = lambda rows: (
        _all(models.SessionState.LOGGED_OUT, "user_logout")(rows)
        and all(
            rt.run(rt.client.check_token(logged_out.first_tokens[r.id])).verdict is wire.Verdict.INVALID for r in rows
        )
    )
    expiring.done = lambda rows: (
        bool(rows)
        and all(
            r.state is models.SessionState.ACTIVE
            and rt.cipher.decrypt(r.active_token_enc) != expiring.first_tokens[r.id]
            for r in rows
        )
    )
    echo(f"session-sync demo in {folder} (SQLite, embedded broker, built-in Pangea emulator)")
    # Refresh tokens slide on every refresh, so a session expires for good only when nobody refreshed
    # it in time: these are seeded first with one-second tokens and expire before the worker starts.
    seeded = time.monotonic()
    plan: list[tuple[Group, int, dict[str, float]]] = [
        (mortal, 6, {"active_ttl": 1, "refresh_ttl": 1}),
        (healthy, 12, {}),
        (killed, 10, {}),
        (expiring, 10, {"active_ttl": 10}),
        (logged_out, 6, {}),
    ]
    for group, count, ttl in plan:
        for i in range(count):
            sid = _login(rt, admin, f"{group.name.split()[0].rstrip(',')}{i}@example.com", **ttl)
            group.ids.append(sid)
    time.sleep(max(0.0, 1.5 - (time.monotonic() - seeded)))
    for group in (expiring, logged_out):
        for sid in group.ids:
            group.first_tokens[sid] = rt.cipher.decrypt(_rows(rt, [sid])[0].active_token_enc)
    echo(
        f"seeded {sum(len(g.ids) for g in groups)} sessions through Pangea's login flow: "
        + ", ".join(f"{len(g.ids)} {g.name}" for g in groups)
    )

    with _worker(env, folder) as (proc, log):
        for sid in killed.ids:
            rt.run(rt.client.session_invalidate(_rows(rt, [sid])[0].pangea_session_id or ""))
        echo(f"killed {len(killed.ids)} sessions at Pangea; worker and beat running (log: {log.name})")
        # Users log out while Pangea answers every logout with a 5xx: the outbox keeps them.
        admin.faults(error_rate=1.0, error="InternalError", paths=["/v2/client/session/logout"])
        with rt.sessions.begin() as db:
            for sid in logged_out.ids:
                sessions.logout(db, sid, kick=False)
        echo(f"{len(logged_out.ids)} users logged out while Pangea fails every logout; it heals in 5 s")
        heal_at = time.monotonic() + 5
        started = time.monotonic()
        while True:
            if heal_at and time.monotonic() >= heal_at:
                admin.clear_faults()
                heal_at = 0.0
            elapsed = time.monotonic() - started
            done = {g.name: g.done(_rows(rt, g.ids)) for g in groups}
            echo(f"  {elapsed:4.0f} s  " + "  ".join(f"{g.name}: {'ok' if done[g.name] else '..'}" for g in groups))
            if (all(done.values()) and elapsed >= MIN_WATCH) or elapsed > deadline:
                break
            if proc.poll() is not None:
                echo(f"the worker exited with status {proc.returncode}")
                break
            time.sleep(1)
        worker_log = log.read_text(errors="replace")

    ok = _table(rt, groups, echo)
    if not ok:
        echo("worker log (last lines):\n" + "\n".join(worker_log.splitlines()[-30:]))
    echo("")
    echo("Flower and task events need Redis or RabbitMQ (the embedded SQLite broker has no fanout):")
    echo("  CELERY_BROKER_URL=redis://127.0.0.1:6379/0 celery -A worker flower")
    admin.close()
    return ok


def _login(rt: runtime.Runtime, admin: emulator.EmulatorAdmin, email: str, **ttl: Any) -> int:
    code = admin.login(email, **ttl)
    creds = rt.run(rt.client.userinfo(code))
    with rt.sessions.begin() as db:
        return sessions.record_login(db, creds.to_userinfo(), cipher=rt.cipher, policy=rt.policy).id


def _rows(rt: runtime.Runtime, ids: list[int]) -> list[models.LocalSession]:
    with rt.sessions() as db:
        return list(db.scalars(sa.select(models.LocalSession).where(models.LocalSession.id.in_(ids))))


def _table(rt: runtime.Runtime, groups: list[Group], echo: Callable[[str], None]) -> bool:
    now = datetime.now(UTC)
    echo("")
    echo(f"{'group':<22} {'n':>3}  {'expected':<30} {'what happened':<32} ")
    all_ok = True
    for g in groups:
        rows = _rows(rt, g.ids)
        states: dict[str, int] = {}
        for r in rows:
            label = str(r.state) + (f" ({r.end_reason})" if r.end_reason else "")
            if r.state is models.SessionState.ACTIVE and r.active_expires_at <= now:
                label = "LAPSED"
            states[label] = states.get(label, 0) + 1
        ok = g.done(rows)
        all_ok = all_ok and ok
        happened = ", ".join(f"{n} {label}" for label, n in sorted(states.items()))
        echo(f"{g.name:<22} {len(rows):>3}  {g.expected:<30} {happened:<32} {'OK' if ok else 'WRONG'}")
    echo("")
    echo("every group ended as it should" if all_ok else "SOMETHING IS OFF: see the table above")
    return all_ok
