"""SQLAlchemy 2 typed models: local sessions and the logout outbox (the database contract).

Apps in other languages read and write these two tables directly, so the columns below are a
contract; Alembic revisions in ``migrations/versions`` are its history. All times are UTC. On
PostgreSQL they are ``timestamptz``; on SQLite, text ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC.

``sessions``: one row per local session, written at login, kept true to Pangea by the worker.

- ``state``: ``active`` | ``logged_out`` (ended by the app or user) | ``revoked`` (Pangea no
  longer recognizes it, or it expired and could not be refreshed). Ended rows keep
  ``end_reason`` and ``ended_at``; active rows have neither (CHECK ``ck_sessions_ended``).
- ``active_token_hash``: lowercase hex HMAC-SHA256 of the active token, keyed with
  HKDF-SHA256(ikm = the first Fernet key's 32 decoded bytes, no salt, info =
  ``b"session-sync token lookup v1"``, 32 bytes). Look a token up with
  ``WHERE active_token_hash IN (<one hash per configured key>) AND state = 'active'
  AND active_expires_at > now``; tokens themselves are never stored in clear.
- ``handle_hash``: the same keyed hash of the opaque local handle (``lss_`` + 32 base32 characters)
  issued at login for cookie sessions. ``previous_token_hash`` / ``rotated_at``: the active token a
  worker refresh replaced, still accepted until ``rotated_at`` + the grace period (README
  "Database contract").
- ``active_token_enc`` / ``refresh_token_enc``: Fernet ciphertext (``SESSION_SYNC_ENCRYPTION_KEYS``).
- ``active_token_id`` / ``pangea_session_id``: Pangea's ``pmt_`` ids of the active token and of the
  session (its refresh token); ``pangea_session_id`` is unique so a push can revoke by id.
- ``bucket``: 0..1023, drawn at random when the row is inserted (the column's default); it places the
  session in the ``check_groups`` row whose ``lo <= bucket < hi``.
- ``next_check_at``: NULL while the session is on its group's schedule (the routine case: the group's
  round checks it and writes nothing unless something changed); a time when the session has a need
  of its own (a refresh ahead of expiry, a backoff after a failure, an uncertain refresh, a login not
  yet checked): ``ix_sessions_next_check_at``, partial ``WHERE state = 'active' AND next_check_at IS
  NOT NULL``, serves that due scan. ``claimed_until`` / ``claim_token`` are a worker's lease on such a
  row (or a refresh's hold); ``version`` is bumped by every write (optimistic concurrency: write
  ``... SET version = version + 1 WHERE id = :id AND version = :read_version``), which other
  writers must do too. ``uncertain`` marks a refresh whose answer was lost.
- ``last_checked_at``: when a write of this row last recorded Pangea's word on it. Rows on their
  group's schedule are not written by a routine check, so *when Pangea last vouched* is derived:
  the later of ``coalesce(last_checked_at, created_at)`` and the group's verification time
  (``worker.verification``; README "Database contract").
- To log a session out from another language, in one transaction: set ``state = 'logged_out'``,
  ``end_reason``, ``ended_at``, ``version = version + 1``, and insert a ``logout_outbox`` row.

``logout_outbox``: logouts owed to Pangea, delivered at least once by the worker.

- ``kind``: ``session`` (``/v2/client/session/logout`` with the encrypted active token in
  ``token_enc``, which a pending session logout must have) | ``user`` (``/v2/session/logout`` for
  ``user_id``). ``token_enc`` is erased once delivered.
- ``state``: ``pending`` | ``delivered`` (``delivered_at`` set) | ``dead`` (``dead_at`` set: gave up
  after too many attempts or too long; visible to operators, replayable).
- ``next_attempt_at``: when a pending event is due (``ix_logout_outbox_next_attempt_at``, partial
  ``WHERE state = 'pending'``). ``last_error`` never contains a token. ``retried_at``: when an
  operator last put a dead letter back to pending (the age limit counts from it, else from
  ``created_at``).
"""

from __future__ import annotations

import enum
import random
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapped, mapped_column

from worker import leases

