"""The sync engine: claim due sessions, ask Pangea, decide, write the outcome, in batches.

Orchestration only: statements live in ``worker.queries``, the wire in ``worker.authn``, the
rules in ``worker.decisions``. Transactions are short and never span an HTTP call:
claim (commit) → ask Pangea → decide → apply (commit) → refresh the ones that need it
(compare-and-swap, commit) → call Pangea → apply (commit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import orm

from worker import audit, authn, crypto, decisions, errors, guard, outbox_queries, queries, ratelimit, wire
from worker.counts import SyncCounts as Counts
from worker.decisions import Action, Answer, Failure, Settled
from worker.decisions import failed as _failed
from worker.errors import OurTokenRejected

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Work:
    """One claimed session. Its tokens are decrypted only when a call to Pangea needs them: a bulk
    answer needs only the active token's id, and Fernet costs more than everything else per session."""

    __slots__ = ("_active", "_cipher", "_facts", "_refresh", "calm_until", "learned_session_id", "session")

    def __init__(self, session: queries.ClaimedSession, cipher: crypto.TokenCipher) -> None:
        self.session = session
        self._cipher = cipher
        self._active: str | None = None
        self._refresh: str | None = None
        self._facts: decisions.SessionFacts | None = None
        #: Pangea's id of this session, when its session list gave one other than the stored id.
        self.learned_session_id: str | None = None
        #: For a healthy session, :func:`worker.decisions.calm_until`; None for one with a failure or
        #: an uncertain refresh (every decision about it is taken in full).
        self.calm_until: datetime | None = None

    def is_routine_by(self, calm_by: datetime) -> bool:
        """Whether a check that finds this session's expiry as stored leaves it as it was: nothing to write.

        Healthy, calm until ``calm_by`` (a check interval from now), and on its group's schedule (no
        claim, no due time of its own). Then the full decision is a routine keep
        (:func:`worker.decisions.is_routine`), whatever the jitter would draw.
        """
        s = self.session
        return (
            self.calm_until is not None
            and self.calm_until >= calm_by
            and s.claim_token is None
            and s.next_check_at is None
        )

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
        refresh_timeout: timedelta | None = None,
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
        #: One refresh request is abandoned after this; the hold outlasts it (see _refresh_one).
        timeout = refresh_timeout if refresh_timeout is not None else refresh_lease / 2
        if timeout >= refresh_lease:
            raise ValueError("refresh_timeout must be shorter than refresh_lease: the hold must outlast the request")
        self._refresh_timeout = timeout.total_seconds()
        self._bulk = bulk
        self._guard_limits = guard_limits or guard.Limits()
        self._batches_in_flight = batches_in_flight
        bind = sessions.kw.get("bind")
        self._offload = bind is not None and bind.dialect.name != "sqlite"
        self._clock = clock
        # Jitter needs no secret randomness: SystemRandom would cost a system call per draw.
        self._rng = rng or random.Random()

    # --- entry points --------------------------------------------------------------------------

    async def process_batch(self, *, confirm_revocations: bool = False, due_by: datetime | None = None) -> Counts:
        """Take the next piece of due work (by ``due_by``, default now) and bring its sessions in line with Pangea.

        Sessions with a due time of their own come first (a batch of them, each claimed by its
        row: refreshes, backoffs, uncertain refreshes are few); else one due check group, whose round
        goes through its sessions page by page and writes only what changed.
        """
        while True:  # a group with no session to check (empty, or all on their own schedule) is not a batch
            counts = await self._next(confirm_revocations=confirm_revocations, due_by=due_by)
            if counts is None:
                return Counts()
            if counts.checked or counts.stopped:
                return counts

    async def _next(self, *, confirm_revocations: bool, due_by: datetime | None) -> Counts | None:
        """One piece of due work, as :meth:`process_batch`; None when nothing was due."""
        claim_token = secrets.token_hex(16)
        now = self._clock()
        due_by = due_by or now
        claimed = await self._in_transaction(
            lambda db: queries.claim_due_sessions(
                db, now=now, limit=self._batch_size, lease=self._lease, claim_token=claim_token, due_by=due_by
            )
        )
        if claimed:

            async def batch() -> Counts:
                counts, _ = await self._process(claimed, confirm_revocations=confirm_revocations)
                return counts

            return await self._giving_back(batch(), lambda db: queries.release(db, claim_token=claim_token))
        groups = await self._in_transaction(
            lambda db: queries.take_groups(
                db,
                now=now,
                lease=self._lease,
                interval=self._policy.check_interval,
                claim_token=claim_token,
                due_by=due_by,
                sessions=self._batch_size,
            )
        )
        if not groups:
            return None
        # The groups' cursors stay as written: the next worker resumes there.
        round_ = self._round(groups, confirm_revocations=confirm_revocations)
        return await self._giving_back(round_, lambda db: queries.release_groups(db, groups))

    async def _giving_back(self, work: Awaitable[Counts], give_back: Callable[[orm.Session], object]) -> Counts:
        """``work``'s counts; if it fails, ``give_back`` first returns what it took (rows, groups) now
        instead of when the lease lapses. Pangea refusing our token is the run's outcome, as in the
        outbox: counts that say stopped."""
        try:
            return await work
        except OurTokenRejected as exc:
            with self._sessions.begin() as db:
                give_back(db)
            return _stopped(exc)
        except BaseException:
            with self._sessions.begin() as db:
                give_back(db)
            raise

    async def _round(self, groups: list[queries.GroupRound], *, confirm_revocations: bool) -> Counts:
        """Go through the rounds of these groups (or what is left of them), a batch of sessions at a time.

        Each batch (up to ``batch_size`` sessions, from one large group or several small ones) is
        read without a write, checked, and its changed sessions written in one transaction with the
        groups' cursors (which renew their leases); a group whose sessions are all done is finished.
        A lease lost to another worker ends this worker's part of that round: the other goes on
        from the last page written.
        """
        total = Counts()
        cursors = {g.id: g.cursor for g in groups}
        done = dict.fromkeys(cursors, 0)
        live = list(groups)
        while live:
            now = self._clock()
            batch: list[queries.ClaimedSession] = []
            moved: list[tuple[queries.GroupRound, tuple[int, int]]] = []
            finished: list[queries.GroupRound] = []
            for group in live:
                room = self._batch_size - len(batch)
                if room <= 0:
                    break
                page = await self._in_transaction(
                    functools.partial(queries.group_page, group=group, cursor=cursors[group.id], limit=room, now=now)
                )
                batch.extend(page)
                if page:
                    moved.append((group, (page[-1].bucket, page[-1].id)))
                    done[group.id] += len(page)
                if len(page) < room:
                    finished.append(group)
            ours: set[int] = {g.id for g in live}
            # A group whose sessions this batch finishes is finished in the batch's own write.
            closing = {g.id: done[g.id] for g in finished if any(m.id == g.id for m, _ in moved)}
            if batch:
                counts, kept = await self._process(
                    batch, confirm_revocations=confirm_revocations, groups=moved, finishing=closing
                )
                total.add(counts)
                if counts.stopped:
                    return total
                # a group with no session in this batch kept its lease; one with sessions, if its write took
                ours = kept | (ours - {g.id for g, _ in moved})
            for group, cursor in moved:
                cursors[group.id] = cursor
            ending = [g for g in finished if g.id in ours and g.id not in closing]
            if ending:

                def finish(db: orm.Session, ending: list[queries.GroupRound] = ending) -> None:
                    for group in ending:
                        queries.finish_group(db, group=group, sessions=done[group.id])

                await self._in_transaction(finish)
            live = [g for g in live if g.id in ours and g not in finished]
        return total

    async def drain(self, *, confirm_revocations: bool = False) -> Counts:
        """Process due work until nothing is due (``sweep --once``, ``resync --all``).

        ``batches_in_flight`` lanes run at once, each taking its own work (a batch of sessions due
        on their own, or a group), so one lane's database work and its last slow answers overlap the
        next one's requests. After a failure no lane starts more work, but none is cut short either
        (a refresh in flight is never abandoned); then the first failure is raised as it is. Only
        work due when the drain starts is taken: under a storm of failures, sessions backing off
        become due again within seconds, and a drain that chased them would never end.
        """
        total = Counts()
        failed: list[Exception] = []
        due_by = self._clock()

        async def lane() -> None:
            while not failed and not total.stopped:
                try:
                    counts = await self._next(confirm_revocations=confirm_revocations, due_by=due_by)
                except Exception as exc:
                    failed.append(exc)
                    return
                if counts is None:
                    return
                total.add(counts)
                if counts.stopped:
                    return

        lanes = [asyncio.ensure_future(lane()) for _ in range(self._batches_in_flight)]
        try:
            await asyncio.gather(*lanes)
        except BaseException:  # cancelled from outside: each lane gives its work back
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
        """Re-check sessions now, whatever their schedule (some by id, a user's, or all).

        All: every group's round and every session with a due time of its own is made due now (a
        row per group, not per session), then drained like a sweep. Some: they are read in pages,
        checked, and only what the checks change is written; sessions under another worker's live
        lease are left to it. ``confirm_revocations`` is the operator's answer to a tripped
        mass-revocation guard: it clears the guard and lets this resync revoke whatever Pangea says is gone.
        """
        with self._sessions.begin() as db:
            now = self._clock()
            if confirm_revocations:
                guard.clear(db, now=now)
            if user_id is None and session_ids is None:
                queries.make_due(db, now=now)
        if user_id is None and session_ids is None:
            return await self.drain(confirm_revocations=confirm_revocations)
        total, after = Counts(), 0
        while True:
            now = self._clock()
            page = await self._in_transaction(
                functools.partial(
                    queries.read_sessions,
                    now=now,
                    limit=self._batch_size,
                    after_id=after,
                    user_id=user_id,
                    session_ids=session_ids,
                )
            )
            if not page:
                return total
            try:
                counts, _ = await self._process(page, confirm_revocations=confirm_revocations)
            except OurTokenRejected as exc:
                counts = _stopped(exc)
            total.add(counts)
            after = page[-1].id
            if counts.stopped:
                return total

    # --- one batch -----------------------------------------------------------------------------

    async def _process(
        self,
        claimed: list[queries.ClaimedSession],
        *,
        confirm_revocations: bool,
        groups: Sequence[tuple[queries.GroupRound, tuple[int, int]]] = (),
        finishing: Mapping[int, int] | None = None,
    ) -> tuple[Counts, set[int]]:
        """Check one batch (of sessions due on their own, or from groups' rounds) and write what changed.

        ``groups``: the groups the batch comes from, each with its cursor after the batch; those in
        ``finishing`` (id: sessions its round went through) are finished instead. Returns the counts,
        and the groups whose leases were still ours (their cursors moved on, or their rounds ended).
        """
        policy = self._policy
        work = [_Work(s, self._cipher) for s in claimed]
        to_check, to_refresh = self._sort_out(work, self._clock())

        answers = await self._revalidate(to_check, learn=to_refresh)
        now = self._clock()
        calm_by = now + policy.check_interval
        outcome = _Outcome(policy)
        for w in to_check:
            answer = answers[w.session.id]
            if answer is _AS_STORED and w.is_routine_by(calm_by):
                outcome.counts.kept += 1  # the routine check: nothing changed, nothing to write or explain
                continue
            decision = decisions.after_check(w.facts, answer, now, policy, self._rng)
            if decision.action is Action.STOP:
                raise errors.OurTokenRejected("Pangea refused PANGEA_AUTHN_TOKEN; the sweep stopped, changed nothing")
            if decision.action is Action.REFRESH:
                to_refresh.append(w)
            else:
                outcome.add(w, decision, answer, checked=True)

        learned = {w.session.id: w.learned_session_id for w in work if w.learned_session_id is not None}
        unmarked = [w.session for w in to_refresh if w.session.claim_token is None]

        def write(db: orm.Session) -> set[int]:
            self._hold_if_mass_revocation(db, outcome, checked=len(to_check), now=now, bypass=confirm_revocations)
            outcome.apply(db, now)
            queries.learn_session_ids(db, learned)
            marked = queries.mark_refreshing(db, unmarked, until=now + self._refresh_lease)
            for w in to_refresh:
                if w.session.id in marked:
                    w.session = dataclasses.replace(w.session, next_check_at=now + self._refresh_lease)
            ended = finishing or {}
            return {
                g.id
                for g, cursor in groups
                if (
                    queries.finish_group(db, group=g, sessions=ended[g.id])
                    if g.id in ended
                    else queries.advance_group(db, g, cursor=cursor, now=now, lease=self._lease)
                )
            }

        ours = await self._in_transaction(write)
        counts = outcome.counts
        counts.checked = len(work)
        # A session the marking missed moved on (logged out, taken by another worker): not ours to refresh.
        to_refresh = [w for w in to_refresh if w.session.claim_token is not None or w.session.next_check_at is not None]
        if to_refresh:
            counts.add(await self._refresh_all(to_refresh, confirm_revocations=confirm_revocations))
        return counts, ours

    def _sort_out(self, work: list[_Work], now: datetime) -> tuple[list[_Work], list[_Work]]:
        """The batch's sessions to check, and those to refresh at once (inside their refresh margin).

        A healthy session is given its :func:`worker.decisions.calm_until`; one calm now is a check
        whatever the jitter would draw, so it takes no draw.
        """
        policy = self._policy
        to_check: list[_Work] = []
        to_refresh: list[_Work] = []
        calm = decisions.CalmBounds(policy)
        for w in work:
            s = w.session
            if not s.failures and not s.uncertain:
                w.calm_until = calm.until(s.active_expires_at, s.active_issued_at)
                if w.calm_until > now:
                    to_check.append(w)
                    continue
            action = decisions.before_check(w.facts, now, policy, self._rng)
            (to_refresh if action is Action.REFRESH else to_check).append(w)
        return to_check, to_refresh

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
        # A session whose lost refresh we proved and ended at Pangea ourselves is no word of Pangea's
        # that sessions are gone (a wrong project lists none of ours to end): not weighed.
        would_revoke = sum(e.outcome != decisions.Settled.ORPHAN_ENDED for e in outcome.revocations)
        if guard.hold_revocations(
            db, checked=checked, would_revoke=would_revoke, limits=self._guard_limits, now=now, bypass=bypass
        ):
            outcome.hold(next_check_at=now + self._policy.check_interval)

    async def _revalidate(self, work: list[_Work], *, learn: Sequence[_Work] = ()) -> dict[int, Answer]:
        """Pangea's answer for each session: in bulk when we can, else one check per token.

        The bulk list also names the sessions of ``learn`` (the batch's refreshes): its ``id`` is
        Pangea's word on which id is each session's (see :meth:`_learn`), at no extra request.
        """
        answers: dict[int, Answer] = {}
        pending = work
        if self._bulk and (work or learn):
            asked = [*work, *learn]
            try:
                listed = await self._client.sessions_by_active_token_ids(
                    [w.session.active_token_id for w in asked], pace=self._limiter.acquire
                )
            except errors.AuthnError as exc:
                logger.warning("Bulk revalidation failed: %s", exc, extra={"action": "bulk_failed"})
                return {w.session.id: _failed(exc) for w in work}
            self._learn(asked, listed.found)
            now = self._clock()
            pending = []
            for w in work:
                s = w.session
                item = listed.found.get(s.active_token_id)
                if item is None or item.active_expire is None or item.active_expire <= now:
                    pending.append(w)  # missing, or Pangea would not list it: confirm per token before revoking
                elif item.active_expire == s.active_expires_at:
                    answers[s.id] = _AS_STORED
                else:
                    answers[s.id] = Answer(verdict=wire.Verdict.VALID, active_expires_at=item.active_expire)
        checks = await asyncio.gather(*(self._guarded(self._check_one(w)) for w in pending))
        answers.update(zip((w.session.id for w in pending), checks, strict=True))
        return answers

    def _learn(self, work: Sequence[_Work], found: dict[str, wire.ListedSession]) -> None:
        """Take Pangea's session ids from a session list; written with the batch's outcome.

        The id stored at login is a guess (the refresh token's). A session refreshed before any
        check would keep it, and a refresh whose answer is lost can be cleaned up at Pangea only
        by the session's real id (:meth:`_end_orphans`).
        """
        for w in work:
            item = found.get(w.session.active_token_id)
            if item is not None and item.id != w.session.pangea_session_id:
                w.learned_session_id = item.id
                w.session = dataclasses.replace(w.session, pangea_session_id=item.id)

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
        """Refresh ``work``: each refresh takes its own hold as it goes out and stores its tokens at once.

        What is left (refusals, failures, spent tokens) is decided and written for the batch in one
        transaction, under the mass-revocation guard.
        """
        outcome = _Outcome(self._policy)
        work = await self._settle_uncertain(work, outcome)
        results = await asyncio.gather(*(self._refresh_one(w) for w in work))
        now = self._clock()
        stopped = False
        stored = 0
        for w, done in zip(work, results, strict=True):
            if done.hold is None or done.settled:
                stored += done.stored
                continue  # another worker has the row, or this refresh was already written
            outcome.holds[w.session.id] = done.hold
            decision = decisions.after_refresh(w.facts, done.answer, now, self._policy, self._rng)
            if decision.action is Action.STOP:
                # Pangea refused *us*, so it performed nothing: put the row back as it was.
                stopped = True
                decision = decisions.Decision(
                    action=Action.KEEP, next_check_at=now, failures=w.session.failures, uncertain=w.session.uncertain
                )
            outcome.add(w, decision, done.answer, checked=done.answer.verdict is not None)

        def write(db: orm.Session) -> None:
            # Every session here was answered (refreshed, settled, refused) or failed to be.
            checked = stored + len(outcome.decided)
            self._hold_if_mass_revocation(db, outcome, checked=checked, now=now, bypass=confirm_revocations)
            outcome.apply(db, now)

        await self._in_transaction(write)
        if stopped:
            raise errors.OurTokenRejected("Pangea refused PANGEA_AUTHN_TOKEN; the sweep stopped")
        counts = outcome.counts
        counts.refreshed += stored
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
        if self._bulk:
            spent = [w for w in unsure if settled[w.session.id][0] is Settled.SPENT]
            settled.update(await self._end_orphans(spent, outcome))
        now = self._clock()
        for w in unsure:
            verdict, answer = settled[w.session.id]
            decision = decisions.after_settling(w.facts, verdict, answer, now, self._policy, self._rng)
            if decision.action is Action.STOP:
                raise errors.OurTokenRejected("Pangea refused PANGEA_AUTHN_TOKEN; the sweep stopped")
            if decision.action is not Action.REFRESH:
                named = verdict.value if verdict is not None else None
                outcome.add(w, decision, answer, checked=verdict is not None, outcome=named)
        return [w for w in work if w.session.id not in outcome.decided]

    async def _settle(self, unsure: list[_Work]) -> dict[int, tuple[decisions.Settled | None, Answer]]:
        """Whether each session still carries our active token at Pangea (see decisions.after_settling)."""
        settled: dict[int, tuple[decisions.Settled | None, Answer]] = {}
        if self._bulk:
            try:
                listed = await self._client.sessions_by_active_token_ids(
                    [w.session.active_token_id for w in unsure], pace=self._limiter.acquire
                )
            except errors.AuthnError as exc:
                return {w.session.id: (None, _failed(exc)) for w in unsure}
            unlisted = set(listed.unlisted)
            for w in unsure:
                if w.session.active_token_id not in unlisted:
                    item = listed.found.get(w.session.active_token_id)
                    settled[w.session.id] = _settled(item.active_expire if item is not None else None)
            # What Pangea would not list even alone is asked one by one, with the user's own token.
            unsure = [w for w in unsure if w.session.active_token_id in unlisted]
        answers = await asyncio.gather(*(self._guarded_settle(w) for w in unsure))
        settled.update(zip((w.session.id for w in unsure), answers, strict=True))
        return settled

    async def _end_orphans(
        self, spent: list[_Work], outcome: _Outcome
    ) -> dict[int, tuple[decisions.Settled | None, Answer]]:
        """End at Pangea the sessions that a refresh whose answer we lost left with tokens nobody holds.

        A session that Pangea lists under its id (owned by our user) with an active token other than
        ours was refreshed: the new tokens exist only at Pangea. With a service token it is ended by
        that id, so no live session hangs on tokens no one holds. A failure to end it is settled as
        no answer: the session stays uncertain, is settled again later, and its orphan ended then.

        Each is ended under the row's hold (:meth:`_take_hold`), taken once Pangea showed the other
        token and before the session is ended: a batch that outlived its lease may hold a stale read,
        and the "other active token" it sees may be the one a worker that took the row over has just
        refreshed to. That session is not an orphan, and only the hold tells the two apart.
        """
        ended: dict[int, tuple[decisions.Settled | None, Answer]] = {}
        for w in spent:
            pangea_id = w.session.pangea_session_id
            if pangea_id is None:
                continue
            try:
                await self._limiter.acquire()
                item = await self._client.session_of(w.session.user_id, session_id=pangea_id)
                if item is None or item.active_token is None or item.active_token.id == w.session.active_token_id:
                    continue  # gone already, or nothing to prove a refresh happened
                try:
                    hold = await self._take_hold(w)
                except Exception:
                    logger.exception("Orphan of session %s kept: no hold", w.session.id, extra=_ORPHAN_KEPT)
                    ended[w.session.id] = (None, Answer.failed(Failure.UNAVAILABLE))
                    continue
                if hold is None:
                    continue  # the row moved on: its settling is not ours to write either (the guard drops it)
                outcome.holds[w.session.id] = hold
                await self._limiter.acquire()
                result = await self._client.session_invalidate(item.id)
            except errors.AuthnError as exc:
                # Settled as no answer: the session keeps its (spent) refresh token, so it is settled
                # again, and the orphan ended then, instead of living on at Pangea after one failure.
                logger.info("Orphaned session of %s not ended: %s", w.session.id, exc, extra=_ORPHAN_KEPT)
                ended[w.session.id] = (None, _failed(exc))
                continue
            if result.verdict is wire.Verdict.VALID:
                logger.info(
                    "Ended the Pangea session a lost refresh left behind (session %s)",
                    w.session.id,
                    extra={"action": "orphan_ended"},
                )
                ended[w.session.id] = (decisions.Settled.ORPHAN_ENDED, Answer(request_id=result.request_id))
        return ended

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
        mine = next((s.active_token for s in page.sessions if s.active_token is not None), None)
        return _settled(mine.expire if mine is not None else None)

    async def _take_hold(self, w: _Work) -> tuple[str, int] | None:
        """Take the hold on ``w``'s row before an act at Pangea that cannot be undone; ``(token, version)``.

        A refresh, or ending a lost refresh's orphan. Compare-and-swap on the claim the batch read
        (:func:`worker.queries.begin_refresh`): None when the row moved on since, because the app
        ended it or, the batch's lease having lapsed, another worker took it over (and may have
        refreshed it). Such a row is not ours to act on at Pangea, whatever the batch read of it.
        """
        hold_token = secrets.token_hex(16)
        now = self._clock()
        version = await self._in_transaction(
            lambda db: queries.begin_refresh(db, w.session, now=now, lease=self._refresh_lease, hold_token=hold_token)
        )
        return None if version is None else (hold_token, version)

    async def _refresh_one(self, w: _Work) -> _Refreshed:
        """One refresh: wait for a slot and the rate limit, take the hold, send once, store at once.

        The hold is taken only when the request is about to go out, and the request is one attempt
        bounded by :attr:`_refresh_timeout` (no retry inside the call, not even after a 429), so
        the hold (:func:`worker.settings.Settings.refresh_lease`) outlasts the whole time this
        refresh token can be in flight, whatever the queueing, throttling or settings.
        """
        async with self._semaphore:
            try:
                refresh_token, user_token = w.refresh_token, w.active_token
                assert refresh_token is not None
                await self._limiter.acquire()
                hold = await self._take_hold(w)
            except Exception:
                # Nothing was sent: a token that will not decrypt, the database gone. The row goes
                # back with the batch's claim and is tried again; the others of the batch go on.
                logger.exception("Refresh of session %s not started", w.session.id, extra={"action": "refresh_error"})
                return _Refreshed(hold=None, answer=Answer.failed(Failure.UNAVAILABLE))
            if hold is None:
                return _Refreshed(hold=None, answer=Answer())  # the row moved on: not ours to refresh
            try:
                async with asyncio.timeout(self._refresh_timeout):
                    result = await self._client.refresh(refresh_token, user_token=user_token)
            except TimeoutError:
                return _Refreshed(hold=hold, answer=Answer.failed(Failure.OUTCOME_UNKNOWN))
            except errors.AuthnError as exc:
                return _Refreshed(hold=hold, answer=_failed(exc))
            except Exception:
                # The request may have gone out: the row stays uncertain and is settled before reuse.
                logger.exception("Refresh of session %s failed", w.session.id, extra={"action": "refresh_error"})
                return _Refreshed(hold=hold, answer=Answer.failed(Failure.OUTCOME_UNKNOWN))
        if result.creds is None:
            return _Refreshed(hold=hold, answer=Answer(verdict=result.verdict, request_id=result.request_id))
        answer = Answer(
            verdict=result.verdict, active_expires_at=result.creds.active_token.expire, request_id=result.request_id
        )
        return await self._store(w, hold, result.creds, answer)

    async def _store(self, w: _Work, hold: tuple[str, int], creds: wire.SessionCreds, answer: Answer) -> _Refreshed:
        """Store a refresh's new tokens now, in a transaction of their own: an answer that arrived is kept.

        If the app ended the session while the refresh was in flight, the new tokens keep a session
        alive at Pangea that nobody holds: their logout is queued like any other.
        """
        now = self._clock()
        fresh = decisions.SessionFacts(
            active_expires_at=creds.active_token.expire,
            active_issued_at=creds.active_token.created_at,
            refresh_expires_at=creds.refresh_token.expire,
            has_refresh_token=True,
            failures=0,
            uncertain=False,
        )
        decision = decisions.after_refresh(fresh, answer, now, self._policy, self._rng)
        row = self._stored_row(w, creds, decision)
        if decisions.is_routine(decision, fresh, now, self._policy):
            row["next_check_at"] = None  # back on its group's schedule

        def write(db: orm.Session) -> bool:
            if queries.store_refreshed(db, row, now=now):
                audit.record_one(db, audit.Event.refreshed(w.session.id, answer.request_id), now=now)
                return True
            ended = queries.ended_session(db, w.session.id)
            if ended is not None:
                outbox_queries.add_session_logout(
                    db, session_id=w.session.id, user_id=ended[0], token_enc=str(row["active_token_enc"]), now=now
                )
                audit.record_one(
                    db,
                    audit.Event(session_id=w.session.id, action="late_refresh", outcome="logout_queued"),
                    now=now,
                )
            return False

        try:
            stored = await self._in_transaction(write)
        except Exception:
            # The database failed us with the new tokens in hand. The row stays uncertain: it is
            # settled from Pangea's session list before its refresh token is ever sent again.
            logger.exception(
                "Refreshed tokens of session %s could not be stored", w.session.id, extra={"action": "refresh_unstored"}
            )
            return _Refreshed(hold=hold, answer=answer, settled=True)
        if not stored:
            logger.info(
                "Session %s ended while its refresh was in flight; logout of the new tokens queued",
                w.session.id,
                extra={"action": "refreshed_after_end"},
            )
        return _Refreshed(hold=hold, answer=answer, stored=stored, settled=True)

    def _stored_row(self, w: _Work, creds: wire.SessionCreds, decision: decisions.Decision) -> dict[str, object]:
        active, refresh = creds.active_token, creds.refresh_token
        assert active.token is not None and refresh.token is not None
        return {
            "b_id": w.session.id,
            "b_old_active_token_id": w.session.active_token_id,
            "active_token_id": active.id,
            "active_token_enc": self._cipher.encrypt(active.token),
            "active_token_hash": self._cipher.lookup_hash(active.token),
            "refresh_token_enc": self._cipher.encrypt(refresh.token),
            "active_expires_at": active.expire,
            "active_issued_at": active.created_at,
            "refresh_expires_at": refresh.expire,
            # Not the new refresh token's id: a session keeps its id across rotations, and which id
            # Pangea gives the session is learned from its session list (learn_session_ids).
            "next_check_at": decision.next_check_at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class _Refreshed:
    """What became of one refresh."""

    #: ``(hold token, version)`` of the hold taken; None when the refresh was never sent.
    hold: tuple[str, int] | None
    answer: Answer
    #: The new tokens are in the database.
    stored: bool = False
    #: Written already (stored, or left for settling): nothing more to decide for this session.
    settled: bool = False


@dataclass(frozen=True, slots=True)
class _Decided:
    """One decision waiting to be written, with what its audit event and counts will say."""

    work: _Work
    decision: decisions.Decision
    answer: Answer
    #: What Pangea said when it was no verdict (the audit trail's outcome), if not the answer's own.
    outcome: str | None = None
    #: Whether Pangea answered (the row's ``last_checked_at`` moves only then).
    checked: bool = True
    #: The guard tripped and held this revocation back: written as a kept session.
    held_reason: str | None = None


class _Outcome:
    """Decisions of one batch, gathered so each kind is written in one statement.

    Counts and audit events are made only from the rows a write really changed: a decision whose
    compare-and-swap lost (the app logged the user out, another worker took the row over) is
    counted as ``dropped`` and leaves no trace in the audit trail, the task result or the metrics.
    """

    def __init__(self, policy: decisions.Policy) -> None:
        self._policy = policy
        #: ``(hold token, version)`` of sessions whose refresh hold this batch took; the others are
        #: guarded by their claim.
        self.holds: dict[int, tuple[str, int]] = {}
        #: Sessions decided here (kept, revoked or held), by id.
        self.decided: set[int] = set()
        self.keep: list[_Decided] = []
        self.revocations: list[_Decided] = []
        self.counts = Counts()

    def _guard(self, w: _Work) -> dict[str, object]:
        claim, version = self.holds.get(w.session.id, (w.session.claim_token, w.session.version))
        return {"b_id": w.session.id, "b_claim": claim, "b_version": version}

    def add(
        self, w: _Work, decision: decisions.Decision, answer: Answer, *, checked: bool, outcome: str | None = None
    ) -> None:
        """Record one decision; ``outcome`` names what Pangea said when it was no verdict (audit trail)."""
        self.decided.add(w.session.id)
        entry = _Decided(w, decision, answer, outcome, checked=checked)
        (self.revocations if decision.action is Action.REVOKE else self.keep).append(entry)

    def hold(self, *, next_check_at: datetime) -> None:
        """The guard tripped: keep every session this batch would have revoked, and re-check it later."""
        for entry in self.revocations:
            s = entry.work.session
            kept = decisions.Decision(
                action=Action.KEEP, next_check_at=next_check_at, failures=s.failures, uncertain=s.uncertain
            )
            reason = entry.decision.reason or "invalid_token"
            checked = entry.answer.verdict is not None
            self.keep.append(_Decided(entry.work, kept, entry.answer, entry.outcome, checked, held_reason=reason))
        self.revocations = []

    def _routine(self, entry: _Decided, now: datetime) -> bool:
        return entry.held_reason is None and decisions.is_routine(entry.decision, entry.work.facts, now, self._policy)

    def _needs_write(self, entry: _Decided, now: datetime) -> bool:
        """Whether a kept decision changes anything: a routine check of a session on its group's schedule does not."""
        s, d = entry.work.session, entry.decision
        return not (
            self._routine(entry, now)
            and s.claim_token is None
            and s.next_check_at is None
            and s.id not in self.holds
            and (d.active_expires_at is None or d.active_expires_at == s.active_expires_at)
        )

    def _keep_row(self, entry: _Decided, now: datetime) -> dict[str, object]:
        d = entry.decision
        return self._guard(entry.work) | {
            # A routine outcome puts the session (back) on its group's schedule.
            "next_check_at": None if self._routine(entry, now) else d.next_check_at,
            "failures": d.failures,
            "uncertain": d.uncertain,
            "active_expires_at": d.active_expires_at,
            "checked": entry.checked,
        }

    def _explains(self, entry: _Decided, now: datetime) -> bool:
        """Whether a written kept decision goes in the audit trail: it changed something the session's
        history should explain (a failure, a recovery, an uncertain refresh, a new expiry), not merely
        its schedule (a login's first check, a refresh's next one)."""
        facts, d = entry.work.facts, entry.decision
        new_expiry = d.active_expires_at is not None and d.active_expires_at != facts.active_expires_at
        return not self._routine(entry, now) or facts.failures > 0 or facts.uncertain or new_expiry

    def apply(self, db: orm.Session, now: datetime) -> None:
        """Write the batch's decisions; count and audit only those the database took."""
        written: list[_Decided] = []
        unwritten = 0
        for e in self.keep:  # one pass: deciding "routine" is most of a kept check's Python
            if self._needs_write(e, now):
                written.append(e)
            else:
                unwritten += 1
        self.keep = written
        kept = queries.record_checks(db, [self._keep_row(e, now) for e in self.keep], now=now)
        revoked = queries.revoke(
            db,
            [self._guard(e.work) | {"reason": e.decision.reason or "invalid_token"} for e in self.revocations],
            now=now,
        )
        queries.drop_refresh_tokens(
            db, [e.work.session.id for e in self.keep if e.decision.drop_refresh_token and e.work.session.id in kept]
        )
        events: list[audit.Event] = []
        counts = self.counts
        counts.kept += unwritten  # routine: nothing changed, nothing written, nothing to explain
        for e in self.keep:
            if e.work.session.id not in kept:
                counts.dropped += 1
            elif e.held_reason is not None:
                counts.held += 1
                answer = e.answer
                outcome = answer.verdict.value if answer.verdict else str(answer.failure)
                events.append(
                    audit.Event(
                        session_id=e.work.session.id,
                        action="held",
                        outcome=outcome,
                        reason=e.held_reason,
                        request_id=answer.request_id,
                    )
                )
            else:
                if e.decision.failures:
                    counts.failed += 1
                else:
                    counts.kept += 1
                if self._explains(e, now):
                    events.append(audit.Event.of(e.work.session.id, e.decision, e.answer, outcome=e.outcome))
        for e in self.revocations:
            if e.work.session.id not in revoked:
                counts.dropped += 1
                continue
            reason = e.decision.reason or "invalid_token"
            counts.revoked += 1
            counts.reasons[reason] += 1
            events.append(audit.Event.of(e.work.session.id, e.decision, e.answer, outcome=e.outcome))
        audit.record(db, events, now=now)


#: Log extra of an orphaned Pangea session left for a later settling.
_ORPHAN_KEPT = {"action": "orphan_kept"}


def _settled(active_expire: datetime | None) -> tuple[decisions.Settled, Answer]:
    """The list's word on one uncertain session: the expiry of our active token if the session still
    carries it (its listing by that token's id), None if not."""
    if active_expire is None:
        return decisions.Settled.SPENT, Answer()
    return decisions.Settled.UNSPENT, Answer(verdict=wire.Verdict.VALID, active_expires_at=active_expire)


#: A bulk answer that lists a session with the expiry it has in the database: Pangea's Success, and
#: no new expiry to record (``active_expires_at`` None is "as stored" to ``decisions.after_check``).
#: One object for them all, so the routine check is told apart by identity and costs no allocation.
_AS_STORED = Answer(verdict=wire.Verdict.VALID)


def _stopped(exc: OurTokenRejected) -> Counts:
    """A run that Pangea's refusal of our token stopped: logged once, with counts that say so."""
    logger.error("%s", exc, extra={"action": "sweep_stopped", "reason": "unauthorized"})
    return Counts(stopped=True)
