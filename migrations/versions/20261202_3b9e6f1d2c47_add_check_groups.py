"""Check sessions by groups: routine checks write no session row (``check_groups``, ``sessions.bucket``).

Every session gets a random ``bucket`` (0..1023); ``check_groups`` holds 32 ranges of buckets, each with
its due time, lease, round cursor and verification time. ``sessions.next_check_at`` becomes nullable:
NULL means "on its group's schedule". Existing rows keep their ``next_check_at`` (their own schedule):
each joins its group the first time a check of it changes nothing, so no check planned before the
upgrade is skipped or delayed.

The downgrade writes back what the groups knew: ``last_checked_at`` becomes the derived value (the
group's verification time where it is later) and every session on a group's schedule gets the group's
``next_check_at`` as its own, so no session loses its next check or the record of its last one.

A login whose first need (its refresh) is further off than a check interval goes straight onto its
group's schedule: ``session_sync_record_login`` takes ``p_next_check_at => 'infinity'`` for that
(``worker.sessions`` passes it); NULL still means "check it at the next sweep".
On PostgreSQL, ``session_sync_judge`` (behind ``session_sync_authenticate``) answers the derived
``last_checked_at`` too.

PostgreSQL rewrites ``sessions`` once to fill ``bucket`` (a volatile default), holding an exclusive lock
for the duration: at a million rows, seconds. SQLite rebuilds the table (batch mode).

Revision ID: 3b9e6f1d2c47
Revises: 3b8f0c6d2e41
Create Date: 2026-12-02 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3b9e6f1d2c47"
down_revision: str | Sequence[str] | None = "3b8f0c6d2e41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKETS = 1024
GROUPS = 32
OWN_SCHEDULE = "state = 'active' AND next_check_at IS NOT NULL"

#: When Pangea last vouched for a session on its group's schedule, from the group (frozen copy of
#: worker.verification's rule, as it stood at this revision).
GROUP_VOUCHED = """(
    SELECT CASE
        WHEN g.cursor_id IS NOT NULL AND (sessions.bucket < g.cursor_bucket
            OR (sessions.bucket = g.cursor_bucket AND sessions.id <= g.cursor_id))
        THEN g.round_started_at ELSE g.verified_at END
    FROM check_groups g WHERE g.lo <= sessions.bucket AND sessions.bucket < g.hi
)"""


#: session_sync_judge (README "Database contract") with ``last_checked_at`` derived as above.
JUDGE = r"""
CREATE OR REPLACE FUNCTION session_sync_judge(
    s sessions, p_bearer boolean, p_hashes text[], p_grace interval, p_now timestamptz
) RETURNS session_sync_authentication
LANGUAGE plpgsql STABLE AS $$
DECLARE
    answer session_sync_authentication;
    vouched timestamptz;
BEGIN
    -- Keep in step with worker.sessions.authenticate: the same checks, in the same order.
    IF s.id IS NULL THEN
        answer.reason := 'unknown';
    ELSIF s.state = 'logged_out' THEN
        answer.reason := 'logged_out';
    ELSIF s.state = 'revoked' THEN
        answer.reason := CASE WHEN s.end_reason = 'expired' THEN 'expired' ELSE 'revoked' END;
    ELSIF s.active_expires_at <= p_now THEN
        answer.reason := 'expired';
    ELSIF p_bearer AND NOT (s.active_token_hash = ANY (p_hashes)) THEN
        -- The previous token: good only within the grace period after the worker replaced it.
        IF s.rotated_at IS NULL OR p_now >= s.rotated_at + p_grace THEN
            answer.reason := 'replaced';
        ELSE
            answer.rotated_token_enc := s.active_token_enc;
        END IF;
    END IF;
    IF answer.reason IS NULL THEN
        answer.session_id := s.id;
        answer.user_id := s.user_id;
        answer.email := s.email;
        answer.expires_at := s.active_expires_at;
        answer.created_at := s.created_at;
        answer.last_checked_at := s.last_checked_at;
        -- On its group's schedule, Pangea's last word may be the group's (worker.verification).
        IF s.next_check_at IS NULL THEN
            SELECT CASE
                WHEN g.cursor_id IS NOT NULL AND (s.bucket < g.cursor_bucket
                    OR (s.bucket = g.cursor_bucket AND s.id <= g.cursor_id))
                THEN g.round_started_at ELSE g.verified_at END
            INTO vouched
            FROM check_groups g WHERE g.lo <= s.bucket AND s.bucket < g.hi;
            IF vouched > coalesce(s.last_checked_at, s.created_at) THEN
                answer.last_checked_at := vouched;
            END IF;
        END IF;
        answer.uncertain := s.uncertain;
    END IF;
    RETURN answer;