#: Constraint and index names, stable across dialects and across autogenerate runs.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Width of the columns holding Pangea ids (``pui_`` / ``pmt_`` + 32 base32 characters today).
PANGEA_ID_LENGTH = 64
#: The largest row id (BIGINT on PostgreSQL, INTEGER on SQLite: 64-bit signed on both).
MAX_ROW_ID = 2**63 - 1


def is_row_id(value: object) -> bool:
    """Whether ``value`` can be a row id at all (an int, not a bool, in 1..MAX_ROW_ID): if not, no row has it."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ROW_ID


def fits_id_column(value: object) -> bool:
    """Whether ``value`` can be bound to a Pangea id column: if not, no row has it and the driver would raise.

    PostgreSQL refuses NUL in text, drivers refuse strings that are not valid UTF-8 (lone surrogates).
    """
    if not isinstance(value, str) or len(value) > PANGEA_ID_LENGTH or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_E = TypeVar("_E", bound=enum.StrEnum)

#: Sessions are spread over this many buckets at random; check groups are ranges of buckets.
BUCKETS = 1024
#: The partial index predicate of sessions with a due time of their own.
OWN_SCHEDULE = "state = 'active' AND next_check_at IS NOT NULL"


class SessionState(enum.StrEnum):
    """Life cycle of a local session."""

    ACTIVE = "active"
    LOGGED_OUT = "logged_out"
    REVOKED = "revoked"


class OutboxKind(enum.StrEnum):
    """Which Pangea logout an outbox event delivers."""

    SESSION = "session"  # /v2/client/session/logout with the session's active token
    USER = "user"  # /v2/session/logout with the user id


class OutboxState(enum.StrEnum):
    """Life cycle of a logout outbox event."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        tz = value.tzinfo
        if tz is UTC:  # PostgreSQL on our engine's connections (worker.db: TimeZone=UTC): as it is
            return value
        if tz is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class StrEnumText(sa.TypeDecorator[_E], Generic[_E]):
    """A ``StrEnum`` stored as its short string value (the table's CHECK lists the values)."""

    impl = sa.String(16)
    cache_ok = True

    def __init__(self, enum_class: type[_E]) -> None:
        super().__init__()
        self.enum_class = enum_class

    def process_bind_param(self, value: _E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_class(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> _E | None:
        return None if value is None else self.enum_class(value)


class random_bucket(sa.sql.functions.FunctionElement[int]):
    """``sessions.bucket``'s server default: a random bucket, so rows other languages insert get one too."""

    type = sa.SmallInteger()
    inherit_cache = True


@compiles(random_bucket, "postgresql")
def _random_bucket_pg(element: random_bucket, compiler: Any, **kw: Any) -> str:
    return f"(floor(random() * {BUCKETS}))::smallint"


@compiles(random_bucket)
def _random_bucket_sqlite(element: random_bucket, compiler: Any, **kw: Any) -> str:
    return f"(abs(random()) % {BUCKETS})"


def _in(column: str, enum_class: type[enum.StrEnum]) -> str:
    """SQL text ``column IN ('a', 'b')`` for a CHECK constraint, from the enum's values."""
    values = ", ".join(f"'{member.value}'" for member in enum_class)
    return f"{column} IN ({values})"


def _id_type() -> sa.types.TypeEngine[int]:
    # BIGSERIAL on PostgreSQL; SQLite only auto-assigns ids to INTEGER PRIMARY KEY.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Base(orm.DeclarativeBase):
    """Declarative base with the naming convention and UTC datetimes."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime()}


class LocalSession(Base):
    """A web app's local session for one Pangea login (table ``sessions``)."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(_id_type(), primary_key=True)
    user_id: Mapped[str] = mapped_column(sa.String(PANGEA_ID_LENGTH), index=True)
    email: Mapped[str] = mapped_column(sa.String(320))
    pangea_session_id: Mapped[str | None] = mapped_column(sa.String(PANGEA_ID_LENGTH), unique=True, index=True)
    active_token_id: Mapped[str] = mapped_column(sa.String(PANGEA_ID_LENGTH), index=True)
    active_token_enc: Mapped[str] = mapped_column(sa.Text())
    refresh_token_enc: Mapped[str | None] = mapped_column(sa.Text())
    active_token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True, index=True)
    #: Keyed hash of the opaque local handle (``lss_...``) a browser keeps in a cookie; NULL: none issued.
    handle_hash: Mapped[str | None] = mapped_column(sa.String(64), unique=True, index=True)
    #: Keyed hash of the active token the worker's last refresh replaced, and when it did: that token
    #: keeps authenticating for the app's grace period (``SESSION_SYNC_REFRESH_GRACE``) after ``rotated_at``.
    previous_token_hash: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    rotated_at: Mapped[datetime | None]
    active_expires_at: Mapped[datetime]
    #: When Pangea minted the active token: with the expiry, its lifetime (refresh margin).
    active_issued_at: Mapped[datetime | None]
    refresh_expires_at: Mapped[datetime | None]
    state: Mapped[SessionState] = mapped_column(
        StrEnumText(SessionState), default=SessionState.ACTIVE, server_default=SessionState.ACTIVE.value
    )
    end_reason: Mapped[str | None] = mapped_column(sa.String(64))
    ended_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, server_default=sa.func.now())
    last_checked_at: Mapped[datetime | None]
    #: NULL: on its group's schedule; else when this session's own need (refresh, backoff, ...) is due.
    next_check_at: Mapped[datetime | None] = mapped_column(default=utcnow, server_default=sa.func.now())
    #: Which check group the session belongs to (``check_groups.lo <= bucket < hi``); random at insert.
    bucket: Mapped[int] = mapped_column(
        sa.SmallInteger(), default=lambda: random.randrange(BUCKETS), server_default=random_bucket()
    )
    claimed_until: Mapped[datetime | None]
    claim_token: Mapped[str | None] = mapped_column(sa.String(64))
    failures: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    uncertain: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    version: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))

    __table_args__ = (
        sa.CheckConstraint(_in("state", SessionState), name="state"),
        sa.CheckConstraint(
            "(state = 'active' AND end_reason IS NULL AND ended_at IS NULL)"
            " OR (state <> 'active' AND end_reason IS NOT NULL AND ended_at IS NOT NULL)",
            name="ended",
        ),
        # The due scan of sessions with needs of their own: next_check_at <= :now ORDER BY next_check_at.
        sa.Index(
            None,
            "next_check_at",
            postgresql_where=sa.text(OWN_SCHEDULE),
            sqlite_where=sa.text(OWN_SCHEDULE),
        ),
        # A group's round: its active sessions by key range, (bucket, id) after the round's cursor.
        sa.Index(
            None,
            "bucket",
            "id",
            postgresql_where=sa.text("state = 'active'"),
            sqlite_where=sa.text("state = 'active'"),
        ),
        sa.CheckConstraint(f"bucket >= 0 AND bucket < {BUCKETS}", name="bucket"),
        {"sqlite_autoincrement": True},  # never reuse an id: tasks and outbox rows refer to them
    )

    def __repr__(self) -> str:
        return f"LocalSession(id={self.id!r}, user_id={self.user_id!r}, state={self.state!r})"


