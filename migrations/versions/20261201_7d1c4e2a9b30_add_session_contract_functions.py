"""Add the database contract's functions on PostgreSQL: record a login, authenticate, log out.

An app in any language calls one function inside its own transaction and gets exactly what
``worker.sessions`` does, audit row included; ``worker.sessions`` itself calls them on PostgreSQL,
so there is one implementation there (README "Database contract"). SQLite keeps the Python path:
this revision does nothing on it.

What stays in the app: the keyed hashes and the Fernet ciphertexts (the database never sees a
key), the ``WWW-Authenticate`` challenge for a refused credential, and the kick that starts an
immediate delivery. Every function takes ``p_now`` (NULL: ``clock_timestamp()``) so a caller with
its own clock, or a test, decides what "now" is.

Bad input (a NULL where a value is required, a hash that is not 64 lowercase hex digits, an end
reason that is too long, expiry before issue) raises SQLSTATE 22023 with a message naming the
parameter, and writes nothing. A login recorded twice is no error: it answers
``already_recorded`` (or ``conflict``) and leaves the caller's transaction usable.

The SQL is frozen here, as a released revision must be: a change is a new revision that replaces
the functions (``CREATE OR REPLACE``).

Revision ID: 7d1c4e2a9b30
Revises: 130490934801
Create Date: 2026-12-01 22:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "7d1c4e2a9b30"
down_revision: str | Sequence[str] | None = "130490934801"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Every object this revision creates, in the order the downgrade drops them.
DROPS = (
    "DROP FUNCTION IF EXISTS session_sync_logout_user(text, text, timestamptz)",
    "DROP FUNCTION IF EXISTS session_sync_logout(bigint, text, timestamptz)",
    "DROP FUNCTION IF EXISTS session_sync_authenticate_id(bigint, timestamptz)",
    "DROP FUNCTION IF EXISTS session_sync_authenticate(text[], boolean, interval, timestamptz)",
    "DROP FUNCTION IF EXISTS session_sync_judge(sessions, boolean, text[], interval, timestamptz)",
    "DROP FUNCTION IF EXISTS session_sync_record_login("
    "text, text, text, text, text, text, text, timestamptz, timestamptz, timestamptz, text, timestamptz, timestamptz)",
    "DROP FUNCTION IF EXISTS session_sync_check_reason(text, text)",
    "DROP TYPE IF EXISTS session_sync_authentication",
)

CHECK_REASON = r"""
CREATE FUNCTION session_sync_check_reason(p_function text, p_reason text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- Keep in step with worker.sessions.check_reason (1 to 64 printable characters).
    IF p_reason IS NULL OR length(p_reason) NOT BETWEEN 1 AND 64 OR p_reason ~ '[\x01-\x1f\x7f]' THEN
        RAISE EXCEPTION '%: p_reason must be 1 to 64 printable characters', p_function
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
"""

RECORD_LOGIN = r"""
CREATE FUNCTION session_sync_record_login(
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

AUTHENTICATION_TYPE = """
CREATE TYPE session_sync_authentication AS (
    reason text,               -- NULL: live; else unknown | logged_out | revoked | expired | replaced
    session_id bigint,         -- the fields below are set only when reason IS NULL
    user_id text,
    email text,
    expires_at timestamptz,
    created_at timestamptz,
    last_checked_at timestamptz,
    uncertain boolean,
    rotated_token_enc text     -- set when a replaced token was accepted within the grace: decrypt, hand back
)
"""

JUDGE = r"""
CREATE FUNCTION session_sync_judge(
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

AUTHENTICATE = r"""
CREATE FUNCTION session_sync_authenticate(
    p_hashes text[],                 -- the credential's lookup hash under every configured key, first key first
    p_handle boolean DEFAULT false,  -- true: the credential is a cookie handle (starts with lss_)
    p_grace interval DEFAULT interval '2 minutes',  -- SESSION_SYNC_REFRESH_GRACE (its syntax reads as an interval)
    p_now timestamptz DEFAULT NULL
) RETURNS session_sync_authentication
LANGUAGE plpgsql STABLE AS $$
DECLARE
    found_row sessions%ROWTYPE;
    -- Exact seconds: a '1d' grace must not become 23 or 25 hours in the caller's time zone.
    grace interval := extract(epoch FROM p_grace) * interval '1 second';
BEGIN
    IF p_hashes IS NULL OR cardinality(p_hashes) = 0 OR array_position(p_hashes, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'session_sync_authenticate: p_hashes needs one lookup hash per configured key'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_handle IS NULL OR grace < interval '0' OR (grace IS NULL AND NOT p_handle) THEN
        RAISE EXCEPTION 'session_sync_authenticate: p_handle is true or false, p_grace a duration not below 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_handle THEN
        SELECT * INTO found_row FROM sessions s WHERE s.handle_hash = ANY (p_hashes) LIMIT 1;
    ELSE
        SELECT * INTO found_row FROM sessions s
        WHERE s.active_token_hash = ANY (p_hashes) OR s.previous_token_hash = ANY (p_hashes) LIMIT 1;
    END IF;
    RETURN session_sync_judge(found_row, NOT p_handle, p_hashes, grace, coalesce(p_now, clock_timestamp()));
END
$$;
"""

AUTHENTICATE_ID = r"""
CREATE FUNCTION session_sync_authenticate_id(p_session_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS session_sync_authentication
LANGUAGE plpgsql STABLE AS $$
DECLARE
    found_row sessions%ROWTYPE;
BEGIN
    SELECT * INTO found_row FROM sessions s WHERE s.id = p_session_id;
    RETURN session_sync_judge(found_row, false, NULL, NULL, coalesce(p_now, clock_timestamp()));
END
$$;
"""

LOGOUT = r"""
CREATE FUNCTION session_sync_logout(
    p_session_id bigint, p_reason text DEFAULT 'user_logout', p_now timestamptz DEFAULT NULL
) RETURNS TABLE (session_id bigint, state text, event_id bigint)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := coalesce(p_now, clock_timestamp());
    ended_user text;
    ended_token text;
    new_event bigint;
BEGIN
    PERFORM session_sync_check_reason('session_sync_logout', p_reason);
    -- Keep in step with worker.sessions._end_sessions.
    UPDATE sessions s
    SET state = 'logged_out', end_reason = p_reason, ended_at = now_, updated_at = now_, refresh_token_enc = NULL,
        claimed_until = NULL, claim_token = NULL, version = s.version + 1
    WHERE s.id = p_session_id AND s.state = 'active'
    RETURNING s.user_id, s.active_token_enc INTO ended_user, ended_token;
    IF NOT FOUND THEN
        -- Unknown (no row) or already ended (its state as it is): nothing more is queued.
        RETURN QUERY SELECT s.id, s.state::text, NULL::bigint FROM sessions s WHERE s.id = p_session_id;
        RETURN;
    END IF;
    INSERT INTO logout_outbox AS e (kind, session_id, user_id, token_enc, state, attempts, created_at, next_attempt_at)
    VALUES ('session', p_session_id, ended_user, ended_token, 'pending', 0, now_, now_)
    RETURNING e.id INTO new_event;
    INSERT INTO session_events (session_id, at, action, outcome, reason)
    VALUES (p_session_id, now_, 'logged_out', 'logout_queued', p_reason);
    RETURN QUERY SELECT p_session_id, 'logged_out'::text, new_event;
END
$$;
"""

LOGOUT_USER = r"""
CREATE FUNCTION session_sync_logout_user(
    p_user_id text, p_reason text DEFAULT 'user_logout', p_now timestamptz DEFAULT NULL
) RETURNS TABLE (user_id text, session_ids bigint[], event_id bigint)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := coalesce(p_now, clock_timestamp());
    ended bigint[];
    reused bigint;
BEGIN
    PERFORM session_sync_check_reason('session_sync_logout_user', p_reason);
    IF p_user_id IS NULL THEN
        RETURN;  -- no user: nothing to end, nothing queued (zero rows, as for an unknown user)
    END IF;
    WITH gone AS (
        UPDATE sessions s
        SET state = 'logged_out', end_reason = p_reason, ended_at = now_, updated_at = now_, refresh_token_enc = NULL,
            claimed_until = NULL, claim_token = NULL, version = s.version + 1
        WHERE s.user_id = p_user_id AND s.state = 'active'
        RETURNING s.id
    )
    SELECT coalesce(array_agg(g.id ORDER BY g.id), '{}') INTO ended FROM gone g;
    IF cardinality(ended) = 0 AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = p_user_id) THEN
        RETURN;  -- a user who never had a local session: zero rows
    END IF;
    -- One /v2/session/logout per user: queued even when no local session was still active (it ends
    -- the user's sessions everywhere); a pending one is reused. Keep in step with outbox_queries.add_user_logout.
    SELECT e.id INTO reused FROM logout_outbox e
    WHERE e.state = 'pending' AND e.kind = 'user' AND e.user_id = p_user_id ORDER BY e.id LIMIT 1;
    IF reused IS NULL THEN
        INSERT INTO logout_outbox AS e (kind, user_id, state, attempts, created_at, next_attempt_at)
        VALUES ('user', p_user_id, 'pending', 0, now_, now_)
        RETURNING e.id INTO reused;
    END IF;
    INSERT INTO session_events (session_id, at, action, outcome, reason)
    SELECT g, now_, 'logged_out', 'logout_queued', p_reason FROM unnest(ended) AS g;
    RETURN QUERY SELECT p_user_id, ended, reused;
END
$$;
"""

#: Statements of the upgrade, in order.
CREATES = (CHECK_REASON, RECORD_LOGIN, AUTHENTICATION_TYPE, JUDGE, AUTHENTICATE, AUTHENTICATE_ID, LOGOUT, LOGOUT_USER)


def upgrade() -> None:
    """Create the contract's functions on PostgreSQL; nothing on SQLite (it keeps the Python path)."""
    if op.get_context().dialect.name != "postgresql":
        return
    for statement in CREATES:
        op.execute(statement)


def downgrade() -> None:
    """Drop the functions and their result type."""
    if op.get_context().dialect.name != "postgresql":
        return
    for statement in DROPS:
        op.execute(statement)
