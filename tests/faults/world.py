"""The fault matrix's world: sessions whose truth is known, and the figures that judge a run.

A :class:`World` is a set of local sessions on PostgreSQL, each logged in through the emulator,
with the truth kept beside them: *doomed* sessions are ended at Pangea while the fault is on,
*leaving* ones are logged out by the app (through the outbox), all others must live. Half of
every group holds short-lived tokens, so the worker refreshes them through the fault.

A run is judged after the fault heals, by what Pangea and the database say, never by what the
worker reports (:class:`Figures`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import env_for
from worker import models, runtime, sessions, verification

S = models.LocalSession
E = models.LogoutEvent

#: Lifetime of the short-lived active tokens: the worker refreshes them about every half of it.
SHORT_TTL = 6.0
_NEVER = datetime.min.replace(tzinfo=UTC)


def fault_env(pg_url: str, base_url: str, service_token: str, **extra: str) -> dict[str, str]:
    """Settings that make a run short: checks every 2 s, backoff of at most 2 s, 1 s HTTP timeout."""
    return (
        env_for(pg_url, base_url, token=service_token)
        | {
            "SESSION_SYNC_CHECK_INTERVAL": "2s",
            "SESSION_SYNC_SWEEP_PERIOD": "1s",
            "SESSION_SYNC_REFRESH_MARGIN": "10s",  # capped at half the lifetime: short tokens refresh at ~3 s
            "SESSION_SYNC_BACKOFF": "500ms",
            "SESSION_SYNC_BACKOFF_CAP": "2s",
            "SESSION_SYNC_HTTP_TIMEOUT": "1",
            "SESSION_SYNC_HTTP_RETRIES": "1",
            "SESSION_SYNC_LEASE": "3s",
            "SESSION_SYNC_CONCURRENCY": "25",
            "SESSION_SYNC_RATE_LIMIT": "1000",
            "SESSION_SYNC_OUTBOX_PERIOD": "1s",
            "SESSION_SYNC_OUTBOX_BACKOFF": "500ms",
            "SESSION_SYNC_OUTBOX_BACKOFF_CAP": "2s",
        }
        | extra
    )


@dataclass(frozen=True)
class Figures:
    """What a fault did to the users, counted from Pangea's and the database's own state."""

    scenario: str
    #: Sessions revoked locally while Pangea's session still carries the active token we hold.
    wrongly_revoked: int
    #: Sessions ended at Pangea during the fault and still active locally after recovery.
    missed: int
    #: Sessions the app logged out that Pangea still knows, plus logouts dead or still queued.
    lost_logouts: int
    #: Spent refresh tokens presented to Pangea again (the emulator counts every one).
    refresh_reused: int
    #: Seconds from the heal until the worker had caught up (see :meth:`World.caught_up`).
    recovered_in: float
    #: Refreshes Pangea performed whose answer never reached us: those users must log in again
    #: when the active token they hold lapses. Not wrong revocations: no one holds those tokens.
    lost_in_transit: int = 0
    #: Sessions live at Pangea that no active local session holds (left behind by a lost refresh).
    orphaned: int = 0
    #: Audit events of a revocation that the rows do not bear out (the row is not revoked, or
    #: not for that reason, or is revoked more than once): the trail must report only what was done.
    audit_unapplied: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.notes.items())
        return (
            f"fault {self.scenario}: wrongly_revoked={self.wrongly_revoked} missed={self.missed} "
            f"lost_logouts={self.lost_logouts} refresh_reused={self.refresh_reused} "
            f"recovered_in={self.recovered_in:.1f}s lost_in_transit={self.lost_in_transit} "
            f"orphaned={self.orphaned} audit_unapplied={self.audit_unapplied}{extra}"
        )

    def assert_invariants(self) -> None:
        figures = (self.wrongly_revoked, self.missed, self.lost_logouts, self.refresh_reused, self.audit_unapplied)
        assert figures == (0, 0, 0, 0, 0), self.line()


class World:
    """``size`` sessions, a fifth doomed and a fifth leaving, half of each group short-lived."""

    def __init__(
        self,
        rt: runtime.Runtime,
        emu: RunningEmulator,
        *,
        size: int = 60,
        tag: str = "w",
        ttl: Callable[[int], float] | None = None,
    ) -> None:
        self.rt = rt
        self.emu = emu
        self._ttl = ttl or (lambda i: SHORT_TTL if i % 2 else 3600.0)
        logins = _run(self._logins([f"{tag}{i}@example.com" for i in range(size)]))
        with rt.sessions.begin() as db:
            self.ids = [sessions.record_login(db, u, cipher=rt.cipher, policy=rt.policy).id for u in logins]
        fifth = size // 5
        self.doomed = self.ids[:fifth]
        self.leaving = self.ids[fifth : 2 * fifth]
        self.living = self.ids[2 * fifth :]
        # Pangea's own ids of the sessions, asked of its session list (which id is the session's
        # depends on Pangea's rotation rule: the emulator plays several)
        by_active = _run(_session_ids_by_active_token(emu, [u["active_token"]["id"] for u in logins]))
        self._pangea_ids = {sid: by_active[u["active_token"]["id"]] for sid, u in zip(self.ids, logins, strict=True)}

    async def _logins(self, emails: list[str]) -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(20)
        async with (
            httpx.AsyncClient(base_url=self.emu.base_url, timeout=10) as admin,
            _client(self.emu) as client,
        ):

            async def one(i: int, email: str) -> dict[str, Any]:
                ttl = self._ttl(i)
                async with gate:
                    answer = await admin.post("/emulator/login", json={"email": email, "active_ttl": ttl})
                    answer.raise_for_status()
                    code = answer.json()["code"]
                    result = await client.post("/v2/client/userinfo", json={"code": code})
                    body: dict[str, Any] = result.json()["result"]
                    return body

            return await asyncio.gather(*(one(i, e) for i, e in enumerate(emails)))

    # --- what happens during the fault -------------------------------------------------------------

    def doom(self) -> None:
        """End the doomed sessions at Pangea (an admin, elsewhere, kills them)."""

        async def kill() -> None:
            async with _client(self.emu) as client:
                for sid in self.doomed:
                    answer = await client.post("/v2/session/invalidate", json={"session_id": self._pangea_ids[sid]})
                    assert answer.status_code == 200, answer.text

        _run(kill())

    def leave(self) -> None:
        """The app logs the leaving sessions out (each queues a logout for Pangea)."""
        with self.rt.sessions.begin() as db:
            for sid in self.leaving:
                sessions.logout(db, sid, kick=False)

    # --- judging -----------------------------------------------------------------------------------

    def caught_up(self, since: datetime) -> bool:
        """Every doomed session revoked, every logout delivered, every living session verified since ``since``."""
        return self.behind(since) is None

    def behind(self, since: datetime) -> str | None:
        """What the world still waits for (see :meth:`caught_up`), in a line; None when it caught up."""
        with self.rt.sessions() as db:
            checked = verification.last_checked_at().label("last_checked_at")  # derived: a round writes no row
            rows = {r.id: r for r in db.execute(sa.select(S.id, S.state, checked, S.rotated_at))}
            queued = db.execute(sa.select(sa.func.count()).where(E.state != "delivered")).scalar_one()
        if queued:
            return f"{queued} logouts not delivered"
        missed = [sid for sid in self.doomed if rows[sid].state is models.SessionState.ACTIVE]
        if missed:
            return f"{len(missed)} sessions ended at Pangea still active here (e.g. {sorted(missed)[:5]})"
        stale = [
            sid
            for sid in self.living
            if rows[sid].state is models.SessionState.ACTIVE
            and max(rows[sid].last_checked_at or _NEVER, rows[sid].rotated_at or _NEVER) < since
        ]
        if stale:
            return f"{len(stale)} living sessions not verified since the heal (e.g. {sorted(stale)[:5]})"
        return None

    def judge(self, scenario: str, *, recovered_in: float, **notes: Any) -> Figures:
        """The figures, from Pangea's session list and the database (asked with no fault on)."""
        with self.rt.sessions() as db:
            rows = {r.id: r for r in db.execute(sa.select(S.id, S.state, S.end_reason, S.active_token_id))}
            undelivered = db.execute(sa.select(sa.func.count()).where(E.state != "delivered")).scalar_one()
            revocations = db.execute(
                sa.select(models.SessionEvent.session_id, models.SessionEvent.reason).where(
                    models.SessionEvent.action == "revoked"
                )
            ).all()
        live = _run(_pangea_sessions(self.emu, list(self._pangea_ids.values())))
        revoked = [sid for sid, r in rows.items() if r.state is models.SessionState.REVOKED]
        carries_ours = {
            sid for sid, r in rows.items() if _active_id(live.get(self._pangea_ids[sid])) == r.active_token_id
        }
        wrongly = [sid for sid in revoked if sid in carries_ours]
        # Refreshes performed whose answer never reached us: their session either lives on at Pangea
        # with tokens nobody holds, or the worker ended it there once it knew (refresh_lost)
        in_transit = [
            sid
            for sid in revoked
            if sid not in carries_ours
            and sid not in self.doomed
            and (self._pangea_ids[sid] in live or rows[sid].end_reason == "refresh_lost")
        ]
        orphaned = [
            sid
            for sid, pangea_id in self._pangea_ids.items()
            if pangea_id in live and (rows[sid].state is not models.SessionState.ACTIVE or sid not in carries_ours)
        ]
        missed = [sid for sid in self.doomed if rows[sid].state is models.SessionState.ACTIVE]
        not_out = [sid for sid in self.leaving if self._pangea_ids[sid] in live]
        # Sanity: every living session is either still active or lost in transit, never anything else
        unexplained = [
            sid for sid in self.living if rows[sid].state is not models.SessionState.ACTIVE and sid not in in_transit
        ]
        return Figures(
            scenario=scenario,
            wrongly_revoked=len(set(wrongly) | set(unexplained)),
            missed=len(missed),
            lost_logouts=len(not_out) + undelivered,
            refresh_reused=int(self.emu.admin.stats()["refresh_reused"]),
            recovered_in=recovered_in,
            lost_in_transit=len(in_transit),
            orphaned=len(orphaned),
            audit_unapplied=_audit_unapplied(rows, revocations),
            notes=notes,
        )