class LogoutEvent(Base):
    """A logout owed to Pangea, delivered at least once (table ``logout_outbox``)."""

    __tablename__ = "logout_outbox"

    id: Mapped[int] = mapped_column(_id_type(), primary_key=True)
    kind: Mapped[OutboxKind] = mapped_column(StrEnumText(OutboxKind))
    session_id: Mapped[int | None] = mapped_column(
        _id_type(), sa.ForeignKey(LocalSession.id, ondelete="SET NULL"), index=True
    )
    user_id: Mapped[str] = mapped_column(sa.String(PANGEA_ID_LENGTH))
    token_enc: Mapped[str | None] = mapped_column(sa.Text())
    state: Mapped[OutboxState] = mapped_column(
        StrEnumText(OutboxState), default=OutboxState.PENDING, server_default=OutboxState.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    claimed_until: Mapped[datetime | None]
    claim_token: Mapped[str | None] = mapped_column(sa.String(64))
    last_error: Mapped[str | None] = mapped_column(sa.Text())
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    delivered_at: Mapped[datetime | None]
    dead_at: Mapped[datetime | None]
    #: When an operator last put this dead letter back to pending; the age limit counts from then.
    retried_at: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint(_in("kind", OutboxKind), name="kind"),
        sa.CheckConstraint(_in("state", OutboxState), name="state"),
        sa.CheckConstraint("kind = 'user' OR state <> 'pending' OR token_enc IS NOT NULL", name="token"),
        sa.CheckConstraint(
            "(state <> 'delivered' OR delivered_at IS NOT NULL) AND (state <> 'dead' OR dead_at IS NOT NULL)",
            name="finished",
        ),
        # The due scan: state = 'pending' AND next_attempt_at <= :now ORDER BY next_attempt_at.
        sa.Index(
            None,
            "next_attempt_at",
            postgresql_where=sa.text("state = 'pending'"),
            sqlite_where=sa.text("state = 'pending'"),
        ),
        {"sqlite_autoincrement": True},
    )

    def __repr__(self) -> str:
        return f"LogoutEvent(id={self.id!r}, kind={self.kind!r}, state={self.state!r})"


