"""The benchmark matrix: every path and size, each in a fresh process, and the tables of ``docs/benchmarks.md``.

    python -m benchmarks.matrix run              # the whole matrix (about 20 minutes), then the report
    python -m benchmarks.matrix run --quick      # 10k sessions per path, a few minutes
    python -m benchmarks.matrix run --runs bulk:1000000,bulk:100000:0.01
    python -m benchmarks.matrix report           # rewrite the tables from benchmarks/results.json

A run is ``path:sessions`` or ``path:sessions:refreshing`` (the share of sessions inside their refresh
margin; 0 is the routine case, where every check finds nothing changed).

Results accumulate in ``benchmarks/results.json`` (one entry per path and size, the latest wins), so a
long run (1M sessions) can be made on its own and merged in. ``report`` rewrites only the part of
``docs/benchmarks.md`` between its ``results`` markers; the prose around it is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
REPORT = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

Run = tuple[str, int, float]
#: The matrix: (path, sessions, refreshing). The baseline is slow by nature (a round trip and a commit per session).
DEFAULT_RUNS: tuple[Run, ...] = (
    ("baseline", 1_000, 0.0),
    ("per_token", 10_000, 0.0),
    ("per_token", 100_000, 0.0),
    ("per_token", 10_000, 0.01),
    ("bulk", 10_000, 0.0),
    ("bulk", 100_000, 0.0),
    ("bulk", 1_000_000, 0.0),
    ("bulk", 100_000, 0.01),
    ("refresh", 10_000, 0.0),
)
#: ``--quick``: every path once at 10k (the baseline at 500), the routine and the 1 %-refreshing case.
QUICK_RUNS: tuple[Run, ...] = (
    ("baseline", 500, 0.0),
    ("per_token", 10_000, 0.0),
    ("per_token", 10_000, 0.01),
    ("bulk", 10_000, 0.0),
    ("bulk", 10_000, 0.01),
    ("refresh", 2_000, 0.0),
)
#: Worker settings every run shares (the sweep's own defaults are these too). Batches in flight are
#: the product's default (SESSION_SYNC_BATCHES_IN_FLIGHT, 4), which the sweep takes when not told.
COMMON = ("--concurrency", "128", "--batch-size", "1000", "--latency-ms", "50")
#: Targets from issues 7 and 14, on this machine with the emulator at 50 ms.
TARGETS = {"per_token": 1_000, "bulk": 20_000, "ratio": 50, "rss_growth": 1.3, "rows": 0.01, "wal": 10}


def key_of(path: str, sessions: int, refreshing: float) -> str:
    """The results key: ``path:sessions``, with ``:refreshing`` when some sessions refresh."""
    return f"{path}:{sessions}" + (f":{refreshing:g}" if refreshing else "")


def parse_runs(text: str) -> list[Run]:
    """``path:sessions[:refreshing],...`` from the command line."""
    runs = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--runs: {item!r} is not path:sessions or path:sessions:refreshing")
        runs.append((parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0))
    return runs


def run_one(path: str, sessions: int, refreshing: float = 0.0) -> dict[str, Any]:
    """One ``benchmarks.sweep`` run in a fresh interpreter; its JSON plus how long the whole run took."""
    command = [sys.executable, "-m", "benchmarks.sweep", "--sessions", str(sessions), "--path", path, *COMMON]
    if refreshing:
        command += ["--refreshing", f"{refreshing:g}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["run_s"] = round(time.perf_counter() - started, 1)
    result["command"] = "python -m benchmarks.sweep " + " ".join(command[3:])
    result["commit"] = _commit()
    return result


def _commit() -> str:
    """The checkout measured: its short commit, ``+dirty`` when files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load() -> dict[str, dict[str, Any]]:
    """Stored results by ``path:sessions[:refreshing]`` (entries of the earlier harness, without WAL, left out)."""
    stored = dict(json.loads(RESULTS.read_text())) if RESULTS.exists() else {}
    return {key: r for key, r in stored.items() if "wal_bytes" in r}


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import httpx
    import sqlalchemy as sa
    import uvicorn

    from benchmarks import pgcluster

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    postgres = os.path.join(pgcluster.bindir(), "postgres")
    version = subprocess.run([postgres, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    knobs = ", ".join(f"{k}={v}" for k, v in pgcluster.SETTINGS.items() if k != "listen_addresses")
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "cpu model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": f"{version}, a private cluster per run on the same machine (initdb defaults and {knobs})",
        "httpx / uvicorn / sqlalchemy": f"{httpx.__version__} / {uvicorn.__version__} / {sa.__version__}",
    }


def _us(seconds: float | None, sessions: int) -> str:
    return "" if seconds is None else f"{seconds / sessions * 1e6:,.0f}"


def _label(r: dict[str, Any]) -> str:
    share = r.get("refreshing", 0) / r["sessions"] if r.get("refreshing") and r["path"] != "refresh" else 0
    return str(r["path"]) + (f" ({share:.0%} refreshing)" if share else "")


def _row(r: dict[str, Any]) -> str:
    per_batch = r["sql_statements_per_batch"]
    inner = r.get("sessions_per_s_in_sweep")
    cells = [
        _label(r),
        f"{r['sessions']:,}",
        f"{r['wall_s']:.1f}",
        str(r.get("sweep_processes") or (1 if r["path"] != "baseline" else "")),
        f"{r['sessions_per_s']:,.0f}",
        "" if inner is None else f"{inner:,.0f}",
        _us(r["worker_cpu_s"], r["sessions"]),
        _us(r["emulator_cpu_s"], r["sessions"]),
        _us(r["postgres_cpu_s"], r["sessions"]),
        f"{r['peak_rss_mb']:.0f}",
        f"{r['rows_per_check']:.3f}",
        f"{r['wal_bytes_per_check']:,.1f}",
        "1 per session" if per_batch is None else f"{per_batch:.2f}",
        f"{r['run_s']:.0f}",
        str(r.get("load_average_1m", "")),
    ]
    return "| " + " | ".join(cells) + " |"


def _db_row(r: dict[str, Any]) -> str:
    checked = int(r["counts"].get("checked", 0)) or r["sessions"]
    tables = ", ".join(f"{t} {n / checked:.3f}" for t, n in sorted(r["rows_written"].items())) or "none"
    heavy = r["sql_by_statement"][:2]
    top = "; ".join(f"`{s['query'][:48]}…` {s['calls']} calls, {s['wal_bytes'] / checked:,.0f} B/check" for s in heavy)
    requests = ", ".join(f"{p} {n:,}" for p, n in sorted(r["pangea_requests"].items()))
    return (
        f"| {_label(r)} | {r['sessions']:,} | {r['wal_bytes']:,} | {r['wal_bytes_per_check']:,.1f} | {tables} |"
        f" {top} | {requests} |"
    )


def _order(r: dict[str, Any]) -> tuple[int, int, int]:
    order = {p: i for i, p in enumerate(("baseline", "per_token", "bulk", "refresh"))}
    return order.get(r["path"], 9), r["sessions"], r.get("refreshing", 0)


def tables(results: dict[str, dict[str, Any]]) -> str:
    """The markdown between the markers: results, the database's share, routine vs refreshing, targets, commands."""
    rows = sorted(results.values(), key=_order)
    out = [
        "| path | sessions | process wall s | sweep processes | sessions/s (process) | sessions/s (sweep)"
        " | worker CPU µs/session | emulator CPU µs/session | PostgreSQL CPU µs/session"
        " | peak RSS MB (largest process) | rows written per check | WAL bytes per check | SQL statements per batch"
        " | whole run s (with seeding) | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(r) for r in rows),
        "",
        "The database's share, per run: WAL between `pg_current_wal_lsn()` before and after, rows written per check"
        " by table (`pg_stat_user_tables`), the two statements that wrote most WAL (`pg_stat_statements`), and the"
        " requests Pangea (the emulator) served.",
        "",
        "| path | sessions | WAL bytes | WAL bytes per check | rows per check, by table | heaviest statements"
        " | Pangea requests |",
        "|---|---:|---:|---:|---|---|---|",
        *(_db_row(r) for r in rows),
        "",
    ]
    out += _routine(rows)
    out += _targets(results)
    out += _growth(rows)
    settings: dict[str, str] = next((r["settings"] for r in rows if r["path"] != "baseline"), {})
    shared = {k: v for k, v in settings.items() if k != "SESSION_SYNC_REVALIDATION"}
    out += [
        "",
        "Worker settings of the engine runs: " + ", ".join(f"`{k}={v}`" for k, v in shared.items()) + ";"
        " `SESSION_SYNC_REVALIDATION=per_token` with the client token on the per-token path, `auto` (bulk with"
        " the service token) on the others.",
    ]
    out += ["", "Machine:", ""] + [f"- {k}: {v}" for k, v in machine().items()]
    out += ["", "Commands (each run in a fresh process):", "", "```sh"]
    out += [f"{r['command']}  # code at {r.get('commit', '?')}" for r in rows] + ["```"]
    return "\n".join(out)


def _routine(rows: list[dict[str, Any]]) -> list[str]:
    """Routine sweeps (nothing changed) beside the same sweep with some sessions refreshing."""
    pairs = [
        (plain, mixed)
        for mixed in rows
        if mixed.get("refreshing") and mixed["path"] in ("bulk", "per_token")
        for plain in rows
        if plain["path"] == mixed["path"] and plain["sessions"] == mixed["sessions"] and not plain.get("refreshing")
    ]
    if not pairs:
        return []
    lines = [
        "A routine sweep (every session healthy, nothing changed) beside the same sweep with some sessions inside"
        " their refresh margin:",
        "",
        "| path | sessions | case | refreshed | rows per check | WAL bytes per check | worker CPU µs/session"
        " | PostgreSQL CPU µs/session | sessions/s (sweep) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for plain, mixed in pairs:
        for case, r in (("routine", plain), (_label(mixed).split(" (", 1)[1].rstrip(")"), mixed)):
            inner = r.get("sessions_per_s_in_sweep")
            lines.append(
                f"| {r['path']} | {r['sessions']:,} | {case} | {r['counts'].get('refreshed', 0):,} |"
                f" {r['rows_per_check']:.3f} | {r['wal_bytes_per_check']:,.1f} |"
                f" {_us(r['worker_cpu_s'], r['sessions'])} | {_us(r['postgres_cpu_s'], r['sessions'])} |"
                f" {'' if inner is None else f'{inner:,.0f}'} |"
            )
    return [*lines, ""]


def _best(results: dict[str, dict[str, Any]], path: str) -> dict[str, Any] | None:
    runs = [r for r in results.values() if r["path"] == path and not r.get("refreshing")]
    return max(runs, key=lambda r: r["sessions_per_s"]) if runs else None


def _targets(results: dict[str, dict[str, Any]]) -> list[str]:
    base, token, bulk = _best(results, "baseline"), _best(results, "per_token"), _best(results, "bulk")
    lines = ["| target | measured | met |", "|---|---|---|"]
    for r in (r for r in (results.get("bulk:100000"), results.get("per_token:10000")) if r):
        rows_ok = r["rows_per_check"] <= TARGETS["rows"]
        wal_ok = r["wal_bytes_per_check"] <= TARGETS["wal"]
        lines.append(
            f"| routine check ({r['path']}, {r['sessions']:,}): ≤ 0.01 rows and ≤ 10 bytes of WAL |"
            f" {r['rows_per_check']:.3f} rows, {r['wal_bytes_per_check']:,.1f} B |"
            f" {'yes' if rows_ok and wal_ok else 'no'} |"
        )
    if token:
        ok = token["sessions_per_s"] >= TARGETS["per_token"]
        lines.append(
            f"| per-token ≥ 1,000 sessions/s (process) | {token['sessions_per_s']:,.0f} | {'yes' if ok else 'no'} |"
        )
    bulk100 = results.get("bulk:100000") or bulk
    if bulk100:
        ok = bulk100["sessions_per_s"] >= TARGETS["bulk"]
        inner = bulk100.get("sessions_per_s_in_sweep") or 0
        lines.append(
            f"| bulk ≥ 20,000 sessions/s through `sweep --once` at {bulk100['sessions']:,} |"
            f" {bulk100['sessions_per_s']:,.0f} (process), {inner:,.0f} (sweep) | {'yes' if ok else 'no'} |"
        )
    if base and token:
        ratio = token["sessions_per_s"] / base["sessions_per_s"]
        ok = ratio >= TARGETS["ratio"]
        lines.append(f"| ≥ 50x the baseline (per-token path) | {ratio:,.0f}x | {'yes' if ok else 'no'} |")
    small, large = results.get("bulk:10000"), results.get("bulk:1000000")
    if small and large:
        growth = large["peak_rss_mb"] / small["peak_rss_mb"]
        ok = growth <= TARGETS["rss_growth"]
        lines.append(
            f"| peak RSS at 1M within 1.3x of 10k (bulk) | {large['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB"
            f" = {growth:.2f}x | {'yes' if ok else 'no'} |"
        )
    return [*lines, ""]


def _growth(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["How the cost grows with N (same settings, fresh process per N):", "", "```"]
    lines.append(f"{'run':<28} {'N':>10} {'wall s':>8} {'sess/s':>8} {'µs/sess':>8} {'RSS MB':>7}  RSS")
    top = max((r["peak_rss_mb"] for r in rows), default=1)
    for r in rows:
        bar = "#" * round(30 * r["peak_rss_mb"] / top)
        lines.append(
            f"{_label(r):<28} {r['sessions']:>10,} {r['wall_s']:>8.1f} {r['sessions_per_s']:>8,.0f}"
            f" {r['worker_cpu_s'] / r['sessions'] * 1e6:>8.0f} {r['peak_rss_mb']:>7.0f}  {bar}"
        )
    return [*lines, "```"]


def report() -> None:
    """Rewrite the results part of docs/benchmarks.md."""
    text = REPORT.read_text() if REPORT.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    REPORT.write_text(f"{head}{BEGIN}\n{tables(load())}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    """``run`` (the matrix, ``--quick`` or ``--runs path:N[:share],...``, then report) or ``report``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.matrix", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--runs", default="", help="comma-separated path:sessions[:refreshing] (default: the matrix)")
    p.add_argument("--quick", action="store_true", help="the 10k runs only (a few minutes)")
    a = p.parse_args(argv)
    if a.command == "run":
        runs = parse_runs(a.runs) or list(QUICK_RUNS if a.quick else DEFAULT_RUNS)
        for path, sessions, refreshing in runs:
            print(f"{key_of(path, sessions, refreshing)} ...", file=sys.stderr, flush=True)
            result = run_one(path, sessions, refreshing)
            results = load()
            results[key_of(path, sessions, refreshing)] = result
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            print(f"  {result['sessions_per_s']:,.0f} sessions/s in {result['run_s']:.0f} s", file=sys.stderr)
    report()


if __name__ == "__main__":
    main()
