"""Readiness checks (``session-sync check``, the worker's start-up) and the exit codes every command shares.

Each check answers one question an operator asks before trusting a deployment (settings readable,
database reachable and at the head revision, broker reachable, the rate limit's shared store
reachable, Pangea accepting our token) and never raises: a failure is a :class:`Result` saying
what is wrong. A readiness probe skips what it must not depend on (``check --skip pangea``: a
Pangea outage is no reason to restart or route around a worker, which retries on its own). kombu and redis
are imported inside the checks that use them (the Celery app and the CLI import this module for its exit
codes), and Alembic inside ``worker.db``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import sqlalchemy as sa

from worker import authn, db, errors, ratelimit
from worker.settings import Settings

#: Exit code of a command that failed for an ordinary reason (a database error, a timeout, a failed check).
EXIT_FAILURE = 1
#: Exit code of a missing or malformed setting, and of a worker refusing to start.
EXIT_CONFIG = 2
#: Exit code when Pangea refused PANGEA_AUTHN_TOKEN: the same in ``sweep``, ``resync`` and ``status``.
EXIT_TOKEN_REFUSED = 3
#: A well-formed user token no session holds: asking Pangea about it proves only that Pangea accepts us.
PROBE_TOKEN = "ptu_" + "a" * 32
#: Seconds the broker and Pangea checks wait before calling a service unreachable.
DEFAULT_TIMEOUT = 5.0
#: Every check, in the order they run and print; all but ``settings`` can be skipped.
NAMES = ("settings", "database", "broker", "ratelimit", "pangea")
#: The checks ``check --skip`` accepts.
SKIPPABLE = NAMES[1:]


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One check's outcome: its name, whether it passed, one line saying what was found, the exit code it means."""

    name: str
    ok: bool
    detail: str
    exit_code: int = EXIT_FAILURE

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form for ``check --json``."""
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def startup_problem(settings: Settings) -> str | None:
    """Why a worker must not start (a required setting missing, the schema not at head), or None."""
    found = check_settings(settings)
    if not found.ok:
        return found.detail
    return schema_problem(settings.database_url)


def schema_problem(database_url: str) -> str | None:
    """Why the database at ``database_url`` cannot be used by this code (None: reachable and at head)."""
    head = db.head_revision()
    try:
        current = db.current_revision(database_url)
    except sa.exc.DBAPIError as exc:
        said = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        return f"database unreachable ({said}); check DATABASE_URL"
    if current is None:
        return f"the database has no session-sync schema; run `session-sync db upgrade` (head is {head})"
    if current != head:
        return f"the database is at revision {current}, this code needs {head}; run `session-sync db upgrade`"
    return None


def check_settings(settings: Settings) -> Result:
    """The settings every process needs: Pangea's URL and token, and the encryption keys."""
    missing: list[str] = []
    if not (settings.pangea_base_url or settings.pangea_domain):
        missing.append("PANGEA_DOMAIN: not set (or set PANGEA_BASE_URL)")
    if settings.pangea_authn_token is None:
        missing.append("PANGEA_AUTHN_TOKEN: not set")
    if settings.encryption_keys is None and not settings.is_sqlite:  # SQLite (development) makes its own key
        missing.append("SESSION_SYNC_ENCRYPTION_KEYS: not set (required with PostgreSQL)")
    if missing:
        return Result(name="settings", ok=False, detail="; ".join(missing), exit_code=EXIT_CONFIG)
    return Result(name="settings", ok=True, detail=f"Pangea at {settings.authn_base_url}, queue {settings.queue}")


def check_database(settings: Settings) -> Result:
    """The database answers and its schema is at this code's head revision."""
    problem = schema_problem(settings.database_url)
    if problem is not None:
        return Result(name="database", ok=False, detail=problem)
    return Result(name="database", ok=True, detail=f"reachable, at head revision {db.head_revision()}")