class SessionEvent(Base):
    """One decision the worker took about a session, for the audit trail (table ``session_events``)."""

    __tablename__ = "session_events"

    id: Mapped[int] = mapped_column(_id_type(), primary_key=True)
    session_id: Mapped[int] = mapped_column(_id_type(), sa.ForeignKey(LocalSession.id, ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(index=True)
    #: kept | failed | refresh | refreshed | revoked | logged_out | login ...
    action: Mapped[str] = mapped_column(sa.String(16))
    #: Pangea's answer (valid | expired | invalid) or why there was none (unavailable, rate_limited ...).
    outcome: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str | None] = mapped_column(sa.String(64))
    request_id: Mapped[str | None] = mapped_column(sa.String(PANGEA_ID_LENGTH))

    __table_args__ = (sa.Index(None, "session_id", "at"),)


class SweepRun(Base):
    """One periodic sweep, recorded once per slot so a duplicate beat is a no-op (table ``sweep_runs``)."""

    __tablename__ = "sweep_runs"

    slot: Mapped[datetime] = mapped_column(primary_key=True)
    #: beat (the periodic task) | once (``session-sync sweep --once``)
    kind: Mapped[str] = mapped_column(sa.String(16))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    due: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    batches: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    checked: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    refreshed: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    revoked: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    failed: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    stopped: Mapped[bool] = mapped_column(default=False, server_default=sa.false())


class CheckGroup(Base):
    """A group of sessions checked together: the schedule and the lease of routine checks (table ``check_groups``).

    Group ``id`` holds the active sessions whose ``bucket`` is in ``[lo, hi)`` and whose
    ``next_check_at`` is NULL. A round takes the group's lease (``claimed_until`` / ``claim_token``),
    sets ``round_started_at`` and plans ``next_check_at`` one check interval on, then goes through
    its sessions by key range, ``(bucket, id)`` after ``(cursor_bucket, cursor_id)``, one page at a
    time; each page writes only the sessions whose facts changed, and moves the cursor (and the
    lease) on. When the last page is done, ``verified_at = round_started_at`` and the cursor is
    cleared. A worker that dies mid-round leaves the cursor: the next one resumes there after the
    lease. So a group costs a few row writes per round, whatever its number of sessions.
    """

    __tablename__ = "check_groups"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    lo: Mapped[int] = mapped_column(sa.SmallInteger())
    hi: Mapped[int] = mapped_column(sa.SmallInteger())
    #: When the next round is due (a resync --all makes it now).
    next_check_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    claimed_until: Mapped[datetime | None]
    claim_token: Mapped[str | None] = mapped_column(sa.String(64))
    #: When the round in progress (cursor set), or the last round, began.
    round_started_at: Mapped[datetime | None]
    #: When that round was due: sessions Pangea vouched for since (on their own, then back on the group)
    #: count as checked in it, so a resync or a sweep never checks one twice.
    round_due_at: Mapped[datetime | None]
    #: The last session done in the round in progress, as ``(bucket, id)``; NULL: no round in progress.
    cursor_bucket: Mapped[int | None] = mapped_column(sa.SmallInteger())
    cursor_id: Mapped[int | None] = mapped_column(_id_type())
    #: When the last completed round began: Pangea vouched, at or after it, for every session that
    #: was on the group's schedule then and has not been written since.
    verified_at: Mapped[datetime | None]
    #: Sessions the last completed round went through (progress and sizing; not a contract).
    sessions: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))

    __table_args__ = (
        sa.CheckConstraint(f"lo >= 0 AND lo < hi AND hi <= {BUCKETS}", name="range"),
        sa.CheckConstraint("(cursor_bucket IS NULL) = (cursor_id IS NULL)", name="cursor"),
    )


