"""Timing a worker's steps: each step's device time (StepSpan), and an optional profiler window for finding where
step time goes.

NANOSLG_PROFILE_STEPS=START:COUNT profiles COUNT steps from step START and writes, to NANOSLG_PROFILE_OUT (default
/tmp/nanoslg-profile.txt; other ranks add -rankN): the device's busy fraction of the window's wall time, kernels by
device time, host operations by CPU time, and each step's host timeline (plan received, launched, reported), which
shows whether the host or the GPU sets the pace and how far TP ranks drift apart. NANOSLG_PROFILE_KERNELS=0 keeps only
the host timeline (no torch profiler, whose own cost per operation slows the launch it measures), with the median of
each phase, for windows as long as a whole run."""
from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from torch.profiler import profile


_active: Optional["StepProfiler"] = None  # the profiler whose window is open in this process


def mark(name: str) -> None:
    """Record when the current step's launch reached `name` (a phase of the host's work), in an open window only:
    the timeline then shows which phase of the launch takes the host's time."""
    if _active is not None and _active.timeline:
        _active.timeline[-1][4][name] = time.time()


class StepProfiler:
    def __init__(self, rank: int = 0):
        spec = os.environ.get("NANOSLG_PROFILE_STEPS")
        self.start, self.count = (int(x) for x in spec.split(":")) if spec else (-1, 0)
        path = os.environ.get("NANOSLG_PROFILE_OUT", "/tmp/nanoslg-profile.txt")
        stem, ext = os.path.splitext(path)
        self.path = path if rank == 0 else f"{stem}-rank{rank}{ext}"
        self.steps = 0
        self.kernels = os.environ.get("NANOSLG_PROFILE_KERNELS", "1") != "0"  # the torch profiler too
        self.open = False  # inside the window
        self.prof: Optional[profile] = None
        self.t0 = 0.0
        # [step id, plan received, launched, reported, {phase: time}] in seconds since the epoch
        self.timeline: list[list[Any]] = []

    def on_plan(self, step_id: int) -> None:
        """Call once per step, right after its plan arrived."""
        global _active
        if self.count <= 0:
            return
        if self.steps == self.start:
            _active, self.open = self, True
            if self.kernels:
                import torch.profiler as tp

                self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA])
                self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.steps == self.start + self.count and self.open:
            self._write()
        if self.open:
            self.timeline.append([step_id, time.time(), None, None, {}])
        self.steps += 1

    def launched(self) -> None:
        if self.open and self.timeline:
            self.timeline[-1][2] = time.time()

    def reported(self, step_id: int) -> None:
        if self.open:
            for row in reversed(self.timeline[-4:]):
                if row[0] == step_id:
                    row[3] = time.time()

    def _write(self) -> None:
        global _active
        _active, self.open = None, False
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        with open(self.path, "w") as f:
            if self.prof is not None:
                from torch.autograd import DeviceType

                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                # Only the device's own rows (kernels, memcpys): a CPU op's row repeats the time of the kernels it
                # launched, which would count them twice.
                gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
                f.write(f"{self.count} steps in {wall * 1000:.1f} ms wall; GPU kernels {gpu_us / 1000:.1f} ms "
                        f"({100 * gpu_us / 1e6 / wall:.0f} % busy)\n")
                f.write(events.table(sort_by="self_device_time_total", row_limit=25))
                f.write("\nhost operations by CPU time\n")
                f.write(events.table(sort_by="self_cpu_time_total", row_limit=25))
                self.prof = None
            else:
                f.write(f"{self.count} steps in {wall * 1000:.1f} ms wall (host timeline only)\n")
            f.write(f"\n{self._medians()}\n")
            f.write("\nstep\tplan_received\tlaunched\treported\thost phases (ms after the plan arrived)\n")
            for step_id, received, launched, reported, phases in self.timeline:
                times = "\t".join("" if v is None else f"{v:.6f}" for v in (received, launched, reported))
                marks = " ".join(f"{name} {1000 * (t - received):.1f}" for name, t in phases.items())
                f.write(f"{step_id}\t{times}\t{marks}\n")

    def _medians(self) -> str:
        """The window's median of each phase (ms after the plan arrived), of the launch, of the report after it, and
        of the time from one plan to the next (the step's pace)."""
        ms: dict[str, list[float]] = {}
        previous = None
        for _, received, launched, reported, phases in self.timeline:
            for name, t in phases.items():
                ms.setdefault(name, []).append(1000 * (t - received))
            if launched is not None:
                ms.setdefault("launched", []).append(1000 * (launched - received))
                if reported is not None:
                    ms.setdefault("reported after its launch", []).append(1000 * (reported - launched))
            if previous is not None:
                ms.setdefault("plan to plan", []).append(1000 * (received - previous))
            previous = received
        return "medians (ms): " + ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in ms.items())


class StepSpan:
    """A step's device time: CUDA events around it (host time on CPU, where the step runs as it is launched). A
    pause (the device waiting for the host, e.g. for a grammar's token bitmask between the forward pass and the
    sampling) does not count."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.paused: Optional[tuple[Any, Any]] = None  # (pause, resume) marks
        if self.cuda:
            self.start, self.stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
            self.t1: Optional[float] = None  # set by end()

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pause(self) -> None:
        self.paused = (self._mark(), None)

    def resume(self) -> None:
        if self.paused is not None and self.paused[1] is None:
            self.paused = (self.paused[0], self._mark())

    def end(self) -> None:
        self.resume()
        if self.cuda:
            self.stop.record()
        else:
            self.t1 = time.perf_counter()

    def done(self) -> bool:
        """Whether the device has finished the step (call after end())."""
        return not self.cuda or self.stop.query()

    def ms(self) -> float:
        if self.cuda:
            self.stop.synchronize()
            total = self.start.elapsed_time(self.stop)
            gap = self.paused[0].elapsed_time(self.paused[1]) if self.paused is not None else 0.0
        else:
            total = 1000 * ((self.t1 or time.perf_counter()) - self.t0)
            gap = 1000 * (self.paused[1] - self.paused[0]) if self.paused is not None else 0.0
        return total - gap
