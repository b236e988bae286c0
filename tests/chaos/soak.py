"""The chaos soak: real workers and beat through an overlapping, seeded schedule of faults, then judged.

Several ``celery -A worker worker`` processes and a ``celery -A worker beat`` work on PostgreSQL
with a Redis server of the soak's own (and, when it restarts PostgreSQL, a PostgreSQL server of its
own too: :mod:`tests.chaos.postgres`), against the emulator over HTTP. The :mod:`plan` drives
everything at once: users log in and out through ``worker.sessions``, admins end sessions at
Pangea through its real endpoints, Pangea fails in one way after another, and workers, beat,
Redis (and, when asked, PostgreSQL) die and come back. Then everything heals and the run is judged
by the fault matrix's measure (:class:`tests.faults.world.World`: wrongly revoked, missed, lost
logouts, refresh tokens reused, orphaned Pangea sessions, audit revocations not applied) from
Pangea's session list and the database's rows, plus leases taken while live (:mod:`leases`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy import orm

from tests.chaos import leases, plan
from tests.chaos.fleet import Fleet
from tests.chaos.postgres import PrivatePostgres
from tests.conftest import RunningEmulator
from tests.faults.test_process_faults import RedisServer
from tests.faults.world import Figures, World, _pangea_sessions, _run, fault_env
from worker import guard, models, runtime, sessions
from worker.settings import Settings

S = models.LocalSession
#: Active-token lifetimes a login draws from (seconds): short ones refresh many times in a run.
LIFETIMES = (8.0, 8.0, 8.0, 20.0, 20.0, 20.0, 3600.0, 3600.0, 3600.0, 3600.0)
#: How long the soak waits, after the heal, for the worker to catch up before judging anyway.
RECOVERY_LIMIT = 90.0


class SoakWorld(World):
    """The fault matrix's world, with sessions that come and go while the soak runs."""

    def __init__(self, rt: runtime.Runtime, emu: RunningEmulator) -> None:  # no logins up front
        self.rt = rt
        self.emu = emu
        self.ids: list[int] = []
        # Sets here (the matrix's World keeps lists): the soak adds and tests membership as sessions come and go.
        self.doomed: set[int] = set()  # type: ignore[assignment]
        self.leaving: set[int] = set()  # type: ignore[assignment]
        self._pangea_ids: dict[int, str] = {}
        self.user_of: dict[int, str] = {}

    @property
    def living(self) -> list[int]:  # type: ignore[override]
        """Sessions nobody ended: each must still be active after recovery (or lost in transit)."""
        return [sid for sid in self.ids if sid not in self.doomed and sid not in self.leaving]

    def caught_up(self, since: datetime) -> bool:
        """Recovered: the fault matrix's measure (the outbox empty, every session ended at Pangea
        revoked here, every living one verified or refreshed since ``since``), and the guard not
        tripped. A tripped guard holds revocations until an operator confirms; the soak models no
        operator, since none of its faults is one an operator should have to confirm."""
        with self.rt.sessions() as db:
            if guard.is_tripped(db):
                return False
        return super().caught_up(since)

    def add(self, session_id: int, pangea_id: str, user_id: str) -> None:
        self.ids.append(session_id)
        self._pangea_ids[session_id] = pangea_id
        self.user_of[session_id] = user_id

    def sessions_of(self, user_id: str) -> list[int]:
        return [sid for sid in self.ids if self.user_of[sid] == user_id]

    def explain(self, limit: int = 16) -> list[str]:
        """One line per session that counts against the run (what it counts as, its ids, its row,
        its outbox rows, its audit trail); lost-in-transit sessions, which are expected, come last."""
        live = _run(_pangea_sessions(self.emu, list(self._pangea_ids.values())))
        ended = self.emu.admin.ended(list(self._pangea_ids.values()))
        first: list[str] = []
        last: list[str] = []
        with self.rt.sessions() as db:
            for sid in self.ids:
                row = db.get(S, sid)
                assert row is not None
                item = live.get(self._pangea_ids[sid])
                carries = item is not None and (item.get("active_token") or {}).get("id") == row.active_token_id
                role = "doomed" if sid in self.doomed else "leaving" if sid in self.leaving else "living"
                active = row.state is models.SessionState.ACTIVE
                if role == "doomed" and active:
                    kind = "missed"
                elif role == "leaving" and item is not None:
                    kind = "logout lost"
                elif item is not None and not active and carries:
                    kind = "wrongly revoked"
                elif item is not None and not carries:
                    kind = "orphaned"
                elif role == "living" and not active:
                    kind = "lost in transit" if row.end_reason == "refresh_lost" else "wrongly revoked (unexplained)"
                else:
                    continue
                at_pangea = (
                    _gone(ended.get(self._pangea_ids[sid]))
                    if item is None
                    else "live with our token"
                    if carries
                    else "live, another token"
                )
                line = (
                    f"session {sid} {kind} ({role}; user {row.user_id}; Pangea id {self._pangea_ids[sid]}, stored "
                    f"{row.pangea_session_id}): {row.state.value}/{row.end_reason}, at Pangea "
                    f"{at_pangea};"
                    f" {_trail(db, sid)}"
                )
                (last if kind == "lost in transit" else first).append(line)
        return (self.unapplied_revocations() + first + last)[:limit]

    def unapplied_revocations(self) -> list[str]:
        """Audit revocations whose row is not revoked with that reason, one line each (see audit_unapplied)."""
        ev = models.SessionEvent
        stmt = (
            sa.select(ev.session_id, ev.at, ev.outcome, ev.reason, S.state, S.end_reason)
            .join(S, S.id == ev.session_id)
            .where(ev.action == "revoked", sa.or_(S.state != models.SessionState.REVOKED, S.end_reason != ev.reason))
            .order_by(ev.id)
        )
        with self.rt.sessions() as db:
            return [
                f"audit of session {r.session_id} says revoked:{r.outcome}:{r.reason} at {r.at:%H:%M:%S};"
                f" the row is {r.state.value}/{r.end_reason}"
                for r in db.execute(stmt)
            ]


