"""The benchmark matrix: every path and size, each in a fresh process, and the tables of ``docs/benchmarks.md``.

    python -m benchmarks.matrix run              # the whole matrix (about 15 minutes), then the report
    python -m benchmarks.matrix run --runs bulk:1000000
    python -m benchmarks.matrix report           # rewrite the tables from benchmarks/results.json

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

#: The matrix: (path, sessions). The baseline is slow by nature (one round trip and one commit per session).
DEFAULT_RUNS = (
    ("baseline", 1_000),
    ("per_token", 10_000),
    ("per_token", 100_000),
    ("bulk", 10_000),
    ("bulk", 100_000),
    ("bulk", 1_000_000),
    ("refresh", 10_000),
)
#: Worker settings every run shares (the sweep's own defaults are these too).
COMMON = ("--concurrency", "128", "--batch-size", "1000", "--batches-in-flight", "3", "--latency-ms", "50")
#: Targets from issue 7, on this machine with the emulator at 50 ms.
TARGETS = {"per_token": 1_000, "bulk": 20_000, "ratio": 50, "rss_growth": 1.3}


def run_one(path: str, sessions: int) -> dict[str, Any]:
    """One ``benchmarks.sweep`` run in a fresh interpreter; its JSON plus how long the whole run took."""
    command = [sys.executable, "-m", "benchmarks.sweep", "--sessions", str(sessions), "--path", path, *COMMON]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["run_s"] = round(time.perf_counter() - started, 1)
    result["command"] = "python -m benchmarks.sweep " + " ".join(command[3:])
    return result


def load() -> dict[str, dict[str, Any]]:
    """Stored results by ``path:sessions``."""
    return dict(json.loads(RESULTS.read_text())) if RESULTS.exists() else {}


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import httpx
    import sqlalchemy as sa
    import uvicorn

    from benchmarks.sweep import DEFAULT_PG

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    engine = sa.create_engine(DEFAULT_PG.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        pg = str(conn.execute(sa.text("SHOW server_version")).scalar())
        knobs = {
            name: str(conn.execute(sa.text(f"SHOW {name}")).scalar())
            for name in ("shared_buffers", "synchronous_commit", "fsync", "autovacuum")
        }
    engine.dispose()
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "cpu model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg + " (" + ", ".join(f"{k}={v}" for k, v in knobs.items()) + "), same machine",
        "httpx / uvicorn / sqlalchemy": f"{httpx.__version__} / {uvicorn.__version__} / {sa.__version__}",
    }


def _row(r: dict[str, Any]) -> str:
    per_batch = r["sql_statements_per_batch"]
    cells = [
        r["path"],
        f"{r['sessions']:,}",
        f"{r['wall_s']:.1f}",
        f"{r['sessions_per_s']:,.0f}",
        f"{r['worker_cpu_s_per_1000'] * 1000:.0f} ms",
        f"{r['peak_rss_mb']:.0f}",
        "1 per session" if per_batch is None else f"{per_batch:.2f}",
        f"{r['emulator_cpu_s']:.1f}",
        f"{r['postgres_cpu_s']:.1f}",
        f"{r['run_s']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def tables(results: dict[str, dict[str, Any]]) -> str:
    """The markdown between the markers: results, targets, growth with N, machine, commands."""
    order = {p: i for i, p in enumerate(("baseline", "per_token", "bulk", "refresh"))}
    rows = sorted(results.values(), key=lambda r: (order.get(r["path"], 9), r["sessions"]))
    out = [
        "| path | sessions | wall s | sessions/s | worker CPU per 1,000 | peak RSS MB | SQL statements per batch"
        " | emulator CPU s | PostgreSQL CPU s | whole run s (with seeding) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(r) for r in rows),
        "",
    ]
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
    out += [r["command"] for r in rows] + ["```"]
    return "\n".join(out)


def _best(results: dict[str, dict[str, Any]], path: str) -> dict[str, Any] | None:
    runs = [r for r in results.values() if r["path"] == path]
    return max(runs, key=lambda r: r["sessions_per_s"]) if runs else None


def _targets(results: dict[str, dict[str, Any]]) -> list[str]:
    base, token, bulk = _best(results, "baseline"), _best(results, "per_token"), _best(results, "bulk")
    lines = ["| target | measured | met |", "|---|---|---|"]
    if token:
        ok = token["sessions_per_s"] >= TARGETS["per_token"]
        lines.append(f"| per-token ≥ 1,000 sessions/s | {token['sessions_per_s']:,.0f} | {'yes' if ok else 'no'} |")
    if bulk:
        ok = bulk["sessions_per_s"] >= TARGETS["bulk"]
        lines.append(f"| bulk ≥ 20,000 sessions/s | {bulk['sessions_per_s']:,.0f} | {'yes' if ok else 'no'} |")
    if base and token:
        ratio = token["sessions_per_s"] / base["sessions_per_s"]
        ok = ratio >= TARGETS["ratio"]
        lines.append(f"| ≥ 50x the baseline (per-token path) | {ratio:,.0f}x | {'yes' if ok else 'no'} |")
    if base and bulk:
        lines.append(f"| (bulk path vs baseline) | {bulk['sessions_per_s'] / base['sessions_per_s']:,.0f}x | |")
    small, large = results.get("bulk:10000"), results.get("bulk:1000000")
    if small and large:
        growth = large["peak_rss_mb"] / small["peak_rss_mb"]
        ok = growth <= TARGETS["rss_growth"]
        lines.append(
            f"| peak RSS at 1M within 1.3x of 10k (bulk) | {large['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB"
            f" = {growth:.2f}x | {'yes' if ok else 'no'} |"
        )
    refresh = _best(results, "refresh")
    if refresh:
        lines.append(f"| refresh throughput reported | {refresh['sessions_per_s']:,.0f} sessions/s | yes |")
    return [*lines, ""]


def _growth(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["How the cost grows with N (same settings, fresh process per N):", "", "```"]
    lines.append(f"{'path':<10} {'N':>10} {'wall s':>8} {'sess/s':>8} {'CPU ms/1k':>10} {'RSS MB':>7}  RSS")
    top = max((r["peak_rss_mb"] for r in rows), default=1)
    for r in rows:
        bar = "#" * round(30 * r["peak_rss_mb"] / top)
        lines.append(
            f"{r['path']:<10} {r['sessions']:>10,} {r['wall_s']:>8.1f} {r['sessions_per_s']:>8,.0f}"
            f" {r['worker_cpu_s_per_1000'] * 1000:>10.0f} {r['peak_rss_mb']:>7.0f}  {bar}"
        )
    return [*lines, "```"]


def report() -> None:
    """Rewrite the results part of docs/benchmarks.md."""
    text = REPORT.read_text() if REPORT.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    REPORT.write_text(f"{head}{BEGIN}\n{tables(load())}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    """``run`` (the matrix or ``--runs path:N,...``, then report) or ``report``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.matrix", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--runs", default="", help="comma-separated path:sessions (default: the whole matrix)")
    a = p.parse_args(argv)
    if a.command == "run":
        runs = [(s.split(":")[0], int(s.split(":")[1])) for s in a.runs.split(",") if s] or list(DEFAULT_RUNS)
        for path, sessions in runs:
            print(f"{path} {sessions:,} ...", file=sys.stderr, flush=True)
            result = run_one(path, sessions)
            results = load()
            results[f"{path}:{sessions}"] = result
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            print(f"  {result['sessions_per_s']:,.0f} sessions/s in {result['run_s']:.0f} s", file=sys.stderr)
    report()


if __name__ == "__main__":
    main()
