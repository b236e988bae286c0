"""Leases taken while they were live, as the database itself saw it (PostgreSQL, test databases only).

A trigger on ``sessions`` notes, by the database's clock (``clock_timestamp()``), when each claim
was granted or extended and how long its holder believes it lasts (the settings' lease, or the
refresh lease once ``begin_refresh`` took the refresh hold: the holder's own compare-and-swap,
which moves the row's version, as a claim never does). A claim that replaces another one before that time has
passed is a lease taken from under a live holder: with the host clocks right it never happens;
with one host's clock fast (it sees every lease as lapsed) or slow (its leases lapse, for the
others, the moment it takes them) it does. The host clocks never enter the measure.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

#: Allowance for the time between a worker reading its clock and the claim reaching the database.
TOLERANCE = timedelta(seconds=1)

_INSTALL = """
CREATE TABLE chaos_leases (
    session_id bigint PRIMARY KEY, claim_token text NOT NULL, granted_at timestamptz NOT NULL, lasts interval NOT NULL
);
CREATE TABLE chaos_taken (
    session_id bigint NOT NULL, held_by text NOT NULL, taken_by text NOT NULL,
    granted_at timestamptz NOT NULL, lasts interval NOT NULL, taken_at timestamptz NOT NULL,
    held_until timestamptz, taken_until timestamptz
);
CREATE FUNCTION chaos_watch_leases() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    held record;
BEGIN
    IF NEW.claim_token IS NULL THEN
        DELETE FROM chaos_leases WHERE session_id = NEW.id;
    ELSIF NEW.version IS DISTINCT FROM OLD.version THEN
        -- The holder's own compare-and-swap (the refresh hold, matched on its claim and version):
        -- the lease goes on, now as long as a refresh may take. A claim never moves the version.
        INSERT INTO chaos_leases VALUES (NEW.id, NEW.claim_token, clock_timestamp(), interval '{refresh_lease}')
        ON CONFLICT (session_id) DO UPDATE
        SET claim_token = EXCLUDED.claim_token, granted_at = EXCLUDED.granted_at, lasts = EXCLUDED.lasts;
    ELSIF NEW.claim_token IS DISTINCT FROM OLD.claim_token THEN
        SELECT * INTO held FROM chaos_leases WHERE session_id = NEW.id;
        IF FOUND AND held.claim_token = OLD.claim_token AND held.granted_at + held.lasts > clock_timestamp() THEN
            INSERT INTO chaos_taken VALUES (
                NEW.id, OLD.claim_token, NEW.claim_token, held.granted_at, held.lasts, clock_timestamp(),
                OLD.claimed_until, NEW.claimed_until
            );
        END IF;
        INSERT INTO chaos_leases VALUES (NEW.id, NEW.claim_token, clock_timestamp(), interval '{lease}')
        ON CONFLICT (session_id) DO UPDATE
        SET claim_token = EXCLUDED.claim_token, granted_at = EXCLUDED.granted_at, lasts = EXCLUDED.lasts;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_watch_leases AFTER UPDATE OF claim_token, claimed_until ON sessions
FOR EACH ROW EXECUTE FUNCTION chaos_watch_leases();
"""


def _seconds(value: timedelta) -> str:
    return f"{max(value - TOLERANCE, timedelta(0)).total_seconds():.3f} seconds"


def install(engine: sa.Engine, *, lease: timedelta, refresh_lease: timedelta) -> None:
    """Start watching ``engine``'s database; ``lease`` and ``refresh_lease`` are the workers' settings."""
    ddl = _INSTALL.replace("{lease}", _seconds(lease)).replace("{refresh_lease}", _seconds(refresh_lease))
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl)


def taken(engine: sa.Engine) -> list[dict[str, object]]:
    """Every lease taken while live, oldest first: session, when granted, for how long, when taken."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT session_id, granted_at, lasts, taken_at, held_until, taken_until"
                " FROM chaos_taken ORDER BY taken_at"
            )
        )
        return [dict(r._mapping) for r in rows]


def by_clock(engine: sa.Engine, *, lease: timedelta) -> dict[str, int]:
    """Leases taken while live, by how far the holder's and the taker's clocks were off (whole minutes).

    Each worker writes ``claimed_until`` as its own clock's now plus the lease; against the
    database's clock at that moment, what remains is that worker's offset.
    """
    found: dict[str, int] = {}
    for row in taken(engine):
        taker = _minutes(row["taken_until"], row["taken_at"], lease)
        holder = _minutes(row["held_until"], row["granted_at"], lease)
        key = f"holder{holder:+d}m/taker{taker:+d}m"
        found[key] = found.get(key, 0) + 1
    return found


def _minutes(until: object, at: object, lease: timedelta) -> int:
    if not isinstance(until, datetime) or not isinstance(at, datetime):
        return 0
    return round((until - at - lease).total_seconds() / 60)