def check_broker(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """The broker accepts a connection (kombu, the library Celery itself uses)."""
    from kombu.connection import Connection

    try:
        with Connection(settings.celery_broker_url, connect_timeout=timeout) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # kombu and its transports raise many kinds; each means "not reachable"
        return Result(name="broker", ok=False, detail=f"unreachable ({type(exc).__name__}); check CELERY_BROKER_URL")
    return Result(name="broker", ok=True, detail=f"reachable, tasks go to queue {settings.queue}")


def check_rate_limit(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Which store holds the rate limit's bucket, and that a shared one answers (else workers limit alone)."""
    store = settings.rate_limit_store or ratelimit.default_store(settings)
    said = ratelimit.describe(settings)
    if store == "local":
        return Result(name="ratelimit", ok=True, detail=said)
    try:
        if store == ratelimit.DATABASE:
            engine = db.create_engine(settings.database_url)
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text(f"SELECT count(*) FROM {ratelimit.TABLE}"))
            finally:
                engine.dispose()
        else:
            import redis

            client = redis.Redis.from_url(store, socket_timeout=timeout, socket_connect_timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
    except Exception as exc:  # drivers raise many kinds; each means "the shared store does not answer"
        detail = f"{said}: unreachable ({type(exc).__name__}); each worker would limit itself alone"
        return Result(name="ratelimit", ok=False, detail=detail)
    return Result(name="ratelimit", ok=True, detail=said)


def check_pangea(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Pangea answers and accepts PANGEA_AUTHN_TOKEN: a token check on a token nobody holds."""

    async def probe() -> str:
        client = authn.AuthnClient.from_settings(settings, timeout=timeout, retries=0, max_connections=1)
        try:
            return str((await client.check_token(PROBE_TOKEN)).verdict)
        finally:
            await client.aclose()

    try:
        asyncio.run(probe())
    except errors.AuthnRejectedUs:
        detail = "Pangea refused PANGEA_AUTHN_TOKEN (Unauthorized)"
        return Result(name="pangea", ok=False, detail=detail, exit_code=EXIT_TOKEN_REFUSED)
    except errors.SessionSyncError as exc:
        return Result(name="pangea", ok=False, detail=f"no usable answer from Pangea ({type(exc).__name__}: {exc})")
    kind = "service" if settings.has_service_token else "client"
    return Result(
        name="pangea", ok=True, detail=f"{settings.authn_base_url} accepts our {kind} token; {capabilities(settings)}"
    )


#: How ``check`` names each capability of ``Settings.capabilities``.
_CAPABILITY_NAMES = {
    "per_token_checks": "per-token checks",
    "bulk_revalidation": "bulk revalidation",
    "user_logout_in_one_call": "user-wide logout in one call",
    "invalidate_by_session_id": "ending a session by its id",
}


def capabilities(settings: Settings) -> str:
    """What the configured token can and cannot do, in one line (a client token has reduced features)."""
    can = [_CAPABILITY_NAMES[k] for k, ok in settings.capabilities.items() if ok]
    cannot = [_CAPABILITY_NAMES[k] for k, ok in settings.capabilities.items() if not ok]
    line = "can: " + ", ".join(can)
    if cannot:
        line += "; cannot: " + ", ".join(cannot) + " (user-wide logouts end each known session with its own token)"
    return line


def run_all(settings: Settings, *, skip: frozenset[str] = frozenset()) -> list[Result]:
    """Every check not in ``skip``, in order; the ones that need the settings are not run when those are missing."""
    unknown = skip - set(SKIPPABLE)
    if unknown:
        raise ValueError(f"cannot skip {', '.join(sorted(unknown))}: choose from {', '.join(SKIPPABLE)}")
    results = [check_settings(settings)]
    runs = {
        "database": check_database,
        "broker": check_broker,
        "ratelimit": check_rate_limit,
        "pangea": check_pangea,
    }
    for name in SKIPPABLE:
        if name in skip:
            continue
        if name == "pangea" and not results[0].ok:
            results.append(Result(name="pangea", ok=False, detail="not checked: settings are incomplete"))
            continue
        results.append(runs[name](settings))
    return results
