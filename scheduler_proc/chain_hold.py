"""Just-in-time chaining at low load (overlap scheduling, one pipeline stage).

Overlap scheduling plans step N+1 as soon as step N is launched, chaining each running request's next decode on the
token N will sample, so the GPU never waits for the host. At low load that step is a small decode-only step, and a
request arriving while N runs has to wait behind N and N+1 before its prefill starts: 1.5 steps on average. Held
instead until shortly before N should end, N+1 takes a request that arrives meanwhile as a mixed step, and the wait
shrinks to the rest of N. The hold applies only while the plan would be nothing but chained decodes of a few rows
(nothing waits, nothing prefills) and a decode step's device time is known; it ends LEAD_MS plus a fifth of the
step before N's predicted end, time enough for the worker to receive and launch N+1 while N still runs.
`NANOSLG_CHAIN_HOLD=0` turns it off."""
from __future__ import annotations

import os
from typing import Optional

from scheduler_proc.scheduler import Scheduler
from scheduler_proc.step_stats import StepShape

MAX_ROWS = 16  # low load: a decode step of at most this many rows
LEAD_MS = 2.0  # the hold ends this long, plus a fifth of the step, before the step in flight should end
SMOOTHING = 0.2  # weight of the newest decode step in the running estimate of a decode step's device time


class ChainHold:
    def __init__(self, core: Scheduler, enabled: bool = True):
        """enabled: on a GPU (a CPU worker computes each step as it receives it: nothing to gain there)."""
        self.core = core
        self.enabled = enabled and os.environ.get("NANOSLG_CHAIN_HOLD", "1") != "0"
        self.decode_ms: Optional[float] = None  # a low-load decode step's device time, smoothed
        self.published: dict[int, float] = {}  # step id -> when its plan went out (monotonic seconds)
        self.last_result_at = 0.0

    def on_publish(self, step_id: int, now: float) -> None:
        self.published[step_id] = now

    def on_result(self, step_id: int, shape: Optional[StepShape], gpu_ms: Optional[float], now: float) -> None:
        self.published.pop(step_id, None)
        self.last_result_at = now
        if shape is not None and gpu_ms and not shape.prefill_tokens and 0 < shape.num_decode <= MAX_ROWS:
            self.decode_ms = gpu_ms if self.decode_ms is None else \
                (1 - SMOOTHING) * self.decode_ms + SMOOTHING * gpu_ms

    def until(self, now: float) -> Optional[float]:
        """When the next plan may go out, if it is held now (monotonic seconds), else None."""
        core = self.core
        if not self.enabled or self.decode_ms is None or not core.overlap or core.micro_batches != 1 or \
                len(core.steps_in_flight) != 1 or core.waiting:
            return None
        (step_id, step), = core.steps_in_flight.items()
        if step.shape.prefill_tokens or not 0 < step.shape.num_decode <= MAX_ROWS:
            return None
        if any(not r.in_flight for r in core.running):  # something to prefill or decode at once
            return None
        # the step in flight started when it was launched and the one before it had finished
        started = max(self.published.get(step_id, now), self.last_result_at)
        release = started + (self.decode_ms * 0.8 - LEAD_MS) / 1000
        return release if release > now else None
