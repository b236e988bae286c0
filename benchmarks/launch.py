"""Run a command and write its own ``wait4`` rusage as JSON: how a measured process is started.

    python -m benchmarks.launch RUSAGE.json COMMAND [ARGS...]

Linux keeps a process's peak RSS across ``fork`` and ``exec``: ``ru_maxrss`` of a child counts
the pages it was forked with. A sweep started straight from the harness, which holds the seeded
sessions, so reported the harness's own size as its peak (724 MB "at 1M" was the seeding's memory,
not the sweep's). Started from this small launcher instead, the child is forked from a process of
a few megabytes, and its rusage (CPU and peak RSS) is its own and its children's only. The exit
status is passed on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: python -m benchmarks.launch RUSAGE.json COMMAND [ARGS...]")
    out, command = argv[0], argv[1:]
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    figures = {"utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss_kb": usage.ru_maxrss, "exit": code}
    with open(out, "w") as f:
        json.dump(figures, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