END
$$;
"""

#: session_sync_judge as revision 7d1c4e2a9b30 made it (the downgrade puts it back).
JUDGE_BEFORE = r"""
CREATE OR REPLACE FUNCTION session_sync_judge(
    s sessions, p_bearer boolean, p_hashes text[], p_grace interval, p_now timestamptz
) RETURNS session_sync_authentication
LANGUAGE plpgsql STABLE AS $$
DECLARE
    answer session_sync_authentication;
BEGIN
    -- Keep in step with worker.sessions.authenticate: the same checks, in the same order.
    IF s.id IS NULL THEN
        answer.reason := 'unknown';
    ELSIF s.state = 'logged_out' THEN
        answer.reason := 'logged_out';
    ELSIF s.state = 'revoked' THEN
        answer.reason := CASE WHEN s.end_reason = 'expired' THEN 'expired' ELSE 'revoked' END;
    ELSIF s.active_expires_at <= p_now THEN
        answer.reason := 'expired';
    ELSIF p_bearer AND NOT (s.active_token_hash = ANY (p_hashes)) THEN
        -- The previous token: good only within the grace period after the worker replaced it.
        IF s.rotated_at IS NULL OR p_now >= s.rotated_at + p_grace THEN
            answer.reason := 'replaced';
        ELSE
            answer.rotated_token_enc := s.active_token_enc;
        END IF;
    END IF;
    IF answer.reason IS NULL THEN
        answer.session_id := s.id;
        answer.user_id := s.user_id;
        answer.email := s.email;
        answer.expires_at := s.active_expires_at;
        answer.created_at := s.created_at;
        answer.last_checked_at := s.last_checked_at;
        answer.uncertain := s.uncertain;
    END IF;
    RETURN answer;
