"""Logout delivery: the outbox row is the truth, the Celery message only a nudge.

``worker.sessions.logout`` / ``logout_user`` write a ``logout_outbox`` row in the app's own
transaction. :class:`Delivery` brings each row to Pangea at least once:

1. claim due pending events with a lease, and commit;
2. call ``/v2/client/session/logout`` (the decrypted token) or ``/v2/session/logout`` (the user id),
   outside any transaction, bounded in concurrency and under the shared rate limit;
3. decide (``worker.outbox_decisions``) and record every outcome in one short transaction,
   guarded by ``claim_token``: delivered (token erased), back off, pause, or dead letter.

A worker that dies between 2 and 3 leaves its rows leased; when the lease lapses another worker
delivers them again, and Pangea answers InvalidToken, which counts as delivered: a second delivery
has no second effect. Retry times live in ``next_attempt_at``, never in Celery countdowns.

The kick: after the app's commit, :func:`worker.kick.kick_after_commit` sends ``session_sync.deliver_logouts`` so
a logout reaches Pangea in about a second instead of at the next periodic run. A broker that is
down or lost the message only delays delivery; the periodic task finds the row in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import orm

from worker import audit, authn, crypto, decisions, errors, guard, models, ratelimit, wire
from worker import outbox_decisions as od
from worker import outbox_queries as oq
from worker.counts import LogoutCounts as Counts
from worker.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long one delivery run keeps claiming batches before it yields the worker to other tasks.
DEFAULT_BUDGET = timedelta(seconds=60)


def policy_from_settings(settings: Settings) -> od.Policy:
    """The backoff and dead-letter knobs from settings."""
    return od.Policy(
        backoff_base=settings.outbox_backoff,
        backoff_cap=settings.outbox_backoff_cap,
        max_attempts=settings.outbox_max_attempts,
        max_age=settings.outbox_max_age,
    )


class _Batch:
    """One claimed batch in flight; remembers whether Pangea refused our own token."""

    def __init__(self) -> None:
        self.rejected: od.Result | None = None


class Delivery:
    """Delivers queued logouts to Pangea; one per worker process (see ``worker.runtime``)."""

    def __init__(
        self,
        *,
        sessions: orm.sessionmaker[orm.Session],
        client: authn.AuthnClient,
        cipher: crypto.TokenCipher,
        limiter: ratelimit.RateLimiter,
        policy: od.Policy,
        batch_size: int,
        concurrency: int,
        lease: timedelta,
        budget: timedelta = DEFAULT_BUDGET,
        can_invalidate: bool = False,
        guard_limits: guard.Limits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self._sessions = sessions
        #: A service token: it may end sessions by id and users by id (``/v2/session/*``).
        self._can_invalidate = can_invalidate
        #: Pangea refused ``/v2/session/logout`` to this token once: user logouts go session by session.
        self._user_logout_refused = False
        bind = sessions.kw.get("bind")
        self._offload = bind is not None and bind.dialect.name != "sqlite"
        self._guard_limits = guard_limits or guard.Limits()
        self._client = client
        self._cipher = cipher
        self._limiter = limiter
        self._policy = policy
        self._batch_size = batch_size
        self._semaphore = asyncio.Semaphore(concurrency)
        self._lease = lease
        self._budget = budget
        self._clock = clock
        self._rng = rng or random.SystemRandom()

    async def drain(self, *, event_ids: Sequence[int] | None = None) -> Counts:
        """Deliver batch after batch until nothing is due, Pangea refuses our token, or the budget is spent."""
        deadline = time.monotonic() + self._budget.total_seconds()
        total = Counts()
        while True:
            counts = await self.deliver_batch(event_ids=event_ids)
            total.add(counts)
            if counts.claimed == 0 or counts.stopped or time.monotonic() >= deadline:
                return total

    async def deliver_batch(self, *, event_ids: Sequence[int] | None = None) -> Counts:
        """Claim one batch of due events, call Pangea for each, and record the outcomes."""
        claim_token = secrets.token_hex(16)
        with self._sessions.begin() as db:
            claimed = oq.claim_due_events(
                db,
                now=self._clock(),
                limit=self._batch_size,
                lease=self._lease,
                claim_token=claim_token,
                event_ids=event_ids,
            )
        if not claimed:
            return Counts()
        renewing = asyncio.create_task(self._keep_claimed(claim_token))
        try:
            batch = _Batch()
            results = await asyncio.gather(*(self._attempt(e, batch) for e in claimed))
        except BaseException:
            # Whatever went wrong, give the rows back now instead of when the lease lapses.
            with self._sessions.begin() as db:
                oq.release(db, claim_token=claim_token)
            raise
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        counts = self._record(claimed, results)
        counts.stopped = batch.rejected is not None
        if counts.stopped:
            logger.error(
                "Pangea refused PANGEA_AUTHN_TOKEN: logout delivery paused for %s",
                self._policy.pause,
                extra={"action": "outbox_paused", "events": len(claimed)},
            )
        return counts

    async def _keep_claimed(self, claim_token: str) -> None:
        """Renew the batch's lease every third of it while its logouts are sent (see oq.extend_claim).

        A slow or throttling Pangea can make a batch outlast one lease; another worker would then
        claim the same events and send them again. A renewal the database missed (it is
        restarting) is only a lease that may lapse: the next one tries again.
        """
        every = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            try:
                await self._read(lambda: self._extend(claim_token))
            except Exception as exc:  # the database is away: the lease may lapse, no more
                logger.warning(
                    "Could not renew the lease of a logout batch: %s", exc, extra={"action": "outbox_lease_kept"}
                )

    def _extend(self, claim_token: str) -> int:
        with self._sessions.begin() as db:
            return oq.extend_claim(db, claim_token=claim_token, until=self._clock() + self._lease)

    # --- one event -----------------------------------------------------------------------------

    async def _attempt(self, ev: oq.ClaimedEvent, batch: _Batch) -> od.Result:
        async with self._semaphore:
            if batch.rejected is not None:  # do not keep knocking with a token Pangea refused
                return batch.rejected
            await self._limiter.acquire()
            if batch.rejected is not None:
                return batch.rejected
            try:
                ended = await self._call(ev)
            except _EndpointRefused as exc:
                return od.Result(outcome=od.Outcome.REFUSED, error=od.clip(str(exc)))
            except (errors.AuthnError, errors.CryptoError) as exc:
                result = _result_of(exc)
                if result.outcome is od.Outcome.REJECTED_US:
                    batch.rejected = result
                return result
        outcome = od.Outcome.LOGGED_OUT if ended.verdict is wire.Verdict.VALID else od.Outcome.ALREADY
        return od.Result(outcome=outcome, request_id=ended.request_id, verdict=ended.verdict.value)

    async def _call(self, ev: oq.ClaimedEvent) -> wire.Ended:
        if ev.kind is models.OutboxKind.USER:
            return await self._logout_user(ev)
        if ev.token_enc is None:
            raise errors.CryptoError("the event holds no token to log out with")
        ended = await self._client.client_logout(self._cipher.decrypt(ev.token_enc))
        if ended.verdict is wire.Verdict.VALID or not self._can_invalidate or ev.session_id is None:
            return ended
        # ExpiredToken / InvalidToken speak of the token we hold, not of its session: an active token
        # lapses (a refresh failed, the user logged out just before one) while its session lives on
        # at Pangea. With a service token, end the session itself, by its id.
        session_id = ev.session_id
        known = await self._read(lambda: self._known_session(session_id))
        if known is None:
            return ended
        await self._limiter.acquire()
        try:
            pangea_id = await self._confirmed_session_id(*known)
            if pangea_id is None:
                return ended  # Pangea has no live session of ours to end: it is gone
            await self._limiter.acquire()
            return await self._client.session_invalidate(pangea_id)
        except errors.AuthnRejectedUs:
            # /v2/client/session/logout just accepted our token: this refusal is about the endpoint.
            raise _EndpointRefused(
                "PANGEA_AUTHN_TOKEN may not end a session by its id (/v2/session/*: Unauthorized), and the "
                "session's active token had lapsed: the session cannot be ended at Pangea with this token"
            ) from None

    async def _logout_user(self, ev: oq.ClaimedEvent) -> wire.Ended:
        """End every session of a user at Pangea, whatever the token.

        With a service token: ``/v2/session/logout``, confirmed by the sessions we know of (they
        must have been live at Pangea: a wrong project answers Success and has none of them, which
        is "already logged out" for the guard to weigh). A client token cannot call it (nor can a
        service token without that right, which Pangea answers Unauthorized): then each session we
        know of is ended with its own active token, ``/v2/client/session/logout``. That cannot reach
        the user's sessions in other apps.
        """
        known = await self._read(lambda: self._sessions_ended_by(ev))
        if self._can_invalidate and not self._user_logout_refused:
            try:
                return await self._logout_user_by_id(ev, known)
            except errors.AuthnRejectedUs:
                self._user_logout_refused = True
                logger.warning(
                    "PANGEA_AUTHN_TOKEN may not call /v2/session/logout; user-wide logouts end each "
                    "known session with its own token instead",
                    extra={"action": "outbox_user_logout_fallback"},
                )
        return await self._logout_each(known)

    async def _logout_user_by_id(self, ev: oq.ClaimedEvent, known: list[oq.KnownSession]) -> wire.Ended:
        later = await self._read(lambda: self._sessions_started_since(ev))
        if later:
            # The user logged in again before this logout reached Pangea: /v2/session/logout would
            # end that new login too. End the sessions the logout was asked for, one by one.
            return await self._logout_all_but(ev.user_id, later)
        if known:
            # Does Pangea know this user at all? By the user's id, not by session ids: which id Pangea
            # gives a session is learned, and a guess must not decide a delivery.
            page = await self._client.session_list(filter={"identity": ev.user_id}, size=1)
            await self._limiter.acquire()
            if not page.sessions:
                # Pangea has no session of this user, yet we ended some just now: already logged
                # out, or the wrong project (which answers Success too). The guard weighs it.
                return wire.Ended(verdict=wire.Verdict.INVALID, request_id=page.request_id)
        return await self._client.session_logout(ev.user_id)

    async def _logout_all_but(self, user_id: str, later: list[tuple[str | None, str]]) -> wire.Ended:
        """End each of the user's Pangea sessions but the logins recorded after the logout was asked for.

        VALID if Pangea ended any now; INVALID if there was none left to end (already logged out, or
        the wrong project: the guard weighs it as the single call's answer would be weighed).
        """
        spared_ids = {pangea_id for pangea_id, _ in later if pangea_id}
        spared_tokens = {token_id for _, token_id in later}
        page = await self._client.sessions_of_user(user_id, pace=self._limiter.acquire)
        verdict, request_id = wire.Verdict.INVALID, page.request_id
        for item in page.sessions:
            if item.id in spared_ids or (item.active_token is not None and item.active_token.id in spared_tokens):
                continue
            await self._limiter.acquire()
            ended = await self._client.session_invalidate(item.id)
            request_id = ended.request_id
            if ended.verdict is wire.Verdict.VALID:
                verdict = wire.Verdict.VALID
        return wire.Ended(verdict=verdict, request_id=request_id)

    async def _logout_each(self, known: list[oq.KnownSession]) -> wire.Ended:
        """End each known session with its own active token; VALID if Pangea ended any of them now."""
        verdict, request_id = wire.Verdict.INVALID, None
        for i, session in enumerate(known):
            if i:
                await self._limiter.acquire()
            ended = await self._client.client_logout(self._cipher.decrypt(session.active_token_enc))
            request_id = ended.request_id
            if ended.verdict is wire.Verdict.VALID:
                verdict = wire.Verdict.VALID
        return wire.Ended(verdict=verdict, request_id=request_id or "")

    async def _read(self, query: Callable[[], T]) -> T:
        """A short read beside the calls in flight: in a thread on PostgreSQL, inline on SQLite (as the engine)."""
        if self._offload:
            return await asyncio.to_thread(query)
        return query()

    def _sessions_started_since(self, ev: oq.ClaimedEvent) -> list[tuple[str | None, str]]:
        with self._sessions() as db:
            return oq.sessions_started_since(db, user_id=ev.user_id, since=ev.created_at)

    def _sessions_ended_by(self, ev: oq.ClaimedEvent) -> list[oq.KnownSession]:
        with self._sessions() as db:
            return oq.sessions_ended_by(db, user_id=ev.user_id, since=ev.created_at)

    def _hold_already(
        self, db: orm.Session, claimed: list[oq.ClaimedEvent], results: list[od.Result], *, now: datetime
    ) -> bool:
        """Whether this batch's "already logged out" answers must be held (see worker.guard).

        Only a logout sent for the first time is evidence: a retry, or an event whose earlier claim
        lapsed, may have been performed by the earlier attempt (its answer lost, its worker killed),
        and "already logged out" is then Pangea's right answer. Those are weighed by no guard, but
        held like the rest while it is tripped.
        """
        if not any(r.outcome is od.Outcome.ALREADY for r in results):
            return False
        if guard.confirmed_since(db, now - guard.CONFIRMED_FOR):
            return False
        if guard.is_tripped(db):
            return True
        first = [r for ev, r in zip(claimed, results, strict=True) if guard.first_delivery(ev.attempts, ev.reclaimed)]
        answered = [r for r in first if r.outcome in (od.Outcome.LOGGED_OUT, od.Outcome.ALREADY)]
        return guard.hold_revocations(
            db,
            checked=len(answered),
            would_revoke=sum(r.outcome is od.Outcome.ALREADY for r in answered),
            limits=self._guard_limits,
            now=now,
            what=guard.LOGOUTS,
        )

    def _known_session(self, session_id: int) -> tuple[str, str, str | None] | None:
        """``(user id, active token id, Pangea session id as stored)`` of a local session."""
        with self._sessions() as db:
            found = db.get(models.LocalSession, session_id)
            if found is None:
                return None
            return found.user_id, found.active_token_id, found.pangea_session_id

    async def _confirmed_session_id(self, user_id: str, active_token_id: str, stored: str | None) -> str | None:
        """The id Pangea lists our session under, never one it has not confirmed.

        First by the active token we hold (the session that carries it); else the stored id, if
        Pangea lists a session of this user under it. None when Pangea lists neither.
        """
        carrying = await self._client.session_of(None, active_token_id=active_token_id)
        if carrying is not None:
            return carrying.id
        if stored is None:
            return None
        await self._limiter.acquire()
        owned = await self._client.session_of(user_id, session_id=stored)
        return owned.id if owned is not None else None

    # --- the outcome ---------------------------------------------------------------------------

    def _record(self, claimed: list[oq.ClaimedEvent], results: list[od.Result]) -> Counts:
        now = self._clock()
        counts = Counts(claimed=len(claimed))
        delivered: list[dict[str, object]] = []
        later: list[dict[str, object]] = []
        dead: list[dict[str, object]] = []
        trail: list[audit.Event] = []
        with self._sessions.begin() as db:
            # The guard's word on this batch and the outcomes it shapes commit together.
            held = self._hold_already(db, claimed, results, now=now)
            for ev, result in zip(claimed, results, strict=True):
                key: dict[str, object] = {"b_id": ev.id, "b_claim": ev.claim_token, "attempts": ev.attempts}
                if held and result.outcome is od.Outcome.ALREADY:
                    # Perhaps the wrong project, not a logged-out user: keep it until an operator confirms.
                    later.append(key | {"next_attempt_at": now + self._policy.pause, "last_error": oq.HELD_ERROR})
                    counts.held += 1
                    continue
                facts = od.EventFacts(attempts=ev.attempts, created_at=ev.queued_at)
                decision = od.decide(facts, result, now, self._policy, self._rng)
                key["attempts"] = decision.attempts
                if decision.action is od.Action.DELIVERED:
                    delivered.append(key)
                    counts.delivered += 1
                    counts.already += result.outcome is od.Outcome.ALREADY
                    if ev.session_id is not None:
                        outcome = result.verdict or "valid"
                        trail.append(
                            audit.Event(
                                session_id=ev.session_id,
                                action="logout_sent",
                                outcome=outcome,
                                request_id=result.request_id,
                            )
                        )
                elif decision.action is od.Action.DEAD:
                    dead.append(key | {"last_error": decision.error})
                    counts.dead += 1
                    logger.warning(
                        "Logout became a dead letter: %s",
                        decision.error,
                        extra={"action": "outbox_dead", "event_id": ev.id, "kind": str(ev.kind)},
                    )
                    if ev.session_id is not None:
                        trail.append(audit.Event(session_id=ev.session_id, action="logout_dead", outcome="dead"))
                else:
                    later.append(key | {"next_attempt_at": decision.next_attempt_at, "last_error": decision.error})
                    if decision.action is od.Action.PAUSE:
                        counts.paused += 1
                    else:
                        counts.retried += 1
            oq.mark_delivered(db, delivered, now=now)
            oq.reschedule(db, later)
            oq.mark_dead(db, dead, now=now)
            audit.record(db, trail, now=now)
        logger.info("Logouts delivered", extra={"action": "outbox_batch", **counts.as_dict()})
        return counts


class _EndpointRefused(Exception):
    """Pangea refused one service-only endpoint to a token that its client endpoints accept."""


def _result_of(exc: errors.SessionSyncError) -> od.Result:
    """What a failed attempt got, through the error mapping the sync engine uses (``decisions.failed``)."""
    answer = decisions.failed(exc)
    if answer.failure is decisions.Failure.REJECTED_US:
        outcome = od.Outcome.REJECTED_US
    elif answer.final:
        outcome = od.Outcome.REFUSED
    else:
        outcome = od.Outcome.FAILED
    return od.Result(outcome=outcome, error=_describe(exc), retry_after=answer.retry_after)


def _describe(exc: errors.SessionSyncError) -> str:
    """A failure for ``last_error``: its class and message (messages in our error tree never hold a token)."""
    return od.clip(f"{type(exc).__name__}: {exc}")
