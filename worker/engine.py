"""The sync engine: claim due sessions, ask Pangea, decide, write the outcome, in batches.

Orchestration only: statements live in ``worker.queries``, the wire in ``worker.authn``, the
rules in ``worker.decisions``. Transactions are short and never span an HTTP call:
claim (commit) → ask Pangea → decide → apply (commit) → refresh the ones that need it
(compare-and-swap, commit) → call Pangea → apply (commit).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import orm

from worker import audit, authn, crypto, decisions, errors, guard, queries, ratelimit, wire
from worker.decisions import Action, Answer, Failure

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Counts:
    """What a batch, sweep or resync did; ids and counts only (safe for task results and Flower)."""

    checked: int = 0
    refreshed: int = 0
    revoked: int = 0
    failed: int = 0
    kept: int = 0
    #: Revocations the mass-revocation guard held back (the sessions stay active).
    held: int = 0
    stopped: bool = False
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, other: Counts) -> None:
        """Fold another Counts into this one."""
        self.checked += other.checked
        self.refreshed += other.refreshed
        self.revoked += other.revoked
        self.failed += other.failed
        self.kept += other.kept
        self.held += other.held
        self.stopped = self.stopped or other.stopped
        self.reasons.update(other.reasons)

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly summary."""
        return {
            "checked": self.checked,
            "refreshed": self.refreshed,
            "revoked": self.revoked,
            "failed": self.failed,
            "kept": self.kept,
            "held": self.held,
            "stopped": self.stopped,
            "revoked_by_reason": dict(self.reasons),
        }


class OurTokenRejected(errors.AuthnRejectedUs):
    """Raised when Pangea refused our own token during a sweep: nothing was changed."""


class _Work:
    """One claimed session. Its tokens are decrypted only when a call to Pangea needs them: a bulk
    answer needs only the active token's id, and Fernet costs more than everything else per session."""

    __slots__ = ("_active", "_cipher", "_facts", "_refresh", "session")

    def __init__(self, session: queries.ClaimedSession, cipher: crypto.TokenCipher) -> None:
        self.session = session
        self._cipher = cipher
        self._active: str | None = None
        self._refresh: str | None = None
        self._facts: decisions.SessionFacts | None = None

    @property
    def active_token(self) -> str:
        if self._active is None:
            self._active = self._cipher.decrypt(self.session.active_token_enc)
        return self._active

    @property
    def refresh_token(self) -> str | None:
        encrypted = self.session.refresh_token_enc
        if encrypted is not None and self._refresh is None:
            self._refresh = self._cipher.decrypt(encrypted)
        return self._refresh

    @property
    def facts(self) -> decisions.SessionFacts:
        if self._facts is None:
            self._facts = self._read_facts()
        return self._facts

    def _read_facts(self) -> decisions.SessionFacts:
        s = self.session
        return decisions.SessionFacts(
            active_expires_at=s.active_expires_at,
            active_issued_at=s.active_issued_at,
            refresh_expires_at=s.refresh_expires_at,
            has_refresh_token=s.refresh_token_enc is not None,
            failures=s.failures,
            uncertain=s.uncertain,
            verified_at=s.verified_at,
        )


