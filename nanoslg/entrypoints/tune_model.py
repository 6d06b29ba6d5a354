"""`nanoslg tune`'s cost model and search. The model is fitted to the engine's own timings (gpu_workers/op_profiler.py):
a step of d decode rows at context c plus p prefill tokens costs the GEMMs at d + p tokens, the decode attention
over d x c KV entries, the prefill attention, the LM head on the rows that sample, the all-reduces, and the rest
(norms, rotary, sampling, launch), which is fitted from whole-step timings as the part the operations do not explain.

The search is exhaustive (a few hundred candidates): for each running target R and dense batch D it predicts the
steady state of the global batch (each step finishes d / O requests and admits as many, so it carries d decodes and
d x I / O prefill tokens, d = min(R, D / (1 + I / O))) and its throughput; the nano-batch split is priced by the
speed-up measured on the real step, so an overlap that does not win on this GPU is never picked."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import numpy.typing as npt

R_GRID = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
D_FACTORS = (1.0, 1.15, 1.3, 1.6, 2.0)  # D as a multiple of the steady-state need R x (1 + I / O)
D_ROUND = 128  # D in whole GEMM tiles of rows


def _interp(points: list[list[float]], x: float) -> float:
    """Piecewise-linear through (x, y) points, extended linearly past the last two (GEMM time grows linearly with
    tokens once the GPU is full) and proportionally below the first."""
    pts = sorted(points)
    xs = [p[0] for p in pts]
    if not pts:
        return 0.0
    if x <= xs[0]:
        return pts[0][1] * max(x, 0) / xs[0] if xs[0] else pts[0][1]
    i = min(max(1, bisect.bisect_left(xs, x)), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _fit(rows: list[list[float]], features: Callable[..., list[float]]) -> npt.NDArray[np.float64]:
    """Least squares, non-negative coefficients (a negative cost per token would reward bigger steps for free)."""
    if not rows:
        return np.zeros(len(features(*([1] * 2))))
    a = np.array([features(*r[:-1]) for r in rows], dtype=float)
    y = np.array([r[-1] for r in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return np.clip(coef, 0, None)


def _decode_features(b: float, c: float) -> list[float]:
    return [1.0, b, b * c]


def _prefill_features(q: float, c: float) -> list[float]:
    return [1.0, q, q * (c + q / 2)]


@dataclass
class CostModel:
    gemm: list[list[float]]  # [[tokens, ms]]
    lm_head: list[list[float]]  # [[rows, ms]]
    allreduce: list[list[float]]  # [[tokens, ms]]
    decode_coef: npt.NDArray[np.float64]
    prefill_coef: npt.NDArray[np.float64]
    other_coef: npt.NDArray[np.float64]  # ms = a + b * tokens, the rest of a step

    @classmethod
    def fit(cls, ops: dict[str, Any], steps: list[list[Any]]) -> "CostModel":
        model = cls(ops["gemm"], ops["lm_head"], ops["allreduce"], _fit(ops["decode_attention"], _decode_features),
                    _fit(ops["prefill_attention"], _prefill_features), np.zeros(2))
        # the rest: whole unsplit steps minus what the operations explain
        rest = [[d + p, ms - model.parts_ms(d, c, p, c if p else 0)] for d, c, p, nano, _, sp, ms, _ in steps
                if nano == 1 and not sp]
        model.other_coef = _fit(rest, lambda m, _=None: [1.0, m]) if rest else np.zeros(2)
        return model

    def parts_ms(self, decodes: float, context: float, prefill: float, prefill_context: float) -> float:
        m = decodes + prefill
        sampled = decodes + (1 if prefill else 0)
        t = _interp(self.gemm, m) + _interp(self.lm_head, sampled) + _interp(self.allreduce, m)
        if decodes:
            t += float(np.dot(self.decode_coef, _decode_features(decodes, context)))
        if prefill:
            t += float(np.dot(self.prefill_coef, _prefill_features(prefill, prefill_context)))
        return t

    def step_ms(self, decodes: float, context: float, prefill: float, prefill_context: float) -> float:
        m = decodes + prefill
        return self.parts_ms(decodes, context, prefill, prefill_context) + float(self.other_coef[0]) + \
            float(self.other_coef[1]) * m


@dataclass
class Candidate:
    running_target: int
    dense_batch_tokens: Optional[int]  # None: derived from the traffic (the built-in default)
    nano_batches: int
    nano_overlap: str
    sequence_parallel: bool
    predicted_tokens_per_s: float
    decodes: float  # the predicted steady state: decode rows, prefill tokens and step time
    prefill: float
    step_ms: float
    measured_tokens_per_s: Optional[float] = None


def steady_state(model: CostModel, r: int, d_tokens: Optional[int], mean_in: float, mean_out: float
                 ) -> tuple[float, float, float, float]:
    """(decodes, prefill tokens, step ms, tokens/s) of the global batch's steady state."""
    ratio = mean_in / mean_out
    dense = d_tokens if d_tokens else r * (1 + ratio) * 1.1
    decodes = min(float(r), dense / (1 + ratio))
    prefill = decodes * ratio
    step = model.step_ms(decodes, mean_in + mean_out / 2, prefill, mean_in / 2)
    return decodes, prefill, step, 1000 * (decodes + prefill) / step


