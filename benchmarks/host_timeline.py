"""One line from a step profiler window (NANOSLG_PROFILE_STEPS, NANOSLG_PROFILE_KERNELS=0 for an unprofiled one):
the worker's median host phases, and the scheduler's median time from a step's result to the next plan it sends,
read from the window's -scheduler.tsv beside it.

    python benchmarks/host_timeline.py /tmp/out/timeline-fp8-128.txt
"""
from __future__ import annotations

import bisect
import os
import statistics
import sys


def scheduler_ms(tsv: str) -> list[float]:
    """For each step result, the time until the scheduler sent its next plan (in any layout: the first plan out
    after the result came in)."""
    planned, results = [], []
    with open(tsv) as f:
        for line in f:
            step, sent, back = (line.rstrip("\n").split("\t") + [""])[:3]
            if not step.isdigit():
                continue  # the header
            planned.append(float(sent))
            if back:
                results.append(float(back))
    planned.sort()
    waits = []
    for t in results:
        i = bisect.bisect_right(planned, t)
        if i < len(planned):
            waits.append(1000 * (planned[i] - t))
    return waits


def main() -> None:
    path = sys.argv[1]
    if not os.path.exists(path):
        print(f"no profile at {path} (the run ended before its window did)")
        return
    with open(path) as f:
        medians = next((line.strip() for line in f if line.startswith("medians (ms): ")), "no medians line")
    tsv = f"{os.path.splitext(path)[0]}-scheduler.tsv"
    waits = scheduler_ms(tsv) if os.path.exists(tsv) else []
    scheduler = f"scheduler result to next plan {statistics.median(waits):.1f} ms (median of {len(waits)})" \
        if waits else "no scheduler timeline"
    print(f"{medians.removeprefix('medians (ms): ')}; {scheduler}")


if __name__ == "__main__":
    main()
