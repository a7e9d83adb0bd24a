"""Peak memory of a ``nirdml`` command: the largest resident set of its process tree.

``python benchmarks/memory.py -- train PRESET --set ...`` runs ``python -m nirdml ARGS`` and
samples, every 0.1 s, the summed RSS of the command and its child processes (DataLoader
workers included), and reports that peak with the kernel's own peak of the largest single
process (``ru_maxrss``). Results: benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _rss(pid: int) -> int:
    """Resident bytes of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(args: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``python -m nirdml ARGS``; its wall time, peak tree RSS and peak process RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nirdml", *args], env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_rss(p) for p in [proc.pid, *_children(proc.pid)]))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"rc": proc.returncode, "wall_s": wall, "tree_peak": peak, "max_process": maxrss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nirdml_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.nirdml_args if a != "--"]
    r = measure(argv, dict(os.environ))
    print(
        f"rc {r['rc']} | {r['wall_s']:.0f} s | peak RSS of the process tree "
        f"{r['tree_peak'] / 2**30:.2f} GiB | largest process {r['max_process'] / 2**30:.2f} GiB"
        f" | nirdml {' '.join(argv)}"
    )


if __name__ == "__main__":
    main()