def _gone(ended: dict[str, str] | None) -> str:
    """How Pangea's side of a session ended, as the emulator journaled it."""
    return "gone" if ended is None else f"gone ({ended['how']} at {ended['at'][11:23]})"


def _trail(db: orm.Session, sid: int) -> str:
    """A session's outbox rows and audit events, oldest first, in one line."""
    E, V = models.LogoutEvent, models.SessionEvent
    outbox = db.execute(sa.select(E.kind, E.state, E.attempts, E.last_error).where(E.session_id == sid)).all()
    events = db.execute(sa.select(V.at, V.action, V.outcome, V.reason).where(V.session_id == sid).order_by(V.id))
    shown = [f"{e.at:%H:%M:%S.%f}"[:-3] + f" {e.action}:{e.outcome}:{e.reason}" for e in events]
    return f"outbox {[tuple(o) for o in outbox]} events {shown}"


@dataclass
class Tally:
    """What the soak did (not what the worker did): the notes of its figures."""

    logins: int = 0
    logins_failed: int = 0
    logouts: int = 0
    user_logouts: int = 0
    ended_at_pangea: int = 0
    pangea_windows: int = 0
    redis_kills: int = 0
    postgres_restarts: int = 0
    app_errors: int = 0
    #: Most seconds an event of the plan came later than planned (the driver waits on Pangea and the app).
    behind_schedule: int = 0


