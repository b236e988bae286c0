"""Summarize a py-spy profile of ``benchmarks.sweep --profile DIR``: where each process spends its CPU.

    python -m benchmarks.sweep --sessions 100000 --path bulk --profile /tmp/prof
    python -m benchmarks.profile /tmp/prof/sweep.txt [--top 25] [--under worker.]

py-spy's ``raw`` format is one line per distinct stack (frames root first, ``;``-separated) and its
sample count. This prints the share of samples by *self* frame (where the CPU is burnt) and by
*inclusive* frame (what the time is spent under), the way one reads a flame graph, but as text
that fits a report. py-spy samples threads that hold the GIL or run native code (idle ones are left
out), so shares are of busy time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """``func (path/to/module.py:12)`` as ``module.py:func``, the site-packages prefix dropped."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/wt-bench/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{match['func']}"


def load(path: Path) -> list[tuple[list[str], int]]:
    """The stacks of a raw py-spy file (frames root first) with their sample counts."""
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append(([_name(f) for f in frames.split(";")], int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]], top: int, under: str) -> str:
    """Self and inclusive shares, biggest first; ``under`` keeps only frames whose name contains it."""
    total = sum(n for _, n in stacks) or 1
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{total} samples"]
    for title, counter in (("self", self_time), ("inclusive", inclusive)):
        out += ["", f"{title}:"]
        shown = [(k, v) for k, v in counter.most_common() if under in k][:top]
        out += [f"{100 * v / total:6.1f} %  {k}" for k, v in shown]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Print the summary of one raw profile."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--under", default="", help="only frames whose name contains this (e.g. worker/)")
    a = p.parse_args(argv)
    print(summarize(load(a.file), a.top, a.under))


if __name__ == "__main__":
    main()
