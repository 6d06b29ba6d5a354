"""Optional torch-profiler window over a worker's steps, for finding where step time goes.

NANOSLG_PROFILE_STEPS=START:COUNT profiles COUNT steps from step START and writes a kernel summary (and the GPU's
busy fraction of the window's wall time) to NANOSLG_PROFILE_OUT (default /tmp/nanoslg-profile.txt)."""
from __future__ import annotations

import os
import time


class StepProfiler:
    def __init__(self):
        spec = os.environ.get("NANOSLG_PROFILE_STEPS")
        self.start, self.count = (int(x) for x in spec.split(":")) if spec else (-1, 0)
        self.path = os.environ.get("NANOSLG_PROFILE_OUT", "/tmp/nanoslg-profile.txt")
        self.steps = 0
        self.prof = None
        self.t0 = 0.0

    def on_step(self) -> None:
        """Call once per launched step."""
        if self.count <= 0:
            return
        if self.steps == self.start:
            import torch.profiler as tp

            self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.steps == self.start + self.count and self.prof is not None:
            import torch
            from torch.autograd import DeviceType

            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            # Only the device's own rows (kernels, memcpys): a CPU op's row repeats the time of the kernels it
            # launched, which would count them twice.
            gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
            with open(self.path, "w") as f:
                f.write(f"{self.count} steps in {wall * 1000:.1f} ms wall; GPU kernels {gpu_us / 1000:.1f} ms "
                        f"({100 * gpu_us / 1e6 / wall:.0f} % busy)\n")
                f.write(events.table(sort_by="self_device_time_total", row_limit=25))
            self.prof = None
        self.steps += 1