class Soak:
    """One run of a :class:`plan.Plan` against a :class:`Fleet`; :meth:`run` returns its figures."""

    def __init__(
        self,
        *,
        pg_url: str,
        emu: RunningEmulator,
        redis: RedisServer,
        workdir: Path,
        the_plan: plan.Plan,
        workers: int = 3,
        postgres: PrivatePostgres | None = None,
        slots: list[dict[str, str]] | None = None,
        name: str = "chaos",
        **settings: str,
    ) -> None:
        base = fault_env(pg_url, emu.base_url, emu.service_token)
        # Batches of 20 refreshed 4 at a time: a slow Pangea makes a batch outlast its hold (issue #12)
        base |= {"SESSION_SYNC_BATCH_SIZE": "20", "SESSION_SYNC_CONCURRENCY": "4"} | settings
        self.env = base | {"CELERY_BROKER_URL": redis.url}
        self.rt = runtime.Runtime(Settings.from_env(base))
        self.emu = emu
        self.redis = redis
        self.plan = the_plan
        self.name = name
        self.postgres = postgres
        self.world = SoakWorld(self.rt, emu)
        self.fleet = Fleet(self.env, workdir, slots or [{} for _ in range(workers)])
        self.tally = Tally()
        self._rng = random.Random(the_plan.seed)
        # Enough users that the ones Pangea's admins logged out everywhere (never to return, see _ban) never run out
        self._users = [f"u{i}@chaos.example" for i in range(max(200, round(the_plan.seconds * 0.6)))]
        # Users an admin logged out everywhere at Pangea: the soak's own call, retried through faults
        # until confirmed, would end a new login (the app's user-wide logouts spare later logins)
        self._banned: set[str] = set()
        self._emails: dict[str, str] = {}  # Pangea user id -> email
        self._down = {"redis": threading.Lock(), "postgres": threading.Lock()}
        self._next_retry = 0.0
        self._pending: list[tuple[str, dict[str, Any]]] = []  # Pangea-side endings not yet confirmed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fault_until = 0.0
        self._pangea = httpx.Client(
            base_url=emu.base_url, timeout=1.0, headers={"Authorization": f"Bearer {emu.service_token}"}
        )
        leases.install(self.rt.db_engine, lease=self.rt.settings.lease, refresh_lease=self.rt.settings.refresh_lease)

    # --- the run ----------------------------------------------------------------------------------

    def populate(self, count: int) -> None:
        """``count`` users log in before the run (some users twice: user-wide logouts end several)."""
        for _ in range(count):
            self._login(self._rng.randrange(1 << 30))

    def run(self) -> Figures:
        """Start the fleet, play the plan, heal, wait for recovery and judge."""
        self.fleet.start()
        started = time.monotonic()
        for event in self.plan.events:
            self._wait_until(started + event.at)
            # The driver is one thread: on a loaded machine, or with Pangea slow, it falls behind
            self.tally.behind_schedule = max(self.tally.behind_schedule, round(time.monotonic() - started - event.at))
            self._do(event)
        self._wait_until(started + self.plan.seconds)
        healed = self._heal()
        recovered = self._recover(healed)
        # Judge a still world: a refresh in flight would show as Pangea ahead of our row
        self.fleet.stop()
        return self._judge(recovered)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.fleet.close()
        self._pangea.close()
        self.rt.close()

    def _wait_until(self, deadline: float) -> None:
        while (left := deadline - time.monotonic()) > 0:
            self._tick()
            time.sleep(min(left, 0.1))

    def _tick(self) -> None:
        """Between events: end a Pangea fault window that is over, retry unconfirmed Pangea endings."""
        if self._fault_until and time.monotonic() >= self._fault_until:
            self.emu.admin.clear_faults()
            self._fault_until = 0.0
        if self._pending and time.monotonic() >= self._next_retry:  # one at a time: a timeout costs a second
            path, body = self._pending[0]
            if self._pangea_call(path, body):
                self._pending.pop(0)
            else:
                self._next_retry = time.monotonic() + 0.3

    def _do(self, event: plan.Event) -> None:
        handlers: dict[str, Callable[[plan.Event], None]] = {
            "login": lambda e: self._login(e.pick),
            "logout": self._logout,
            "logout_user": self._logout_user,
            "pangea_invalidate": self._pangea_invalidate,
            "pangea_logout_user": self._pangea_logout_user,
            "pangea_faults": self._pangea_faults,
            "kill_worker": lambda e: self._spawn(self.fleet.kill_worker, e.pick, e.lasts, self._stop),
            "kill_beat": lambda e: self._spawn(self.fleet.kill_beat, e.lasts, self._stop),
            "kill_redis": lambda e: self._spawn(self._kill_redis, e.lasts),
            "restart_postgres": lambda e: self._spawn(self._restart_postgres, e.lasts),
        }
        handlers[event.kind](event)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _heal(self) -> datetime:
        """Clear every fault, bring every process back, confirm every Pangea ending; the heal's time."""
        self.emu.admin.clear_faults()
        self._fault_until = 0.0
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        self.fleet.ensure_up()
        deadline = time.monotonic() + 30
        while self._pending and time.monotonic() < deadline:
            self._tick()
            time.sleep(0.1)
        assert not self._pending, f"Pangea never confirmed {len(self._pending)} endings with no fault on"
        return datetime.now(UTC)

    def _recover(self, healed: datetime) -> float:
        """Seconds from the heal until the worker caught up (infinity if it never did)."""
        deadline = time.monotonic() + RECOVERY_LIMIT
        while time.monotonic() < deadline:
            if self.world.caught_up(healed):
                return (datetime.now(UTC) - healed).total_seconds()
            time.sleep(0.3)
        return float("inf")

    def _judge(self, recovered: float) -> Figures:
        figures = self.world.judge(f"{self.name} seed={self.plan.seed}", recovered_in=recovered)
        notes = {
            "leases_taken_live": len(leases.taken(self.rt.db_engine)),
            "sessions": len(self.world.ids),
            "worker_kills": self.fleet.kills["worker"],
            "beat_kills": self.fleet.kills["beat"],
            "refused_starts": self.fleet.refused_starts,
            "found_down": self.fleet.found_down,
        } | {k: v for k, v in self.tally.__dict__.items() if v}
        with self.rt.sessions() as db:  # a tripped guard holds revocations until an operator confirms
            held = db.get(models.RevocationGuard, 1)
        if held is not None and held.tripped_at is not None:
            what = "logouts" if "logouts" in (held.reason or "") else "sessions"
            notes["guard_tripped"] = f"{held.tripped_at:%H:%M:%S} ({held.would_revoke} of {held.checked} {what})"
        if notes["leases_taken_live"]:
            notes["taken_by_clock"] = leases.by_clock(self.rt.db_engine, lease=self.rt.settings.lease)
        return Figures(**{**figures.__dict__, "notes": notes})

    # --- what the app does (worker.sessions, as a web app would) -----------------------------------

    def _login(self, pick: int) -> None:
        """A user signs in on the hosted page; the app exchanges the code and records the session."""
        candidates = [u for u in self._users if u not in self._banned]
        if not candidates:
            return
        email = candidates[pick % len(candidates)]
        code = self.emu.admin.login(email, active_ttl=LIFETIMES[(pick >> 8) % len(LIFETIMES)])
        result = None
        for _ in range(3):  # the app's own retry; Pangea may be failing right now
            body = self._post("/v2/client/userinfo", {"code": code})
            if body is not None and body.get("status") == "Success":
                result = body["result"]
                break
            if body is not None and body.get("status") in ("InvalidToken", "ExpiredToken"):
                break  # spent by an answer that was dropped: that Pangea session is nobody's
        if result is None:
            self.tally.logins_failed += 1
            return
        try:
            with self.rt.sessions.begin() as db:
                sid = sessions.record_login(db, result, cipher=self.rt.cipher, policy=self.rt.policy).id
        except sa.exc.DBAPIError:  # the database is restarting: the app shows an error page
            self.tally.app_errors += 1
            return
        # The emulator's default rotation rule: the refresh token's id is the Pangea session's id
        self.world.add(sid, result["refresh_token"]["id"], result["active_token"]["identity"])
        self._emails[result["active_token"]["identity"]] = email
        self.tally.logins += 1

    def _believed_active(self) -> list[int]:
        return sorted(set(self.world.ids) - self.world.doomed - self.world.leaving)

    def _logout(self, event: plan.Event) -> None:
        candidates = self._believed_active()
        if not candidates:
            return
        sid = candidates[event.pick % len(candidates)]
        ended: list[models.SessionState] = []
        if self._app(lambda db: ended.append(sessions.logout(db, sid).state)):
            # A session the worker revoked meanwhile stays revoked and owes Pangea nothing: the
            # user was already signed out, so this is no logout of theirs to lose.
            if ended == [models.SessionState.LOGGED_OUT]:
                self.world.leaving.add(sid)
            self.tally.logouts += 1

    def _logout_user(self, event: plan.Event) -> None:
        users = sorted({self.world.user_of[sid] for sid in self._believed_active()})
        if not users:
            return
        user = users[event.pick % len(users)]
        if self._app(lambda db: sessions.logout_user(db, user)):
            # (not banned: a login after this must outlive the logout's delivery, however late)
            self.world.leaving.update(self.world.sessions_of(user))
            self.tally.user_logouts += 1

    def _app(self, work: Callable[[Any], object]) -> bool:
        """Run ``work`` in one transaction of the app's; False if the database was down."""
        try:
            with self.rt.sessions.begin() as db:
                work(db)
            return True
        except sa.exc.DBAPIError:
            self.tally.app_errors += 1
            return False

    def _ban(self, user_id: str) -> None:
        self._banned.add(self._emails[user_id])

    # --- what Pangea's admins do (real endpoints, confirmed even through faults) --------------------

    def _pangea_invalidate(self, event: plan.Event) -> None:
        candidates = self._believed_active()
        if not candidates:
            return
        sid = candidates[event.pick % len(candidates)]
        self.world.doomed.add(sid)  # from now on it is ended at Pangea: the call is retried until confirmed
        self._pending.append(("/v2/session/invalidate", {"session_id": self.world._pangea_ids[sid]}))
        self.tally.ended_at_pangea += 1

    def _pangea_logout_user(self, event: plan.Event) -> None:
        users = sorted({self.world.user_of[sid] for sid in self._believed_active()})
        if not users:
            return
        user = users[event.pick % len(users)]
        self.world.doomed.update(self.world.sessions_of(user))
        self._ban(user)
        self._pending.append(("/v2/session/logout", {"user_id": user}))
        self.tally.ended_at_pangea += 1

    def _pangea_call(self, path: str, body: dict[str, Any]) -> bool:
        """Whether Pangea confirmed this ending (Success, or the session is already gone)."""
        answer = self._post(path, body)
        return answer is not None and answer.get("status") in ("Success", "InvalidToken", "ExpiredToken")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Pangea's envelope, or None when no readable answer came back."""
        try:
            answer = self._pangea.post(path, json=body)
            envelope: dict[str, Any] = answer.json()
            return envelope
        except (httpx.HTTPError, ValueError):
            return None

    # --- faults -----------------------------------------------------------------------------------

    def _pangea_faults(self, event: plan.Event) -> None:
        self.emu.admin.faults(**event.faults)
        self._fault_until = time.monotonic() + event.lasts
        self.tally.pangea_windows += 1

    def _kill_redis(self, down: float) -> None:
        if not self._down["redis"].acquire(blocking=False):
            return  # already down
        try:
            self.redis.kill()
            self.tally.redis_kills += 1
            time.sleep(down)
            self.redis.start()
        finally:
            self._down["redis"].release()

    def _restart_postgres(self, down: float) -> None:
        assert self.postgres is not None
        if not self._down["postgres"].acquire(blocking=False):
            return
        try:
            self.postgres.stop()
            self.tally.postgres_restarts += 1
            time.sleep(down)
        finally:
            self.postgres.start()
            self._down["postgres"].release()
