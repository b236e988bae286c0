"""The long chaos soak, on demand: ``tests/chaos/test_soak.py`` for many minutes with a new seed each time.

    python -m benchmarks.chaos --minutes 30
    python -m benchmarks.chaos --minutes 5 --seed 1234      # replay a run
    python -m benchmarks.chaos --minutes 30 --postgres       # PostgreSQL restarts too (own cluster only!)

It runs the same test the suite runs for a minute (the harness has one home, ``tests/chaos``), so
it needs the test services: PostgreSQL on 127.0.0.1:5432 and ``redis-server`` installed (the soak
starts and kills a Redis of its own). The seed is printed first; the figures line comes last,
judged from Pangea's and the database's state. The exit status is pytest's: non-zero when any
figure that must be zero is not.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/chaos/test_soak.py::test_chaos_soak"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of chaos before the heal (default 30)")
    parser.add_argument("--seed", type=int, help="replay this seed (default: a new one)")
    parser.add_argument("--postgres", action="store_true", help="restart the local PostgreSQL cluster too")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    env = os.environ | {
        "SESSION_SYNC_CHAOS_MINUTES": str(args.minutes),
        "SESSION_SYNC_CHAOS_SEED": str(seed),
        "SESSION_SYNC_CHAOS_POSTGRES": "1" if args.postgres else "0",
    }
    print(f"chaos soak: {args.minutes:g} minutes, seed {seed}", flush=True)
    command = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", "-p", "no:logging"]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