class SyncEngine:
    """Keeps local sessions true to Pangea; one per worker process (see ``worker.runtime``)."""

    def __init__(
        self,
        *,
        sessions: orm.sessionmaker[orm.Session],
        client: authn.AuthnClient,
        cipher: crypto.TokenCipher,
        limiter: ratelimit.RateLimiter,
        policy: decisions.Policy,
        batch_size: int,
        concurrency: int,
        lease: timedelta,
        refresh_lease: timedelta,
        bulk: bool,
        guard_limits: guard.Limits | None = None,
        batches_in_flight: int = 1,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self._sessions = sessions
        self._client = client
        self._cipher = cipher
        self._limiter = limiter
        self._policy = policy
        self._batch_size = batch_size
        self._semaphore = asyncio.Semaphore(concurrency)
        self._lease = lease
        self._refresh_lease = refresh_lease
        self._bulk = bulk
        self._guard_limits = guard_limits or guard.Limits()
        self._batches_in_flight = batches_in_flight
        bind = sessions.kw.get("bind")
        self._offload = bind is not None and bind.dialect.name != "sqlite"
        self._clock = clock
        # Jitter needs no secret randomness: SystemRandom would cost a system call per draw.
        self._rng = rng or random.Random()

    # --- entry points --------------------------------------------------------------------------

    async def process_batch(
        self,
        *,
        user_id: str | None = None,
        session_ids: Sequence[int] | None = None,
        confirm_revocations: bool = False,
        due_by: datetime | None = None,
    ) -> Counts:
        """Claim one batch of sessions due (by ``due_by``, default now) and bring each in line with Pangea."""
        claim_token = secrets.token_hex(16)
        now = self._clock()
        claimed = await self._in_transaction(
            lambda db: queries.claim_due_sessions(
                db,
                now=now,
                limit=self._batch_size,
                lease=self._lease,
                claim_token=claim_token,
                user_id=user_id,
                session_ids=session_ids,
                due_by=due_by,
            )
        )
        if not claimed:
            return Counts()
        try:
            return await self._process(claimed, confirm_revocations=confirm_revocations)
        except BaseException:
            # Whatever went wrong, give the rows back now instead of when the lease lapses.
            with self._sessions.begin() as db:
                queries.release(db, claim_token=claim_token)
            raise

    async def drain(
        self,
        *,
        user_id: str | None = None,
        session_ids: Sequence[int] | None = None,
        confirm_revocations: bool = False,
    ) -> Counts:
        """Process batches until nothing is due (``sweep --once``, resync).

        ``batches_in_flight`` batches run at once, each with its own claim, so one batch's database
        work and its last slow answers overlap the next one's requests. After a failure no lane
        starts another batch, but none is cut short either (a refresh in flight is never abandoned);
        then the first failure is raised as it is. Only sessions due when the drain starts are
        taken: under a storm of failures, sessions backing off become due again within seconds, and
        a drain that chased them would never end.
        """
        total = Counts()
        failed: list[Exception] = []
        due_by = self._clock()

        async def lane() -> None:
            while not failed:
                try:
                    counts = await self.process_batch(
                        user_id=user_id,
                        session_ids=session_ids,
                        confirm_revocations=confirm_revocations,
                        due_by=due_by,
                    )
                except Exception as exc:
                    failed.append(exc)
                    return
                total.add(counts)
                if counts.checked == 0 or counts.stopped:
                    return

        lanes = [asyncio.ensure_future(lane()) for _ in range(self._batches_in_flight)]
        try:
            await asyncio.gather(*lanes)
        except BaseException:  # cancelled from outside: each lane gives its rows back
            for other in lanes:
                other.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            raise
        if failed:
            raise failed[0]
        return total

    async def resync(
        self,
        *,
        user_id: str | None = None,
        session_ids: Sequence[int] | None = None,
        confirm_revocations: bool = False,
    ) -> Counts:
        """Re-check sessions now, whatever their ``next_check_at`` (one, a user's, or all).

        ``confirm_revocations`` is the operator's answer to a tripped mass-revocation guard: it
        clears the guard and lets this resync revoke whatever Pangea says is gone.
        """
        with self._sessions.begin() as db:
            now = self._clock()
            if confirm_revocations:
                guard.clear(db, now=now)
            queries.make_due(db, now=now, user_id=user_id, session_ids=session_ids)
        return await self.drain(user_id=user_id, session_ids=session_ids, confirm_revocations=confirm_revocations)

    # --- one batch -----------------------------------------------------------------------------

    async def _process(self, claimed: list[queries.ClaimedSession], *, confirm_revocations: bool) -> Counts:
        work = [_Work(s, self._cipher) for s in claimed]
        now = self._clock()
        to_refresh: list[_Work] = []
        to_check: list[_Work] = []
        for w in work:
            action = decisions.before_check(w.facts, now, self._policy, self._rng)
            (to_refresh if action is Action.REFRESH else to_check).append(w)

        answers = await self._revalidate(to_check)
        now = self._clock()
        outcome = _Outcome()
        for w in to_check:
            decision = decisions.after_check(w.facts, answers[w.session.id], now, self._policy, self._rng)
            if decision.action is Action.STOP:
                raise OurTokenRejected("Pangea refused PANGEA_AUTHN_TOKEN; the sweep stopped and changed nothing")
            if decision.action is Action.REFRESH:
                to_refresh.append(w)
            else:
                outcome.add(w, decision, answers[w.session.id], checked=True)

        def write(db: orm.Session) -> None:
            self._hold_if_mass_revocation(db, outcome, checked=len(to_check), now=now, bypass=confirm_revocations)
            outcome.apply(db, now)

        await self._in_transaction(write)
        counts = outcome.counts
        counts.checked = len(work)
        if to_refresh:
            counts.add(await self._refresh_all(to_refresh, confirm_revocations=confirm_revocations))
        return counts

    async def _in_transaction(self, work: Callable[[orm.Session], T]) -> T:
        """Run ``work`` in one short transaction of its own.

        On PostgreSQL it runs in a thread, so while the server works the loop goes on sending
        requests and reading answers for the other batches in flight. On SQLite it runs inline:
        SQLite writes one transaction at a time anyway, and its locks are simplest on one thread.
        """
        if self._offload:
            return await asyncio.to_thread(self._transaction, work)
        return self._transaction(work)

    def _transaction(self, work: Callable[[orm.Session], T]) -> T:
        with self._sessions.begin() as db:
            return work(db)

    def _hold_if_mass_revocation(
        self, db: orm.Session, outcome: _Outcome, *, checked: int, now: datetime, bypass: bool
    ) -> None:
        would_revoke = len(outcome.revocations)
        if guard.hold_revocations(
            db, checked=checked, would_revoke=would_revoke, limits=self._guard_limits, now=now, bypass=bypass
        ):
            outcome.hold(next_check_at=now + self._policy.check_interval)

    async def _revalidate(self, work: list[_Work]) -> dict[int, Answer]:
        """Pangea's answer for each session: in bulk when we can, else one check per token."""
        answers: dict[int, Answer] = {}
        pending = work
        if self._bulk and work:
            try:
                await self._limiter.acquire()
                found = await self._client.sessions_by_active_token_ids([w.session.active_token_id for w in work])
            except errors.AuthnError as exc:
                logger.warning("Bulk revalidation failed: %s", exc, extra={"action": "bulk_failed"})
                return {w.session.id: _failed(exc) for w in work}
            now = self._clock()
            pending = []
            for w in work:
                item = found.get(w.session.active_token_id)
                if item is None or item.active_token is None:
                    pending.append(w)  # bulk says missing: confirm per token before revoking
                elif item.active_token.expire <= now:
                    pending.append(w)
                else:
                    answers[w.session.id] = Answer(
                        verdict=wire.Verdict.VALID, active_expires_at=item.active_token.expire
                    )
        checks = await asyncio.gather(*(self._guarded(self._check_one(w)) for w in pending))
        answers.update(zip((w.session.id for w in pending), checks, strict=True))
        return answers

    async def _check_one(self, w: _Work) -> Answer:
        result = await self._client.check_token(w.active_token)
        expire = result.info.expire if result.info else None
        return Answer(verdict=result.verdict, active_expires_at=expire, request_id=result.request_id)

    async def _guarded(self, call: Awaitable[Answer]) -> Answer:
        """Run one Pangea call under the concurrency bound and the rate limit; failures become answers."""
        async with self._semaphore:
            await self._limiter.acquire()
            try:
                return await call
            except errors.AuthnError as exc:
                return _failed(exc)

    # --- refresh ------------------------------------------------------------------------------

    async def _refresh_all(self, work: list[_Work], *, confirm_revocations: bool) -> Counts:
        outcome = _Outcome()
        work = await self._settle_uncertain(work, outcome)
        now = self._clock()
        sessions = [w.session for w in work]
        taken = await self._in_transaction(
            lambda db: queries.begin_refresh(db, sessions, now=now, lease=self._refresh_lease)
        )
        work = [w for w in work if w.session.id in taken]
        results = await asyncio.gather(*(self._refresh_one(w) for w in work))
        now = self._clock()
        outcome.versions = taken
        stored: list[dict[str, object]] = []
        stopped = False
        for w, (answer, creds) in zip(work, results, strict=True):
            if creds is not None:
                fresh = decisions.SessionFacts(
                    active_expires_at=creds.active_token.expire,
                    active_issued_at=creds.active_token.created_at,
                    refresh_expires_at=creds.refresh_token.expire,
                    has_refresh_token=True,
                    failures=0,
                    uncertain=False,
                )
                decision = decisions.after_refresh(fresh, answer, now, self._policy, self._rng)
                stored.append(self._stored_row(w, creds, taken[w.session.id], decision))
                outcome.audit_refreshed(w, answer)
                continue
            decision = decisions.after_refresh(w.facts, answer, now, self._policy, self._rng)
            if decision.action is Action.STOP:
                # Pangea refused *us*, so it performed nothing: put the row back as it was.
                stopped = True
                decision = decisions.Decision(
                    action=Action.KEEP, next_check_at=now, failures=w.session.failures, uncertain=w.session.uncertain
                )
            outcome.add(w, decision, answer, checked=answer.verdict is not None)

        def write(db: orm.Session) -> None:
            queries.store_refreshed(db, stored, now=now)
            # Each session was either refreshed (stored) or decided: settled, failed, refused.
            checked = len(stored) + len(outcome.decided)
            self._hold_if_mass_revocation(db, outcome, checked=checked, now=now, bypass=confirm_revocations)
            outcome.apply(db, now)

        await self._in_transaction(write)
        if stopped:
            raise OurTokenRejected("Pangea refused PANGEA_AUTHN_TOKEN; the sweep stopped")
        counts = outcome.counts
        counts.refreshed += len(stored)
        return counts

    async def _settle_uncertain(self, work: list[_Work], outcome: _Outcome) -> list[_Work]:
        """Settle the uncertain sessions of ``work`` into ``outcome``; returns those that may refresh.

        An earlier refresh of an uncertain session may have happened unseen: that is settled before
        its refresh token is sent again, so no refresh token is ever presented twice.
        """
        unsure = [w for w in work if w.session.uncertain and w.refresh_token is not None]
        if not unsure:
            return work
        settled = await self._settle(unsure)
        now = self._clock()
        for w in unsure:
            verdict, answer = settled[w.session.id]
            decision = decisions.after_settling(w.facts, verdict, answer, now, self._policy, self._rng)
            if decision.action is Action.STOP:
                raise OurTokenRejected("Pangea refused PANGEA_AUTHN_TOKEN; the sweep stopped")
            if decision.action is not Action.REFRESH:
                named = verdict.value if verdict is not None else None
                outcome.add(w, decision, answer, checked=verdict is not None, outcome=named)
        return [w for w in work if w.session.id not in outcome.decided]

    async def _settle(self, unsure: list[_Work]) -> dict[int, tuple[decisions.Settled | None, Answer]]:
        """Whether each session still carries our active token at Pangea (see decisions.after_settling)."""
        if self._bulk:
            try:
                await self._limiter.acquire()
                found = await self._client.sessions_by_active_token_ids([w.session.active_token_id for w in unsure])
            except errors.AuthnError as exc:
                return {w.session.id: (None, _failed(exc)) for w in unsure}
            return {w.session.id: _settled(found.get(w.session.active_token_id)) for w in unsure}
        answers = await asyncio.gather(*(self._guarded_settle(w) for w in unsure))
        return dict(zip((w.session.id for w in unsure), answers, strict=True))

    async def _guarded_settle(self, w: _Work) -> tuple[decisions.Settled | None, Answer]:
        """Settle one session with the user's own token (a client token cannot list the project's)."""
        async with self._semaphore:
            await self._limiter.acquire()
            try:
                page = await self._client.client_session_list(
                    w.active_token, filter={"active_token_id": w.session.active_token_id}
                )
            except errors.AuthnRequestRejected as exc:
                if exc.status == "InvalidToken":  # Pangea no longer knows our active token at all
                    return decisions.Settled.SPENT, Answer(request_id=exc.request_id)
                return None, _failed(exc)
            except errors.AuthnError as exc:
                return None, _failed(exc)
        mine = next((s for s in page.sessions if s.active_token is not None), None)
        return _settled(mine)

    async def _refresh_one(self, w: _Work) -> tuple[Answer, wire.SessionCreds | None]:
        async with self._semaphore:
            try:
                refresh_token = w.refresh_token
                assert refresh_token is not None
                await self._limiter.acquire()
                result = await self._client.refresh(refresh_token, user_token=w.active_token)
            except errors.AuthnError as exc:
                return _failed(exc), None
            except Exception:
                # One session's trouble (a token that will not decrypt, a bug) must not cost the
                # others of the batch their refreshed tokens: it stays uncertain and is retried.
                logger.exception("Refresh of session %s failed", w.session.id, extra={"action": "refresh_error"})
                return Answer.failed(Failure.UNAVAILABLE), None
        if result.creds is None:
            return Answer(verdict=result.verdict, request_id=result.request_id), None
        expire = result.creds.active_token.expire
        return Answer(verdict=result.verdict, active_expires_at=expire, request_id=result.request_id), result.creds

    def _stored_row(
        self, w: _Work, creds: wire.SessionCreds, version: int, decision: decisions.Decision
    ) -> dict[str, object]:
        active, refresh = creds.active_token, creds.refresh_token
        assert active.token is not None and refresh.token is not None
        return {
            "b_id": w.session.id,
            "b_claim": w.session.claim_token,
            "b_version": version,
            "active_token_id": active.id,
            "active_token_enc": self._cipher.encrypt(active.token),
            "active_token_hash": self._cipher.lookup_hash(active.token),
            "refresh_token_enc": self._cipher.encrypt(refresh.token),
            "active_expires_at": active.expire,
            "active_issued_at": active.created_at,
            "refresh_expires_at": refresh.expire,
            "pangea_session_id": refresh.id,
            "next_check_at": decision.next_check_at,
        }


class _Outcome:
    """Decisions of one batch, gathered so each kind is written in one statement."""

    def __init__(self, versions: dict[int, int] | None = None) -> None:
        #: Row versions after begin_refresh; rows not in it are guarded by their claimed version.
        self.versions = versions or {}
        #: Sessions decided here (kept, revoked or held), by id.
        self.decided: set[int] = set()
        self.keep: list[dict[str, object]] = []
        self.revocations: list[tuple[_Work, decisions.Decision, Answer, str | None]] = []
        self.dropped: list[int] = []
        self.events: list[audit.Event] = []
        self.counts = Counts()

    def _guard(self, w: _Work) -> dict[str, object]:
        version = self.versions.get(w.session.id, w.session.version)
        return {"b_id": w.session.id, "b_claim": w.session.claim_token, "b_version": version}

    def add(
        self, w: _Work, decision: decisions.Decision, answer: Answer, *, checked: bool, outcome: str | None = None
    ) -> None:
        """Record one decision; ``outcome`` names what Pangea said when it was no verdict (audit trail)."""
        self.decided.add(w.session.id)
        if decision.action is Action.REVOKE:
            self.revocations.append((w, decision, answer, outcome))
            return
        self._keep(w, decision, checked=checked)
        if decision.failures:
            self.counts.failed += 1
        else:
            self.counts.kept += 1
        self.events.append(audit.Event.of(w.session.id, decision, answer, outcome=outcome))

    def _keep(self, w: _Work, decision: decisions.Decision, *, checked: bool) -> None:
        self.keep.append(
            self._guard(w)
            | {
                "next_check_at": decision.next_check_at,
                "failures": decision.failures,
                "uncertain": decision.uncertain,
                "active_expires_at": decision.active_expires_at,
                "checked": checked,
            }
        )
        if decision.drop_refresh_token:
            self.dropped.append(w.session.id)

    def hold(self, *, next_check_at: datetime) -> None:
        """The guard tripped: keep every session this batch would have revoked, and re-check it later."""
        for w, decision, answer, _ in self.revocations:
            kept = decisions.Decision(
                action=Action.KEEP,
                next_check_at=next_check_at,
                failures=w.session.failures,
                uncertain=w.session.uncertain,
            )
            self._keep(w, kept, checked=answer.verdict is not None)
            self.events.append(
                audit.Event(
                    session_id=w.session.id,
                    action="held",
                    outcome=answer.verdict.value if answer.verdict else str(answer.failure),
                    reason=decision.reason,
                    request_id=answer.request_id,
                )
            )
        self.counts.held += len(self.revocations)
        self.revocations = []

    def audit_refreshed(self, w: _Work, answer: Answer) -> None:
        self.events.append(audit.Event.refreshed(w.session.id, answer.request_id))

    def apply(self, db: orm.Session, now: datetime) -> None:
        revoke = []
        for w, decision, answer, outcome in self.revocations:
            reason = decision.reason or "invalid_token"
            revoke.append(self._guard(w) | {"reason": reason})
            self.counts.revoked += 1
            self.counts.reasons[reason] += 1
            self.events.append(audit.Event.of(w.session.id, decision, answer, outcome=outcome))
        queries.record_checks(db, self.keep, now=now)
        queries.revoke(db, revoke, now=now)
        queries.drop_refresh_tokens(db, self.dropped)
        audit.record(db, self.events, now=now)


def _settled(item: wire.SessionItem | None) -> tuple[decisions.Settled, Answer]:
    """The list's word on one uncertain session: its item if it still carries our active token."""
    if item is None or item.active_token is None:
        return decisions.Settled.SPENT, Answer()
    return decisions.Settled.UNSPENT, Answer(verdict=wire.Verdict.VALID, active_expires_at=item.active_token.expire)


def _failed(exc: errors.AuthnError) -> Answer:
    """The no-answer that a failure to reach Pangea stands for."""
    retry_after = None
    if isinstance(exc, errors.AuthnRejectedUs):
        failure = Failure.REJECTED_US
    elif isinstance(exc, errors.AuthnRateLimited):
        failure, retry_after = Failure.RATE_LIMITED, exc.retry_after
    elif isinstance(exc, errors.AuthnOutcomeUnknown):
        failure = Failure.OUTCOME_UNKNOWN
    elif isinstance(exc, errors.AuthnProtocolError | errors.AuthnRequestRejected):
        failure = Failure.PROTOCOL
    else:
        failure = Failure.UNAVAILABLE
    return Answer.failed(failure, retry_after=retry_after, request_id=exc.request_id)
