"""The scheduler's half of the step profiler (gpu_workers/step_profiler.py): for the steps of the window
NANOSLG_PROFILE_STEPS=START:COUNT, when each plan went out and when its result came back, written as a table to
NANOSLG_PROFILE_OUT with -scheduler.tsv. Beside the workers' timelines it shows how long a result takes to become the
next plan."""
from __future__ import annotations

import os
import time
from typing import Optional


class StepTimeline:
    def __init__(self) -> None:
        spec = os.environ.get("NANOSLG_PROFILE_STEPS")
        start, count = (int(x) for x in spec.split(":")) if spec else (-1, 0)
        self.window = range(start, start + count)
        stem = os.path.splitext(os.environ.get("NANOSLG_PROFILE_OUT", "/tmp/nanoslg-profile.txt"))[0]
        self.path = f"{stem}-scheduler.tsv"
        self.rows: dict[int, list[Optional[float]]] = {}  # step id -> [planned, result received]

    def planned(self, step_id: int) -> None:
        if step_id in self.window:
            self.rows[step_id] = [time.time(), None]

    def result(self, step_id: int) -> None:
        row = self.rows.get(step_id)
        if row is None:
            return
        row[1] = time.time()
        if step_id == self.window[-1]:
            with open(self.path, "w") as f:
                f.write("step\tplanned\tresult\n")
                for i, (sent, back) in sorted(self.rows.items()):
                    f.write(f"{i}\t{sent:.6f}\t{'' if back is None else f'{back:.6f}'}\n")
            self.rows = {}
