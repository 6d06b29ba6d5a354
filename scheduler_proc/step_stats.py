"""What each step computed and how long the GPU took for it, summed by step kind: the raw material of
`nanoslg bench throughput --breakdown` (nanoslg/entrypoints/roofline.py turns it into times against rooflines).

The scheduler knows each step's shape when it plans it; the driver worker reports the step's GPU time (CUDA events
around it) with the result, and on sampled steps the time of each operation class (GEMM, attention, collective,
other). Counters only grow, so a reader takes the difference of two snapshots around the window it measures
(nanoslg/entrypoints/roofline.py: difference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from scheduler_proc.request import Request

KINDS = ("prefill", "mixed", "decode")
COUNTERS = ("steps", "tokens", "decode_rows", "prefill_tokens", "decode_kv_tokens", "prefill_attn_pairs",
            "sampled", "gpu_ms")
OP_CLASSES = ("gemm", "attention", "collective", "other")


@dataclass(slots=True)
class StepShape:
    num_tokens: int = 0
    num_decode: int = 0  # rows with one new token
    prefill_tokens: int = 0  # tokens of rows with more than one
    decode_kv_tokens: int = 0  # KV entries the decode rows read (their context lengths)
    prefill_attn_pairs: int = 0  # (query, key) pairs of the prefill rows' causal attention
    sampled: int = 0  # rows that sample a token (the LM head runs on these only)

    @property
    def kind(self) -> str:
        """prefill: decode rows are under a tenth of the tokens; decode: no prefill token; mixed: the rest."""
        if not self.prefill_tokens:
            return "decode"
        return "prefill" if 10 * self.num_decode < self.num_tokens else "mixed"


@dataclass(slots=True)
class InFlightStep:
    rids: list[str]
    num_tokens: int
    shape: StepShape  # what the step computes, for the run's breakdown


class StepStats:
    def __init__(self) -> None:
        self.counts: dict[str, dict[str, float]] = {kind: {name: 0 for name in COUNTERS} for kind in KINDS}
        self.timed: dict[str, dict[str, float]] = {
            kind: {name: 0 for name in COUNTERS} | {f"{op}_ms": 0.0 for op in OP_CLASSES} for kind in KINDS}

    @staticmethod
    def shape(chunks: list[tuple[Request, int, int, int]]) -> StepShape:
        """The shape of a step from the scheduler's chunks (request, start, end, pending)."""
        s = StepShape()
        for r, start, end, pending in chunks:
            q = end - start
            s.num_tokens += q
            if q == 1:
                s.num_decode += 1
                s.decode_kv_tokens += end
            else:
                s.prefill_tokens += q
                s.prefill_attn_pairs += q * start + q * (q + 1) // 2
            if pending or end == r.num_tokens:
                s.sampled += 1
        return s

    def record(self, shape: StepShape, gpu_ms: float, op_ms: Optional[dict[str, float]]) -> None:
        if not shape.num_tokens:
            return
        values = {"steps": 1, "tokens": shape.num_tokens, "decode_rows": shape.num_decode,
                  "prefill_tokens": shape.prefill_tokens, "decode_kv_tokens": shape.decode_kv_tokens,
                  "prefill_attn_pairs": shape.prefill_attn_pairs, "sampled": shape.sampled, "gpu_ms": gpu_ms}
        for name, v in values.items():
            self.counts[shape.kind][name] += v
        if op_ms:
            timed = self.timed[shape.kind]
            for name, v in values.items():
                timed[name] += v
            for op in OP_CLASSES:
                timed[f"{op}_ms"] += float(op_ms.get(op, 0.0))

    def totals(self) -> dict[str, Any]:
        return {"counts": {k: dict(v) for k, v in self.counts.items()},
                "timed": {k: dict(v) for k, v in self.timed.items()}}
