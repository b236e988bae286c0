"""The chaos soak over many fresh seeds: ``tests/chaos/test_soak.py`` once per seed, one line each, then totals.

    python -m benchmarks.chaos --seeds 10 --minutes 3      # ten new seeds, three minutes of chaos each
    python -m benchmarks.chaos --minutes 30                # one long run on a new seed
    python -m benchmarks.chaos --minutes 5 --seed 1234     # replay one run (--seed may repeat)

Each run is the suite's own soak (the harness has one home, ``tests/chaos``) in a pytest process
of its own, with a PostgreSQL server and a Redis server of its own (the soak restarts and kills
them; the machine's are never touched), so it needs PostgreSQL's and Redis's server binaries
installed, nothing running. A seed is printed before its run starts, so a run that hangs still
names it; its figures line comes when it ends, judged from Pangea's and the database's state after
recovery. Every figure but *lost in transit* and *recovered in* must be zero.

*Recovered in* is the time from the heal (every fault cleared, every process back, every Pangea
ending confirmed) until the worker has caught up by the database's and Pangea's own state: the
outbox is empty (every logout delivered), every session ended at Pangea is revoked here, every
living session was verified or refreshed since the heal, and the mass-revocation guard is not
tripped (a tripped guard needs an operator; the soak models none, so it counts as not recovered).

The figures are written to ``--out`` (default ``benchmarks/chaos.json``: the README cites it),
with the command, the code's commit and every run's notes; ``--out -`` writes nothing. The exit
status is non-zero when any run failed (a figure that must be zero is not, or it never recovered).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/chaos/test_soak.py::test_chaos_soak"
DEFAULT_OUT = ROOT / "benchmarks" / "chaos.json"
#: The figures each run reports, as the README's tables name them; all but the last two must be 0.
MUST_BE_ZERO = (
    "wrongly_revoked",
    "missed",
    "lost_logouts",
    "refresh_reused",
    "orphaned",
    "audit_unapplied",
    "leases_taken_live",
)
COLUMNS = (*MUST_BE_ZERO, "lost_in_transit", "recovered_in")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="minutes of chaos per run (default 3)")
    parser.add_argument("--seeds", type=int, default=1, help="how many fresh seeds to run (default 1)")
    parser.add_argument("--seed", type=int, action="append", help="replay this seed (repeatable; replaces --seeds)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes per run (default 3)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file for the figures ('-': none)")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not 1 <= args.workers <= 8:
        parser.error("--workers must be between 1 and 8")
    seeds = args.seed or [random.SystemRandom().randrange(1 << 31) for _ in range(args.seeds)]
    command = "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"chaos soak: {len(seeds)} run(s) of {args.minutes:g} minutes, {args.workers} workers; seeds {seeds}")
    print(_header(), flush=True)
    runs = [_run(seed, args.minutes, args.workers) for seed in seeds]
    totals = _totals(runs)
    print(_row("total", totals))
    failed = [r["seed"] for r in runs if not r["passed"]]
    print(f"{len(runs) - len(failed)} passed, {len(failed)} failed" + (f" (seeds {failed})" if failed else ""))
    print("README row: " + _markdown(command.strip(), args.minutes, runs, totals))
    if args.out != "-":
        record = {
            "command": command.strip(),
            "commit": _commit(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "minutes": args.minutes,
            "workers": args.workers,
            "totals": totals,
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"figures written to {args.out}")
    return 1 if failed else 0


def _run(seed: int, minutes: float, workers: int) -> dict[str, Any]:
    """One soak in a pytest process of its own; its figures (or why there are none)."""
    print(f"seed {seed}: running (replay: python -m benchmarks.chaos --minutes {minutes:g} --seed {seed})", flush=True)
    with tempfile.TemporaryDirectory(prefix="session-sync-chaos-") as tmp:
        out = Path(tmp) / "figures.json"
        env = os.environ | {
            "SESSION_SYNC_CHAOS_MINUTES": str(minutes),
            "SESSION_SYNC_CHAOS_SEED": str(seed),
            "SESSION_SYNC_CHAOS_WORKERS": str(workers),
            "SESSION_SYNC_CHAOS_OUT": str(out),
        }
        argv = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", "--basetemp", f"{tmp}/pytest"]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=ROOT, env=env, check=False, capture_output=True, text=True)
        wall = time.monotonic() - started
        if not out.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
            print(f"seed {seed}: no figures (pytest exit {done.returncode}):\n  " + "\n  ".join(tail), flush=True)
            return {"seed": seed, "passed": False, "error": "\n".join(tail), "wall_seconds": round(wall)}
        figures: dict[str, Any] = json.loads(out.read_text())
    notes = figures.get("notes", {})
    run = {
        "seed": seed,
        "passed": done.returncode == 0,
        **{k: figures.get(k, notes.get(k)) for k in COLUMNS},
        "sessions": notes.get("sessions"),
        "plan": figures.get("plan"),
        "wall_seconds": round(wall),
        "notes": notes,
        "explained": figures.get("explained", []),
    }
    print(_row(str(seed), run), flush=True)
    if not run["passed"]:  # what counts against it: each session's row, outbox rows and audit trail
        for line in run["explained"]:
            print(f"    {line}")
    if "guard_tripped" in notes:
        print(f"    guard tripped at {notes['guard_tripped']}")
    return run


def _totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [r for r in runs if "error" not in r]
    totals: dict[str, Any] = {k: sum(int(r[k] or 0) for r in judged) for k in (*MUST_BE_ZERO, "lost_in_transit")}
    recovered = [r["recovered_in"] for r in judged if r["recovered_in"] is not None]
    # The slowest recovery is the figure that matters; None when some run never recovered.
    totals["recovered_in"] = max(recovered) if recovered and len(recovered) == len(judged) else None
    totals["runs"] = len(runs)
    totals["unjudged"] = len(runs) - len(judged)
    totals["sessions"] = sum(int(r.get("sessions") or 0) for r in judged)
    return totals


def _markdown(command: str, minutes: float, runs: list[dict[str, Any]], totals: dict[str, Any]) -> str:
    """The totals as a row of the README's chaos table (bold where a figure that must be 0 is not)."""
    seeds = ", ".join(str(r["seed"]) for r in runs)
    label = f"`{command}`: {len(runs)} runs of {minutes:g} min (seeds {seeds}), {totals['sessions']:,} sessions"
    cells = [label]
    for key in ("wrongly_revoked", "missed", "lost_logouts", "refresh_reused", "orphaned", "leases_taken_live"):
        cells.append(f"**{totals[key]}**" if totals[key] else "0")
    cells.append(f"**{totals['audit_unapplied']}**" if totals["audit_unapplied"] else "0")
    cells.append(str(totals["lost_in_transit"]))
    recovered = totals["recovered_in"]
    cells.append(f"{recovered:.1f} s at most" if recovered is not None else "**not within 90 s**")
    return "| " + " | ".join(cells) + " |"


def _header() -> str:
    names = ("seed", "wrongly", "missed", "lost_lo", "reused", "orphan", "audit", "leases", "transit", "recover")
    return " ".join(f"{n:>10}" for n in names)


def _row(label: str, figures: dict[str, Any]) -> str:
    cells = [f"{label:>10}"]
    for key in COLUMNS:
        value = figures.get(key)
        if key == "recovered_in":
            cells.append(f"{value:>9.1f}s" if value is not None else f"{'never':>10}")
        else:
            cells.append(f"{value if value is not None else '?':>10}")
    return " ".join(cells)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
