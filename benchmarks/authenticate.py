"""What ``worker.sessions.authenticate`` costs per call, on SQLite and PostgreSQL, with N sessions stored.

    python -m benchmarks.authenticate --sessions 100000 --calls 5000

"Per request" is what ``worker.web.Guard.check`` does: open an ORM session, authenticate, close
it (on PostgreSQL: a pool checkout with its pre-ping, BEGIN, the SELECT, ROLLBACK). "Open
session" is the lookup alone, in a session the app already holds for the request.

Lookups: an active token, an ``lss_`` handle, a token the worker replaced (inside the grace
period, so the new token is decrypted and handed back), an unknown token, and a local id. Rows
carry real keyed hashes; they share one Fernet ciphertext, which only the replaced-token lookup
opens. Prints a Markdown table (and one JSON line per backend with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa

from benchmarks import seed
from worker import crypto, errors, models, sessions
from worker import db as dbmod

DEFAULT_PG = os.environ.get("SESSION_SYNC_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
#: Rows inserted per statement while seeding.
CHUNK = 10_000


def token(i: int) -> str:
    return f"ptu_bench{i:027d}"


def handle(i: int) -> str:
    return f"{sessions.HANDLE_PREFIX}BENCH{i:027d}"


def fill(url: str, cipher: crypto.TokenCipher, count: int, now: datetime) -> None:
    """Insert ``count`` active sessions; every tenth one was refreshed a minute ago (has a previous token)."""
    enc = cipher.encrypt("ptu_the_current_token")
    engine = dbmod.create_engine(url)
    table = cast(sa.Table, models.LocalSession.__table__)
    try:
        for start in range(0, count, CHUNK):
            rows = [
                {
                    "user_id": f"pui_{i:032d}",
                    "email": f"u{i}@example.com",
                    "pangea_session_id": f"pmt_s{i:031d}",
                    "active_token_id": f"pmt_a{i:031d}",
                    "active_token_enc": enc,
                    "active_token_hash": cipher.lookup_hash(token(i)),
                    "handle_hash": cipher.lookup_hash(handle(i)),
                    "previous_token_hash": cipher.lookup_hash(token(i) + "old") if i % 10 == 0 else None,
                    "rotated_at": now - timedelta(minutes=1) if i % 10 == 0 else None,
                    "refresh_token_enc": enc,
                    "active_expires_at": now + timedelta(hours=1),
                    "active_issued_at": now,
                    "refresh_expires_at": now + timedelta(days=1),
                    "state": "active",
                    "created_at": now,
                    "updated_at": now,
                    "next_check_at": now + timedelta(minutes=5),
                }
                for i in range(start, min(count, start + CHUNK))
            ]
            with engine.begin() as conn:
                conn.execute(sa.insert(table), rows)
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))
    finally:
        engine.dispose()


def measure(url: str, cipher: crypto.TokenCipher, count: int, calls: int) -> dict[str, Any]:
    """µs per call and calls per second for each kind of lookup."""
    engine = dbmod.create_engine(url)
    maker = dbmod.session_factory(engine)
    rng = random.Random(7)
    grace = timedelta(minutes=2)
    kinds: dict[str, Callable[[int], str | int]] = {
        "token": token,
        "handle": handle,
        "replaced token": lambda i: token(i - i % 10) + "old",
        "unknown token": lambda i: f"ptu_nobody{i:026d}",
        "local id": lambda i: i + 1,
    }
    results: dict[str, Any] = {}
    try:
        for name, credential in kinds.items():
            picks = [credential(rng.randrange(count)) for _ in range(calls)]
            for warm in picks[:200]:
                _call(maker, cipher, warm, grace)
            started = time.perf_counter()
            for pick in picks:
                _call(maker, cipher, pick, grace)
            per_request = time.perf_counter() - started
            with maker() as db:  # the lookup alone, in a session the app already has open
                started = time.perf_counter()
                for pick in picks:
                    _lookup(db, cipher, pick, grace)
                alone = time.perf_counter() - started
            results[name] = {
                "us_per_call": round(per_request / calls * 1e6, 1),
                "calls_per_s": round(calls / per_request),
                "us_in_open_session": round(alone / calls * 1e6, 1),
            }
    finally:
        engine.dispose()
    return results


def _call(maker: Any, cipher: crypto.TokenCipher, credential: str | int, grace: timedelta) -> None:
    with maker() as db:
        _lookup(db, cipher, credential, grace)


def _lookup(db: Any, cipher: crypto.TokenCipher, credential: str | int, grace: timedelta) -> None:
    try:
        sessions.authenticate(db, credential, cipher=cipher, grace=grace)
    except errors.SessionInvalid:
        pass


def run_backend(backend: str, count: int, calls: int, pg: str) -> dict[str, Any]:
    cipher = crypto.TokenCipher([crypto.generate_key()])
    now = datetime.now(UTC)
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            dbmod.upgrade(url)
            fill(url, cipher, count, now)
            return measure(url, cipher, count, calls)
    name = f"ssb_auth_{uuid.uuid4().hex[:8]}"
    url = seed.create_database(pg, name)
    try:
        fill(url, cipher, count, now)
        return measure(url, cipher, count, calls)
    finally:
        seed.drop_database(pg, name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.authenticate", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=5_000, help="calls per kind of lookup")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL admin URL (a database is created on its server)")
    p.add_argument("--json", action="store_true")
    o = p.parse_args(argv)
    print(f"{o.sessions:,} sessions, {o.calls:,} calls per lookup\n")
    print("| backend | lookup | µs/call (per request) | calls/s (per request) | µs/call (open session) |")
    print("|---|---|---:|---:|---:|")
    for backend in o.backends.split(","):
        results = run_backend(backend, o.sessions, o.calls, o.pg)
        for kind, r in results.items():
            row = f"| {backend} | {kind} | {r['us_per_call']} | {r['calls_per_s']:,} | {r['us_in_open_session']} |"
            print(row, flush=True)
        if o.json:
            print(json.dumps({"backend": backend, "sessions": o.sessions, "results": results}))


if __name__ == "__main__":
    main()