def search(model: CostModel, mean_in: float, mean_out: float, max_running: int, max_tokens: int,
           nano_speedups: dict[tuple[int, str, bool], float]) -> list[Candidate]:
    """Every candidate, best predicted first. nano_speedups: (nano, overlap, sequence parallel) -> unsplit step
    time / that variant's, measured; (1, "none", False) is 1."""
    out: list[Candidate] = []
    ratio = mean_in / mean_out
    # the grid up to the cap, and the cap itself (often what memory allows) in steps of 16
    running = sorted({x for x in R_GRID if x <= max_running} | {max(1, max_running // 16 * 16)})
    for r in running:
        need = r * (1 + ratio)
        tiles = lambda x: -(-int(x) // D_ROUND) * D_ROUND  # noqa: E731
        dense_options = [None] + sorted({tiles(need * f) for f in D_FACTORS if r < tiles(need * f) <= max_tokens})
        for d in dense_options:
            decodes, prefill, step, tps = steady_state(model, r, d, mean_in, mean_out)
            for (nano, overlap, sp), speedup in nano_speedups.items():
                out.append(Candidate(r, d, nano, overlap, sp, tps * speedup, decodes, prefill, step / speedup))
    return sorted(out, key=lambda c: -c.predicted_tokens_per_s)


MIN_GAIN = 0.03  # a tuned config must beat the defaults by this much at least (and by more than the noise)


@dataclass(slots=True)
class Verdict:
    """What tune writes: the chosen candidate, or None when the defaults are best, and why."""

    chosen: Optional[Candidate]
    defaults_tokens_per_s: float  # the mean of the defaults' runs
    noise: float  # the defaults' run-to-run spread, relative to their mean
    gain: float  # the best candidate's measured rate over the defaults', minus 1
    threshold: float  # the gain a candidate needed: max(MIN_GAIN, noise)

    @property
    def reason(self) -> str:
        spread = f"the defaults measured {self.defaults_tokens_per_s:.0f} tok/s (run-to-run noise {self.noise:.1%})"
        if self.chosen is None:
            return (f"the defaults are best: {spread}, and no candidate beat them by more than "
                    f"{self.threshold:.1%} (the best by {self.gain:+.1%}); the tuned config sets nothing")
        return f"tuned beats the defaults by {self.gain:+.1%}: {spread}, {self.threshold:.1%} needed"


def decide(defaults_runs: list[float], checked: list[Candidate], min_gain: float = MIN_GAIN) -> Verdict:
    """The best checked candidate when it beats the mean of the defaults' runs by more than max(min_gain, their
    relative spread); otherwise the defaults (chosen None). A tuned config therefore never runs slower than the
    defaults by more than the noise the run itself showed."""
    mean = sum(defaults_runs) / len(defaults_runs)
    noise = (max(defaults_runs) - min(defaults_runs)) / mean if mean > 0 else 0.0
    threshold = max(min_gain, noise)
    measured = [c for c in checked if c.measured_tokens_per_s is not None]
    best = max(measured, key=lambda c: c.measured_tokens_per_s or 0.0, default=None)
    gain = (best.measured_tokens_per_s or 0.0) / mean - 1 if best is not None and mean > 0 else float("-inf")
    return Verdict(best if best is not None and gain > threshold else None, mean, noise, gain, threshold)