def _audit_unapplied(rows: dict[int, Any], revocations: Sequence[Any]) -> int:
    """Revocation events the rows do not bear out: one per revoked row, with the row's reason."""
    seen: set[int] = set()
    bad = 0
    for session_id, reason in revocations:
        row = rows.get(session_id)
        if row is None or row.state is not models.SessionState.REVOKED or row.end_reason != reason:
            bad += 1
        elif session_id in seen:
            bad += 1
        seen.add(session_id)
    return bad


def wait_caught_up(world: World, since: datetime, *, step: Callable[[], None], timeout: float) -> float:
    """Call ``step`` until the world caught up; the seconds it took from ``since``."""
    deadline = time.monotonic() + timeout
    while not world.caught_up(since):
        if time.monotonic() > deadline:
            waiting = world.behind(since) or "the guard is tripped"
            pytest.fail(f"not caught up {timeout:.0f} s after the heal: {waiting}")
        step()
    return (datetime.now(UTC) - since).total_seconds()


def _client(emu: RunningEmulator) -> httpx.AsyncClient:
    """A plain client with the service token, beside the worker (no retries, no fault handling)."""
    return httpx.AsyncClient(
        base_url=emu.base_url, timeout=10, headers={"Authorization": f"Bearer {emu.service_token}"}
    )