END
$$;
"""


#: session_sync_record_login with ``p_next_check_at => 'infinity'`` meaning "on its group's schedule".
RECORD_LOGIN = r"""
CREATE OR REPLACE FUNCTION session_sync_record_login(
    p_user_id text,               -- result.active_token.identity (pui_...)
    p_email text,                 -- result.active_token.email
    p_pangea_session_id text,     -- result.refresh_token.id: the session id /v2/session/list reports
    p_active_token_id text,       -- result.active_token.id (pmt_...)
    p_active_token_enc text,      -- Fernet ciphertext of result.active_token.token (first key)
    p_active_token_hash text,     -- lookup hash of result.active_token.token (first key)
    p_refresh_token_enc text,     -- Fernet ciphertext of result.refresh_token.token (first key)
    p_active_issued_at timestamptz,   -- result.active_token.created_at
    p_active_expires_at timestamptz,  -- result.active_token.expire
    p_refresh_expires_at timestamptz, -- result.refresh_token.expire
    p_handle_hash text DEFAULT NULL,  -- lookup hash of a new lss_ handle (cookie sessions), or NULL
    p_next_check_at timestamptz DEFAULT NULL,  -- NULL: now; 'infinity': on its group's schedule
    p_now timestamptz DEFAULT NULL
) RETURNS TABLE (session_id bigint, outcome text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := coalesce(p_now, clock_timestamp());
    new_id bigint;
    found_row sessions%ROWTYPE;
BEGIN
    IF p_user_id IS NULL OR p_email IS NULL OR p_pangea_session_id IS NULL OR p_active_token_id IS NULL
       OR p_active_token_enc IS NULL OR p_active_token_hash IS NULL OR p_refresh_token_enc IS NULL
       OR p_active_issued_at IS NULL OR p_active_expires_at IS NULL OR p_refresh_expires_at IS NULL THEN
        RAISE EXCEPTION 'session_sync_record_login: every parameter before p_handle_hash is required (not NULL)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_active_token_hash !~ '^[0-9a-f]{64}$' OR (p_handle_hash IS NOT NULL AND p_handle_hash !~ '^[0-9a-f]{64}$') THEN
        RAISE EXCEPTION 'session_sync_record_login: a lookup hash is 64 lowercase hex digits (HMAC-SHA256)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_user_id !~ '^[!-~]{1,64}$' OR p_pangea_session_id !~ '^[!-~]{1,64}$'
       OR p_active_token_id !~ '^[!-~]{1,64}$' THEN
        RAISE EXCEPTION 'session_sync_record_login: a Pangea id is 1 to 64 printable ASCII characters, no spaces'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(p_email) > 320 OR p_email ~ '[\x01-\x1f\x7f]' THEN
        RAISE EXCEPTION 'session_sync_record_login: p_email is at most 320 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_active_expires_at < p_active_issued_at THEN
        RAISE EXCEPTION 'session_sync_record_login: p_active_expires_at is before p_active_issued_at'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- ON CONFLICT DO NOTHING: a login recorded twice (a retried callback) must not abort the
    -- caller's transaction, as a unique violation would.
    INSERT INTO sessions AS s (
        user_id, email, pangea_session_id, active_token_id, active_token_enc, active_token_hash, handle_hash,
        refresh_token_enc, active_expires_at, active_issued_at, refresh_expires_at, state, next_check_at,
        created_at, updated_at, failures, uncertain, version
    ) VALUES (
        p_user_id, p_email, p_pangea_session_id, p_active_token_id, p_active_token_enc, p_active_token_hash,
        p_handle_hash, p_refresh_token_enc, p_active_expires_at, p_active_issued_at, p_refresh_expires_at, 'active',
        CASE WHEN p_next_check_at IS NULL THEN now_ WHEN p_next_check_at = 'infinity' THEN NULL
            ELSE p_next_check_at END, now_, now_, 0, false, 0
    )
    ON CONFLICT DO NOTHING
    RETURNING s.id INTO new_id;
    IF new_id IS NOT NULL THEN
        RETURN QUERY SELECT new_id, 'recorded'::text;
        RETURN;
    END IF;

    -- The row holding this active token first: the worker may since have corrected the session's
    -- pangea_session_id from Pangea's session list, so the active token is what names a login.
    SELECT * INTO found_row FROM sessions s
    WHERE s.active_token_hash = p_active_token_hash OR s.pangea_session_id = p_pangea_session_id
    ORDER BY s.active_token_hash = p_active_token_hash DESC, s.id LIMIT 1;
    IF found_row.id IS NOT NULL AND found_row.state = 'active' AND found_row.active_token_id = p_active_token_id THEN
        -- The same login, still live: the newest handle is the one that works (the retried
        -- callback's answer is the one the browser keeps).
        IF p_handle_hash IS NOT NULL THEN
            UPDATE sessions s SET handle_hash = p_handle_hash, updated_at = now_, version = s.version + 1
            WHERE s.id = found_row.id;
        END IF;
        RETURN QUERY SELECT found_row.id, 'already_recorded'::text;
        RETURN;
    END IF;
    -- An ended session, or another login's (it shares only the Pangea session id): never revive or merge it.
    RETURN QUERY SELECT found_row.id, 'conflict'::text;
END
$$;
"""

#: session_sync_record_login as revision 7d1c4e2a9b30 made it (the downgrade puts it back).
RECORD_LOGIN_BEFORE = r"""
CREATE OR REPLACE FUNCTION session_sync_record_login(
    p_user_id text,               -- result.active_token.identity (pui_...)
    p_email text,                 -- result.active_token.email
    p_pangea_session_id text,     -- result.refresh_token.id: the session id /v2/session/list reports
    p_active_token_id text,       -- result.active_token.id (pmt_...)
    p_active_token_enc text,      -- Fernet ciphertext of result.active_token.token (first key)
    p_active_token_hash text,     -- lookup hash of result.active_token.token (first key)
    p_refresh_token_enc text,     -- Fernet ciphertext of result.refresh_token.token (first key)
    p_active_issued_at timestamptz,   -- result.active_token.created_at
    p_active_expires_at timestamptz,  -- result.active_token.expire
    p_refresh_expires_at timestamptz, -- result.refresh_token.expire
    p_handle_hash text DEFAULT NULL,  -- lookup hash of a new lss_ handle (cookie sessions), or NULL
    p_next_check_at timestamptz DEFAULT NULL,  -- NULL: now (the worker checks it at its next sweep)
    p_now timestamptz DEFAULT NULL
) RETURNS TABLE (session_id bigint, outcome text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := coalesce(p_now, clock_timestamp());
    new_id bigint;
    found_row sessions%ROWTYPE;
BEGIN
    IF p_user_id IS NULL OR p_email IS NULL OR p_pangea_session_id IS NULL OR p_active_token_id IS NULL
       OR p_active_token_enc IS NULL OR p_active_token_hash IS NULL OR p_refresh_token_enc IS NULL
       OR p_active_issued_at IS NULL OR p_active_expires_at IS NULL OR p_refresh_expires_at IS NULL THEN
        RAISE EXCEPTION 'session_sync_record_login: every parameter before p_handle_hash is required (not NULL)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_active_token_hash !~ '^[0-9a-f]{64}$' OR (p_handle_hash IS NOT NULL AND p_handle_hash !~ '^[0-9a-f]{64}$') THEN
        RAISE EXCEPTION 'session_sync_record_login: a lookup hash is 64 lowercase hex digits (HMAC-SHA256)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_user_id !~ '^[!-~]{1,64}$' OR p_pangea_session_id !~ '^[!-~]{1,64}$'
       OR p_active_token_id !~ '^[!-~]{1,64}$' THEN
        RAISE EXCEPTION 'session_sync_record_login: a Pangea id is 1 to 64 printable ASCII characters, no spaces'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(p_email) > 320 OR p_email ~ '[\x01-\x1f\x7f]' THEN
        RAISE EXCEPTION 'session_sync_record_login: p_email is at most 320 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_active_expires_at < p_active_issued_at THEN
        RAISE EXCEPTION 'session_sync_record_login: p_active_expires_at is before p_active_issued_at'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- ON CONFLICT DO NOTHING: a login recorded twice (a retried callback) must not abort the
    -- caller's transaction, as a unique violation would.
    INSERT INTO sessions AS s (
        user_id, email, pangea_session_id, active_token_id, active_token_enc, active_token_hash, handle_hash,
        refresh_token_enc, active_expires_at, active_issued_at, refresh_expires_at, state, next_check_at,
        created_at, updated_at, failures, uncertain, version
    ) VALUES (
        p_user_id, p_email, p_pangea_session_id, p_active_token_id, p_active_token_enc, p_active_token_hash,
        p_handle_hash, p_refresh_token_enc, p_active_expires_at, p_active_issued_at, p_refresh_expires_at, 'active',
        coalesce(p_next_check_at, now_), now_, now_, 0, false, 0
    )
    ON CONFLICT DO NOTHING
    RETURNING s.id INTO new_id;
    IF new_id IS NOT NULL THEN
        RETURN QUERY SELECT new_id, 'recorded'::text;
        RETURN;
    END IF;

    -- The row holding this active token first: the worker may since have corrected the session's
    -- pangea_session_id from Pangea's session list, so the active token is what names a login.
    SELECT * INTO found_row FROM sessions s
    WHERE s.active_token_hash = p_active_token_hash OR s.pangea_session_id = p_pangea_session_id
    ORDER BY s.active_token_hash = p_active_token_hash DESC, s.id LIMIT 1;
    IF found_row.id IS NOT NULL AND found_row.state = 'active' AND found_row.active_token_id = p_active_token_id THEN
        -- The same login, still live: the newest handle is the one that works (the retried
        -- callback's answer is the one the browser keeps).
        IF p_handle_hash IS NOT NULL THEN
            UPDATE sessions s SET handle_hash = p_handle_hash, updated_at = now_, version = s.version + 1
            WHERE s.id = found_row.id;
        END IF;
        RETURN QUERY SELECT found_row.id, 'already_recorded'::text;
        RETURN;
    END IF;
    -- An ended session, or another login's (it shares only the Pangea session id): never revive or merge it.
    RETURN QUERY SELECT found_row.id, 'conflict'::text;
END
$$;
"""


def _bucket_default() -> sa.TextClause:
    if op.get_context().dialect.name == "postgresql":
        return sa.text(f"(floor(random() * {BUCKETS}))::smallint")
    return sa.text(f"(abs(random()) % {BUCKETS})")


def upgrade() -> None:
    """Add ``check_groups`` (32 groups, due now), ``sessions.bucket`` and the two partial indexes."""
    groups = op.create_table(
        "check_groups",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("lo", sa.SmallInteger(), nullable=False),
        sa.Column("hi", sa.SmallInteger(), nullable=False),
        sa.Column("next_check_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("round_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("round_due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cursor_bucket", sa.SmallInteger(), nullable=True),
        sa.Column("cursor_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sessions", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint(f"lo >= 0 AND lo < hi AND hi <= {BUCKETS}", name=op.f("ck_check_groups_range")),
        sa.CheckConstraint("(cursor_bucket IS NULL) = (cursor_id IS NULL)", name=op.f("ck_check_groups_cursor")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_check_groups")),
    )
    width = BUCKETS // GROUPS
    op.bulk_insert(groups, [{"id": g, "lo": g * width, "hi": (g + 1) * width} for g in range(GROUPS)])

    op.drop_index("ix_sessions_next_check_at", table_name="sessions")
    with op.batch_alter_table("sessions", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("bucket", sa.SmallInteger(), server_default=_bucket_default(), nullable=False))
        batch.alter_column("next_check_at", existing_type=sa.DateTime(timezone=True), nullable=True)
        batch.create_check_constraint("bucket", f"bucket >= 0 AND bucket < {BUCKETS}")
    op.create_index(
        "ix_sessions_next_check_at",
        "sessions",
        ["next_check_at"],
        postgresql_where=sa.text(OWN_SCHEDULE),
        sqlite_where=sa.text(OWN_SCHEDULE),
    )
    op.create_index(
        "ix_sessions_bucket_id",
        "sessions",
        ["bucket", "id"],
        postgresql_where=sa.text("state = 'active'"),
        sqlite_where=sa.text("state = 'active'"),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(JUDGE)
        op.execute(RECORD_LOGIN)


def downgrade() -> None:
    """Write the groups' knowledge back into the rows, then drop the groups, the bucket and its index."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(JUDGE_BEFORE)  # before the bucket column goes: the function's row type changes with it
        op.execute(RECORD_LOGIN_BEFORE)
    op.execute(
        f"UPDATE sessions SET last_checked_at = {GROUP_VOUCHED}"
        f" WHERE state = 'active' AND next_check_at IS NULL"
        f" AND {GROUP_VOUCHED} > coalesce(last_checked_at, created_at)"
    )
    op.execute(
        "UPDATE sessions SET next_check_at = coalesce("
        "(SELECT g.next_check_at FROM check_groups g WHERE g.lo <= sessions.bucket AND sessions.bucket < g.hi),"
        " updated_at) WHERE next_check_at IS NULL"
    )
    op.drop_index("ix_sessions_bucket_id", table_name="sessions")
    op.drop_index("ix_sessions_next_check_at", table_name="sessions")
    with op.batch_alter_table("sessions", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint("bucket", type_="check")
        batch.drop_column("bucket")
        batch.alter_column("next_check_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index(
        "ix_sessions_next_check_at",
        "sessions",
        ["next_check_at"],
        postgresql_where=sa.text("state = 'active'"),
        sqlite_where=sa.text("state = 'active'"),
    )
    op.drop_table("check_groups")
