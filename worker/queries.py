"""Every statement the sync engine runs on the ``sessions`` table, one function each.

Functions take a SQLAlchemy ``Session`` and never make or commit one: the engine owns the
transactions, and keeps each one short and away from any HTTP call. Writes after a claim are
guarded by ``claim_token`` and ``version``, so a result from a worker whose lease lapsed (or a row
the app logged out meanwhile) is dropped instead of overwriting newer facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import orm

from worker import db as dbmod
from worker import frozen, leases, models, verification

S = models.LocalSession
_T = cast(sa.Table, models.LocalSession.__table__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedSession:
    """A session this worker is about to check, as read (tokens still encrypted).

    ``claim_token`` is the lease it was read under: this worker's own claim for a session with a due
    time of its own, NULL for one read from its group's round or by a manual resync (the group, or
    nobody, holds the lease). Writes are guarded by it and by ``version`` either way.
    """

    id: int
    user_id: str
    active_token_id: str
    active_token_enc: str
    refresh_token_enc: str | None
    active_expires_at: datetime
    active_issued_at: datetime | None
    refresh_expires_at: datetime | None
    failures: int
    uncertain: bool
    version: int
    claim_token: str | None
    verified_at: datetime | None
    #: Pangea's id of the session as we know it (learned from Pangea's session list; see learn_session_ids).
    pangea_session_id: str | None = None
    bucket: int = 0
    #: NULL: on its group's schedule; else its own due time (and then every decision about it is written).
    next_check_at: datetime | None = None

    @classmethod
    def from_rows(cls, result: sa.Result[Any]) -> list[ClaimedSession]:
        """From the rows of a statement on :data:`CLAIM_COLUMNS` (or a page's, :func:`_page_columns`).

        Built positionally through the slots (:mod:`worker.frozen`): a page of a thousand rows is the
        sweep's dearest Python after the session list's, and a keyword call per row cost more than
        the driver's fetch. The columns' names are checked against the fields once per result.
        """
        if tuple(result.keys()) != _CLAIMED_FIELDS:
            raise AssertionError(f"columns {tuple(result.keys())} are not ClaimedSession's fields")
        make = _make_claimed
        return [make(*row) for row in result.all()]  # all(): one fetch, not one per row


_make_claimed = frozen.positional(ClaimedSession)
_CLAIMED_FIELDS = frozen.field_names(ClaimedSession)

CLAIM_COLUMNS = (
    S.id,
    S.user_id,
    S.active_token_id,
    S.active_token_enc,
    S.refresh_token_enc,
    S.active_expires_at,
    S.active_issued_at,
    S.refresh_expires_at,
    S.failures,
    S.uncertain,
    S.version,
    S.claim_token,
    verification.vouched_at().label("verified_at"),
    S.pangea_session_id,
    S.bucket,
    S.next_check_at,
)


def _page_columns(group_verified_at: datetime | None) -> tuple[Any, ...]:
    """:data:`CLAIM_COLUMNS` for a group's page: every session after the cursor was last vouched for
    by the group's last round (``group_verified_at``) at the latest, so that is folded in by the
    statement; its own record counts when it is later."""
    own: sa.ColumnElement[datetime] = sa.func.coalesce(S.last_checked_at, S.created_at)
    if group_verified_at is not None:
        group = sa.literal(group_verified_at, models.UtcDateTime())
        own = sa.case((own < group, group), else_=own)
    verified = sa.type_coerce(own, models.UtcDateTime()).label("verified_at")
    return (*CLAIM_COLUMNS[:12], verified, *CLAIM_COLUMNS[13:])


def claim_due_sessions(
    db: orm.Session,
    *,
    now: datetime,
    limit: int,
    lease: timedelta,
    claim_token: str,
    due_by: datetime | None = None,
) -> list[ClaimedSession]:
    """Lease up to ``limit`` sessions whose own due time is by ``due_by`` (default: ``now``), oldest first.

    Only sessions with a need of their own have a due time (refreshes, backoffs, uncertain refreshes,
    logins not checked yet): they are few, so each is claimed by its row. PostgreSQL: ``FOR UPDATE
    SKIP LOCKED`` in a CTE, so concurrent claimers take disjoint rows without waiting (see
    :func:`worker.db.picked` for why a CTE). SQLite drops ``FOR UPDATE``; there the conditional UPDATE
    itself is the claim, atomic because SQLite runs one writer at a time.
    """
    due = sa.and_(models.on_own_schedule(), S.next_check_at <= (due_by or now), leases.free(S, now))
    pick = sa.select(S.id).where(due).order_by(S.next_check_at).limit(limit)
    stmt = (
        sa.update(S)
        .where(dbmod.picked(db, S.id, pick), due)
        .values(**leases.taken(claim_token, now=now, lease=lease))
        .returning(*CLAIM_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    return ClaimedSession.from_rows(db.execute(stmt))


def read_sessions(
    db: orm.Session,
    *,
    now: datetime,
    limit: int,
    after_id: int = 0,
    user_id: str | None = None,
    session_ids: Sequence[int] | None = None,
) -> list[ClaimedSession]:
    """Active sessions of a manual resync (one user's, or these ids), by id after ``after_id``; no lease taken.

    A resync writes only what its checks change, like a group's round. Sessions under a live lease
    or refresh hold are left to their holder (its refresh may be in flight).
    """
    where = [models.session_is_active(), leases.free(S, now), S.id > after_id]
    if user_id is not None:
        where.append(S.user_id == user_id)
    if session_ids is not None:
        where.append(S.id.in_(session_ids))
    stmt = sa.select(*CLAIM_COLUMNS).where(*where).order_by(S.id).limit(limit)
    return ClaimedSession.from_rows(db.execute(stmt))


# --- check groups ---------------------------------------------------------------------------------

G = models.CheckGroup


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupRound:
    """A check group this worker holds the lease of, and where its round stands."""

    id: int
    lo: int
    hi: int
    claim_token: str
    round_started_at: datetime
    #: When the round was due: a session vouched for since then was checked for this round already.
    due_at: datetime
    cursor: tuple[int, int]
    verified_at: datetime | None


def in_group() -> sa.ColumnElement[bool]:
    """A session belongs to a check group: ``check_groups.lo <= sessions.bucket < check_groups.hi``."""
    return sa.and_(G.lo <= S.bucket, S.bucket < G.hi)


def _group_due(now: datetime, due_by: datetime) -> sa.ColumnElement[bool]:
    """A group's round can be taken: its lease is free, and it is due or a lapsed lease left it half done."""
    return sa.and_(leases.free(G, now), sa.or_(G.next_check_at <= due_by, G.cursor_id.is_not(None)))


def take_group(
    db: orm.Session, *, now: datetime, lease: timedelta, interval: timedelta, claim_token: str, due_by: datetime
) -> GroupRound | None:
    """Lease one group whose round is due by ``due_by`` (see :func:`take_groups`)."""
    taken = take_groups(db, now=now, lease=lease, interval=interval, claim_token=claim_token, due_by=due_by)
    return taken[0] if taken else None


def take_groups(
    db: orm.Session,
    *,
    now: datetime,
    lease: timedelta,
    interval: timedelta,
    claim_token: str,
    due_by: datetime,
    sessions: int = 0,
) -> list[GroupRound]:
    """Lease due groups together until their last rounds held ``sessions`` sessions (at least one group).

    Due: the round is due by ``due_by``, or a lapsed lease left it half done (those come first). A new
    round starts at ``now`` with its cursor before the first session and plans the next round one
    ``interval`` on; a round in progress resumes at its cursor (a dead worker's pages are not done
    twice). Small groups are taken together so a batch still weighs up to a batch's worth of sessions
    (the mass-revocation guard judges a batch). The candidates are read first, then leased by one
    conditional UPDATE: a group another worker took meanwhile is simply not returned, and when it
    took every group chosen, the next due ones are chosen (empty only when none is left due).
    """
    due = _group_due(now, due_by)
    if db.get_bind().dialect.name == "sqlite":
        # Take SQLite's write lock before reading (a write statement takes it, even one that matches
        # no row): a deferred transaction that read first could not write after another process did.
        db.execute(sa.update(G).where(sa.false()).values(sessions=G.sessions))
    # Each attempt that takes nothing saw its chosen groups leased by others (PostgreSQL, READ
    # COMMITTED: each statement reads what was committed before it), so fewer are due at the next.
    for _ in range(models.DEFAULT_GROUPS):
        chosen = _choose_groups(db, due, sessions)
        if not chosen:
            return []
        fresh = G.cursor_id.is_(None)
        stmt = (
            sa.update(G)
            .where(G.id.in_(chosen), due)
            .values(
                **leases.taken(claim_token, now=now, lease=lease),
                round_started_at=sa.case((fresh, sa.literal(now, models.UtcDateTime())), else_=G.round_started_at),
                round_due_at=sa.case((fresh, G.next_check_at), else_=G.round_due_at),
                next_check_at=sa.case((fresh, sa.literal(now + interval, models.UtcDateTime())), else_=G.next_check_at),
                cursor_bucket=sa.func.coalesce(G.cursor_bucket, -1),
                cursor_id=sa.func.coalesce(G.cursor_id, 0),
            )
            .returning(
                G.id, G.lo, G.hi, G.round_started_at, G.round_due_at, G.cursor_bucket, G.cursor_id, G.verified_at
            )
            .execution_options(synchronize_session=False)
        )
        taken = [
            GroupRound(
                id=row.id,
                lo=row.lo,
                hi=row.hi,
                claim_token=claim_token,
                round_started_at=row.round_started_at,
                due_at=row.round_due_at,
                cursor=(row.cursor_bucket, row.cursor_id),
                verified_at=row.verified_at,
            )
            for row in db.execute(stmt)
        ]
        if taken:
            return sorted(taken, key=lambda g: g.id)
    return []


def _choose_groups(db: orm.Session, due: sa.ColumnElement[bool], sessions: int) -> list[int]:
    """The due groups to take next, in order, until their sizes reach ``sessions`` (at least one)."""
    candidates = db.execute(
        sa.select(G.id, G.sessions, G.verified_at, G.lo, G.hi)
        .where(due)
        .order_by(sa.case((G.cursor_id.is_not(None), 0), else_=1), G.next_check_at, G.id)
        .limit(models.DEFAULT_GROUPS * 2)
    ).all()
    chosen: list[int] = []
    weight = 0
    for group_id, known, verified, lo, hi in candidates:
        if chosen and weight >= sessions:
            break  # full: any group more would weigh at least one session too many
        size = int(known or 0)
        if verified is None and not size and sessions > 1:
            # A group never gone round has no size yet (its first round records it): count its
            # sessions by the bucket index, only as far as it takes to tell whether it fits.
            size = _count_up_to(db, lo, hi, sessions - weight + 1)
        if chosen and weight + max(size, 1) > sessions:
            break
        chosen.append(int(group_id))
        weight += max(size, 1)
    return chosen


def _count_up_to(db: orm.Session, lo: int, hi: int, cap: int) -> int:
    """How many sessions of buckets ``lo..hi`` are on their group's schedule, counting no further than ``cap``."""
    some = (
        sa.select(S.id)
        .where(models.session_is_active(), S.next_check_at.is_(None), S.bucket >= lo, S.bucket < hi)
        .limit(cap)
        .subquery()
    )
    return int(db.execute(sa.select(sa.func.count()).select_from(some)).scalar_one())


def group_page(
    db: orm.Session, *, group: GroupRound, cursor: tuple[int, int], limit: int, now: datetime
) -> list[ClaimedSession]:
    """The next ``limit`` sessions of ``group``'s round after ``cursor``, by ``(bucket, id)``; nothing written.

    Only sessions on the group's schedule (those with a due time of their own are checked by it),
    and only those Pangea has not vouched for since the round was due: a session whose own check
    (a login's first, a refresh, a resync's) put it back on its group since then was checked for
    this round already.
    """
    stmt = (
        sa.select(*_page_columns(group.verified_at))
        .where(
            models.session_is_active(),
            S.next_check_at.is_(None),
            S.bucket >= group.lo,
            S.bucket < group.hi,
            sa.tuple_(S.bucket, S.id) > sa.tuple_(sa.literal(cursor[0]), sa.literal(cursor[1])),
            sa.func.coalesce(S.last_checked_at, S.created_at) < group.due_at,
            leases.free(S, now),
        )
        .order_by(S.bucket, S.id)
        .limit(limit)
    )
    # On the session's Core connection: the rows are plain tuples, with no ORM loading to pass through.
    return ClaimedSession.from_rows(db.connection().execute(stmt))


def advance_group(
    db: orm.Session, group: GroupRound, *, cursor: tuple[int, int], now: datetime, lease: timedelta
) -> bool:
    """Record a page done (the cursor) and renew the lease; False when the lease is no longer ours."""
    stmt = (
        sa.update(G)
        .where(G.id == group.id, leases.held_by(G, group.claim_token))
        .values(cursor_bucket=cursor[0], cursor_id=cursor[1], claimed_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    return dbmod.rowcount(db.execute(stmt)) == 1


def finish_group(db: orm.Session, *, group: GroupRound, sessions: int) -> bool:
    """End the round: the group is verified as of the round's start, and its lease given back."""
    stmt = (
        sa.update(G)
        .where(G.id == group.id, leases.held_by(G, group.claim_token))
        .values(
            verified_at=G.round_started_at,
            cursor_bucket=None,
            cursor_id=None,
            **leases.given_back(),
            sessions=sessions,
        )
        .execution_options(synchronize_session=False)
    )
    return dbmod.rowcount(db.execute(stmt)) == 1


def release_groups(db: orm.Session, groups: Sequence[GroupRound]) -> None:
    """Give the groups' leases back, cursors kept: another worker resumes their rounds at once."""
    if not groups:
        return
    db.execute(
        sa.update(G)
        .where(G.id.in_([g.id for g in groups]), leases.held_by(G, groups[0].claim_token))
        .values(**leases.given_back())
        .execution_options(synchronize_session=False)
    )


# --- what is due ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DueWork:
    """What a sweep would find to do now: groups whose round is due, and sessions with their own due time."""

    groups: int
    sessions: int
    #: Sessions in the due groups, as their last rounds counted them (an estimate).
    group_sessions: int


def due_work(db: orm.Session, *, now: datetime) -> DueWork:
    """How many groups and own-schedule sessions are due and not leased right now (two small scans)."""
    groups, in_groups = db.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(G.sessions), 0)).where(_group_due(now, now))
    ).one()
    sessions = db.execute(
        sa.select(sa.func.count()).where(models.on_own_schedule(), S.next_check_at <= now, leases.free(S, now))
    ).scalar_one()
    return DueWork(groups=int(groups), sessions=int(sessions), group_sessions=int(in_groups))


def count_due(db: orm.Session, *, now: datetime) -> int:
    """How many active sessions are due and not leased right now: their own due time, or their group's round."""
    due = due_work(db, now=now)
    in_due_groups = db.execute(
        sa.select(sa.func.count())
        .select_from(S)
        .join(G, in_group())
        .where(models.session_is_active(), S.next_check_at.is_(None), _group_due(now, now))
    ).scalar_one()
    return due.sessions + int(in_due_groups)


def make_due(
    db: orm.Session, *, now: datetime, user_id: str | None = None, session_ids: Sequence[int] | None = None
) -> int:
    """Make sessions due now; returns how many rows were written.

    With no arguments (``resync --all``): every group's round (one row per group) and every session
    with a due time of its own. With a user or ids: those sessions get a due time of their own, now.
    """
    if user_id is None and session_ids is None:
        groups = db.execute(sa.update(G).values(next_check_at=now).execution_options(synchronize_session=False))
        own = db.execute(
            sa.update(S)
            .where(models.on_own_schedule(), S.next_check_at > now)
            .values(next_check_at=now)
            .execution_options(synchronize_session=False)
        )
        return dbmod.rowcount(groups) + dbmod.rowcount(own)
    where = [models.session_is_active()]
    if user_id is not None:
        where.append(S.user_id == user_id)
    if session_ids is not None:
        where.append(S.id.in_(session_ids))
    stmt = sa.update(S).where(*where).values(next_check_at=now).execution_options(synchronize_session=False)
    return dbmod.rowcount(db.execute(stmt))


def mark_refreshing(db: orm.Session, sessions: Sequence[ClaimedSession], *, until: datetime) -> set[int]:
    """Give sessions about to be refreshed a due time of their own (``until``: when their hold would lapse).

    A session refreshed from a group's round or a resync leaves the group's schedule before its
    refresh is sent: were the worker to die first, the session is due again on its own, not vouched
    for by its group. Guarded like every write; returns the ids marked. Refreshes are rare.
    """
    marked: set[int] = set()
    for session in sessions:
        stmt = (
            sa.update(S)
            .where(*_as_claimed(session))
            .values(next_check_at=until)
            .returning(S.id)
            .execution_options(synchronize_session=False)
        )
        marked.update(int(i) for i in db.execute(stmt).scalars())
    return marked


def _as_claimed(session: ClaimedSession) -> list[sa.ColumnElement[bool]]:
    """The row is still as ``session`` was claimed: same version, same lease, active (see :func:`_guard`)."""
    return [
        S.id == session.id,
        S.version == session.version,
        leases.held_as(S, session.claim_token),
        models.session_is_active(),
    ]


def _guard() -> list[sa.ColumnElement[bool]]:
    """:func:`_as_claimed` with bind parameters, for the statements run once per row."""
    return [
        _T.c.id == sa.bindparam("b_id"),
        leases.held_as(_T.c, sa.bindparam("b_claim", type_=sa.String())),
        _T.c.version == sa.bindparam("b_version"),
        _T.c.state == sa.literal_column("'active'"),
    ]


def record_checks(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> set[int]:
    """Write kept sessions' new facts and release their leases; returns the ids actually written.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``next_check_at``, ``failures``, ``uncertain``,
    ``active_expires_at`` (None keeps the stored one), ``checked`` (whether Pangea answered).
    A row whose lease or version moved on is not written, and its id is not returned: the caller
    reports only what was applied. PostgreSQL: one statement for the batch.
    """
    params = [
        row | {"b_now": now, "b_checked_at": now if row.pop("checked") else None} for row in (dict(r) for r in rows)
    ]
    if not params:
        return set()
    if db.get_bind().dialect.name == "postgresql":
        result = db.execute(_RECORD_CHECKS_PG, _columns(params, _RECORD_CHECKS_KEYS) | {"b_now": now})
        return {int(i) for i in result.scalars()}
    stmt = (
        sa.update(_T)
        .where(*_guard())
        .values(
            next_check_at=sa.bindparam("next_check_at"),
            failures=sa.bindparam("failures"),
            uncertain=sa.bindparam("uncertain"),
            active_expires_at=sa.func.coalesce(
                sa.bindparam("active_expires_at", type_=models.UtcDateTime()), _T.c.active_expires_at
            ),
            last_checked_at=sa.func.coalesce(
                sa.bindparam("b_checked_at", type_=models.UtcDateTime()), _T.c.last_checked_at
            ),
            updated_at=sa.bindparam("b_now"),
            **leases.given_back(),
            version=_T.c.version + 1,
        )
    )
    return _applied(db, stmt, params)


def _applied(db: orm.Session, stmt: sa.Update, params: Sequence[dict[str, Any]]) -> set[int]:
    """Run a guarded UPDATE once per row (SQLite: no RETURNING with executemany); the ids it changed."""
    returning = stmt.returning(_T.c.id)
    applied: set[int] = set()
    for row in params:
        applied.update(int(i) for i in db.execute(returning, row).scalars())
    return applied


#: PostgreSQL: :func:`record_checks` as one statement over arrays (``unnest``), not one UPDATE per row.
#: The server plans and runs it once for the whole batch; keep it in step with the portable form above.
_RECORD_CHECKS_PG = sa.text(
    """
    UPDATE sessions SET
        next_check_at = v.next_check_at,
        failures = v.failures,
        uncertain = v.uncertain,
        active_expires_at = coalesce(v.active_expires_at, sessions.active_expires_at),
        last_checked_at = coalesce(v.checked_at, sessions.last_checked_at),
        updated_at = :b_now,
        claimed_until = NULL,
        claim_token = NULL,
        version = sessions.version + 1
    FROM unnest(
        CAST(:b_id AS bigint[]), CAST(:b_claim AS text[]), CAST(:b_version AS integer[]),
        CAST(:next_check_at AS timestamptz[]), CAST(:failures AS integer[]), CAST(:uncertain AS boolean[]),
        CAST(:active_expires_at AS timestamptz[]), CAST(:b_checked_at AS timestamptz[])
    ) AS v(id, claim, version, next_check_at, failures, uncertain, active_expires_at, checked_at)
    WHERE sessions.id = v.id AND sessions.claim_token IS NOT DISTINCT FROM v.claim AND sessions.version = v.version
      AND sessions.state = 'active'
    RETURNING sessions.id
    """
)
_RECORD_CHECKS_KEYS = (
    "b_id",
    "b_claim",
    "b_version",
    "next_check_at",
    "failures",
    "uncertain",
    "active_expires_at",
    "b_checked_at",
)


def _columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[Any]]:
    """Rows of parameters turned into one list per key (arrays for ``unnest``)."""
    return {key: [row[key] for row in rows] for key in keys}


def revoke(db: orm.Session, rows: Iterable[dict[str, Any]], *, now: datetime) -> set[int]:
    """End claimed sessions as ``revoked`` with their reason; returns the ids actually revoked.

    Each row: ``b_id``, ``b_claim``, ``b_version``, ``reason``. Revocations are rare, so each row
    is its own statement: a row whose lease or version moved on is left alone and not returned.
    """
    params = [dict(r) | {"b_now": now} for r in rows]
    if not params:
        return set()
    stmt = (
        sa.update(_T)
        .where(*_guard())
        .values(
            **models.ending(models.SessionState.REVOKED, reason=sa.bindparam("reason"), at=sa.bindparam("b_now")),
            last_checked_at=sa.bindparam("b_now"),
        )
    )
    return _applied(db, stmt, params)


def release(db: orm.Session, *, claim_token: str) -> int:
    """Give back every lease held under ``claim_token`` without changing anything else."""
    return leases.release(db, S, claim_token=claim_token)


def begin_refresh(
    db: orm.Session, session: ClaimedSession, *, now: datetime, lease: timedelta, hold_token: str
) -> int | None:
    """Take the refresh hold on one claimed session by compare-and-swap; returns the new version.

    Called just before the refresh request goes out (never earlier: time spent queueing for the
    concurrency bound or the rate limit must not eat into the hold). The hold has its own token, so
    giving back the batch's claim (:func:`release`) never frees a row whose refresh is in flight. The
    row is marked ``uncertain`` *before* Pangea is called, so a worker that dies mid-refresh leaves a
    trace: the next one settles it before any refresh token goes out again. None when the row moved
    on since the claim (the app logged it out, another worker's claim took over).
    """
    stmt = (
        sa.update(S)
        .where(*_as_claimed(session))
        .values(
            uncertain=True,
            **leases.taken(hold_token, now=now, lease=lease),
            # Off the group's schedule while in flight: if this worker dies, the row is due on its own.
            next_check_at=now + lease,
            version=S.version + 1,
            updated_at=now,
        )
        .returning(S.version)
        .execution_options(synchronize_session=False)
    )
    version = db.execute(stmt).scalar()
    return None if version is None else int(version)


#: The columns :func:`store_refreshed` writes from a refresh's answer.
_REFRESHED_COLUMNS = (
    "active_token_id",
    "active_token_enc",
    "active_token_hash",
    "refresh_token_enc",
    "active_expires_at",
    "active_issued_at",
    "refresh_expires_at",
    "next_check_at",
)


def store_refreshed(db: orm.Session, row: dict[str, Any], *, now: datetime) -> bool:
    """Write one refresh's rotated tokens and release its hold; False when the session ended meanwhile.

    ``row``: ``b_id``, ``b_old_active_token_id`` and the columns of :data:`_REFRESHED_COLUMNS`.
    Guarded by the active token the refresh replaced, not by the hold: new tokens that reached us
    are the freshest fact there is, so they are stored even if the hold lapsed and another worker
    took the row meanwhile (that worker settles the row before presenting the refresh token, sees
    Pangea's new active token, and its own write loses the version race). Only an ended session, or
    one whose tokens someone else already replaced, is left alone.
    """
    stmt = (
        sa.update(_T)
        .where(
            _T.c.id == sa.bindparam("b_id"),
            _T.c.active_token_id == sa.bindparam("b_old_active_token_id"),
            _T.c.state == sa.literal_column("'active'"),
        )
        .values(
            **{c: sa.bindparam(c) for c in _REFRESHED_COLUMNS},
            # The replaced token keeps authenticating for a grace period (worker.sessions); SET
            # expressions read the row as it was, so this is the old active token's hash.
            previous_token_hash=_T.c.active_token_hash,
            rotated_at=sa.bindparam("b_now"),
            failures=0,
            uncertain=False,
            last_checked_at=sa.bindparam("b_now"),
            updated_at=sa.bindparam("b_now"),
            **leases.given_back(),
            version=_T.c.version + 1,
        )
    )
    return bool(_applied(db, stmt, [dict(row) | {"b_now": now}]))


def ended_session(db: orm.Session, session_id: int) -> tuple[str, str] | None:
    """``(user_id, state)`` of a session that is no longer active; None while it is active (or gone)."""
    row = db.execute(sa.select(S.user_id, S.state).where(S.id == session_id)).one_or_none()
    if row is None or row.state is models.SessionState.ACTIVE:
        return None
    return row.user_id, str(row.state)


def learn_session_ids(db: orm.Session, learned: dict[int, str]) -> int:
    """Store the session ids Pangea's session list gave for these local sessions; returns how many changed.

    The id written at login (the refresh token's) is a guess; the list's ``id`` is Pangea's word.
    Rare (once per session at most, and never where the guess was right), so one statement per row;
    an id that another local row already holds is left alone rather than failing the batch.
    """
    changed = 0
    for session_id, pangea_id in learned.items():
        taken = sa.select(S.id).where(S.pangea_session_id == pangea_id, S.id != session_id).exists()
        stmt = (
            sa.update(S)
            .where(S.id == session_id, sa.not_(taken))
            .values(pangea_session_id=pangea_id)
            .execution_options(synchronize_session=False)
        )
        changed += dbmod.rowcount(db.execute(stmt))
    return changed


def drop_refresh_tokens(db: orm.Session, ids: Sequence[int]) -> None:
    """Forget refresh tokens known to be spent, so they are never tried again."""
    if ids:
        db.execute(
            sa.update(S)
            .where(S.id.in_(ids))
            .values(refresh_token_enc=None)
            .execution_options(synchronize_session=False)
        )