async def _listed(emu: RunningEmulator, key: str, values: list[str]) -> list[dict[str, Any]]:
    """Pangea's live sessions whose ``key`` is among ``values`` (the project's session list, 100 at a time)."""
    items: list[dict[str, Any]] = []
    async with _client(emu) as client:
        for start in range(0, len(values), 100):
            chunk = values[start : start + 100]
            answer = await client.post("/v2/session/list", json={"filter": {f"{key}__in": chunk}, "size": 100})
            body = answer.json()
            assert body["status"] == "Success", body
            items.extend(body["result"]["sessions"])
    return items


async def _pangea_sessions(emu: RunningEmulator, session_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Pangea's live sessions among ``session_ids``, by id."""
    return {item["id"]: item for item in await _listed(emu, "id", session_ids)}


async def _session_ids_by_active_token(emu: RunningEmulator, token_ids: list[str]) -> dict[str, str]:
    """Pangea's session id for each active token id."""
    found = {item["active_token"]["id"]: item["id"] for item in await _listed(emu, "active_token_id", token_ids)}
    assert len(found) == len(token_ids), "every session just logged in is listed"
    return found


def _active_id(item: dict[str, Any] | None) -> str | None:
    return None if item is None or not item.get("active_token") else str(item["active_token"]["id"])


def _run(coro: Any) -> Any:
    return asyncio.run(coro)
