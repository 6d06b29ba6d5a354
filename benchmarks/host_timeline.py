"""One line from a step profiler window (NANOSLG_PROFILE_STEPS, NANOSLG_PROFILE_KERNELS=0 for an unprofiled one):
the worker's median host phases, and the scheduler's median time from a step's result to the plan it then forms
(the step after next, with overlap scheduling), read from the window's -scheduler.tsv beside it.

    python benchmarks/host_timeline.py /tmp/out/timeline-fp8-128.txt
"""
from __future__ import annotations

import os
import statistics
import sys


def scheduler_ms(tsv: str) -> list[float]:
    planned, result = {}, {}
    with open(tsv) as f:
        next(f)
        for line in f:
            step, sent, back = (line.rstrip("\n").split("\t") + [""])[:3]
            planned[int(step)] = float(sent)
            if back:
                result[int(step)] = float(back)
    return [1000 * (planned[s + 2] - t) for s, t in result.items() if s + 2 in planned and planned[s + 2] > t]


def main() -> None:
    path = sys.argv[1]
    with open(path) as f:
        medians = next((line.strip() for line in f if line.startswith("medians (ms): ")), "no medians line")
    tsv = f"{os.path.splitext(path)[0]}-scheduler.tsv"
    waits = scheduler_ms(tsv) if os.path.exists(tsv) else []
    scheduler = f"scheduler result to next plan {statistics.median(waits):.1f} ms (median of {len(waits)})" \
        if waits else "no scheduler timeline"
    print(f"{medians.removeprefix('medians (ms): ')}; {scheduler}")


if __name__ == "__main__":
    main()