#: The check groups a fresh database starts with: 32 equal ranges of buckets.
DEFAULT_GROUPS = 32


def default_groups() -> list[dict[str, int]]:
    """``check_groups`` rows for :data:`DEFAULT_GROUPS` equal ranges covering every bucket."""
    width = BUCKETS // DEFAULT_GROUPS
    return [{"id": g, "lo": g * width, "hi": (g + 1) * width} for g in range(DEFAULT_GROUPS)]


class RevocationGuard(Base):
    """The mass-revocation guard's state (table ``revocation_guard``, at most one row, ``id = 1``).

    While ``tripped_at`` is set no sweep revokes anything: the sessions it would have revoked are
    kept and re-checked, until an operator confirms (``session-sync resync --all --confirm-revocations``).
    """

    __tablename__ = "revocation_guard"

    id: Mapped[int] = mapped_column(primary_key=True)
    tripped_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(sa.Text())
    checked: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    would_revoke: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    cleared_at: Mapped[datetime | None]


def session_is_active() -> sa.ColumnElement[bool]:
    """``sessions.state = 'active'`` with the value inline, as in the due index's WHERE clause.

    A bind parameter would do for correctness, but PostgreSQL's generic plans for prepared
    statements can only use a partial index when the query spells out its predicate.
    """
    return LocalSession.state == sa.literal_column("'active'")


def ending(state: SessionState, *, reason: Any, at: Any) -> dict[str, Any]:
    """The columns that end a session, wherever one ends (a sync revocation, a push, a logout).

    ``state`` (``revoked`` or ``logged_out``) with its ``end_reason`` and ``ended_at``, the lease
    given back, and ``version`` bumped so a worker still holding the row drops its result. ``reason``
    and ``at`` are values or bind parameters (an executemany binds one per row). The SQL functions
    of the database contract (worker.sessions_pg) and the README's recipe write the same columns.
    """
    if state is SessionState.ACTIVE:
        raise ValueError("a session ends as revoked or logged_out, never active")
    return {
        "state": state,
        "end_reason": reason,
        "ended_at": at,
        "updated_at": at,
        **leases.given_back(),
        "version": LocalSession.__table__.c.version + 1,
    }


def on_own_schedule() -> sa.ColumnElement[bool]:
    """The partial index predicate of sessions with a due time of their own (:data:`OWN_SCHEDULE`), inline."""
    return sa.and_(session_is_active(), LocalSession.next_check_at.is_not(None))


def event_is_pending() -> sa.ColumnElement[bool]:
    """``logout_outbox.state = 'pending'`` with the value inline, as in the due index's WHERE clause."""
    return LogoutEvent.state == sa.literal_column("'pending'")


class RateLimitBucket(Base):
    """One shared token bucket of the outbound rate limit (table ``rate_limit_buckets``; worker.ratelimit).

    ``SESSION_SYNC_RATE_LIMIT_STORE=database`` keeps here what Redis keeps otherwise, for a broker
    that is not Redis: one row per Pangea project (``bucket``, a hash that does not carry the token),
    its ``tokens`` (negative: grants already promised to waiting workers) as of ``refilled_at``, in
    seconds since the epoch on the database's own clock, so workers with skewed clocks share one rate.
    """

    __tablename__ = "rate_limit_buckets"

    bucket: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(sa.Double())
    refilled_at: Mapped[float] = mapped_column(sa.Double())
