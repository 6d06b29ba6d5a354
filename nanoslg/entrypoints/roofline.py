"""The roofline breakdown of an offline run (`nanoslg bench throughput --breakdown`): where the GPU's time went, by
step kind and by operation class, each class against its own roofline measured in the same run, and the workload's
serial ceiling (every GEMM at the matmul peak plus every KV read at the copy bandwidth, one after the other).

Inputs: the scheduler's step counters around the timed run (scheduler_proc/step_stats.py: each step's shape and the
driver rank's device time; per operation class on sampled steps) and the model's shape. Times are the driver rank's
(TP rank 0 of the last pipeline stage); with TP the other ranks do the same work, with PP each stage its layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from nanoslg.model_spec import ModelSpec

OPS = ("gemm", "attention", "collective", "other")
KINDS = ("prefill", "mixed", "decode")


def difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """after - before for two snapshots of the scheduler's step counters (its debug state's "step_stats")."""
    return {part: {kind: {name: after[part][kind][name] - before[part][kind].get(name, 0)
                          for name in after[part][kind]} for kind in after[part]} for part in after}


@dataclass(slots=True)
class RankCosts:
    """What one token (or one row, pair, KV entry) costs the driver rank."""

    gemm_flops_per_token: float  # the decoder layers' projections
    lm_head_flops_per_row: float  # only rows that sample
    kv_bytes_per_token: float  # KV one decode row reads per context token
    attn_flops_per_pair: float  # per (query, key) pair of a prefill row's causal attention

    @classmethod
    def of(cls, spec: ModelSpec, tp: int, pp: int, dtype_bytes: int) -> "RankCosts":
        layers = spec.num_layers // pp  # the last stage (earlier stages take the remainder)
        hd, h = spec.head_dim, spec.hidden_size
        heads, kv_heads = spec.num_heads // tp, max(1, spec.num_kv_heads // tp)
        per_layer = h * (heads + 2 * kv_heads) * hd + heads * hd * h + 3 * h * spec.intermediate_size // tp
        return cls(2.0 * per_layer * layers, 2.0 * spec.vocab_size * h / tp,
                   float(layers * 2 * kv_heads * hd * dtype_bytes), 4.0 * heads * hd * layers)


def breakdown(stats: dict[str, Any], costs: RankCosts, peak_tflops: Optional[float], copy_tbps: Optional[float],
              elapsed_s: float, optimum_tokens_per_s: Optional[float]) -> dict[str, Any]:
    """stats: difference() of the step counters over the run. Seconds per step kind and operation class, each class's
    efficiency against its roofline, the serial ceiling and the achieved share of the optimum (the rooflines and
    the ceiling only where the peaks were measured, i.e. on a GPU)."""
    counts, timed = stats["counts"], stats["timed"]
    kinds, ops = {}, {op: 0.0 for op in OPS}
    unsampled = 0.0
    total = {k: sum(counts[kind][k] for kind in KINDS) for k in counts["decode"]}
    for kind in KINDS:
        c, t = counts[kind], timed[kind]
        gpu_s = c["gpu_ms"] / 1000
        kinds[kind] = {"steps": int(c["steps"]), "tokens": int(c["tokens"]), "gpu_s": gpu_s,
                       "timed_steps": int(t["steps"])}
        if t["steps"] and t["gpu_ms"] > 0:
            scale = c["gpu_ms"] / t["gpu_ms"]  # sampled steps stand for every step of their kind
            for op in OPS:
                ops[op] += t[f"{op}_ms"] * scale / 1000
        else:
            unsampled += gpu_s
    busy_s = sum(k["gpu_s"] for k in kinds.values())
    ideal = {}
    if peak_tflops and copy_tbps:
        peak, bw = peak_tflops * 1e12, copy_tbps * 1e12
        ideal = {
            "gemm": (total["tokens"] * costs.gemm_flops_per_token + total["sampled"] * costs.lm_head_flops_per_row)
            / peak,
            "attention": total["decode_kv_tokens"] * costs.kv_bytes_per_token / bw
            + total["prefill_attn_pairs"] * costs.attn_flops_per_pair / peak,
        }
    ceiling_s = sum(ideal.values())
    tokens = total["tokens"]
    optimum = optimum_tokens_per_s or 0
    result = {
        "elapsed_s": elapsed_s, "gpu_busy_s": busy_s, "gpu_idle_s": max(0.0, elapsed_s - busy_s),
        "kinds": kinds, "unsampled_s": unsampled,
        "ops": {op: {"s": ops[op], "ideal_s": ideal.get(op),
                     "efficiency": ideal[op] / ops[op] if op in ideal and ops[op] > 0 else None} for op in OPS},
        "rooflines": {"matmul_tflops": peak_tflops, "copy_tbps": copy_tbps},
        "serial_ceiling_s": ceiling_s,
        "serial_ceiling_percent": 100 * tokens / ceiling_s / optimum if ceiling_s and optimum else None,
        "achieved_percent": 100 * tokens / elapsed_s / optimum if elapsed_s and optimum else None,
    }
    # Where the run falls short of the ceiling, in seconds of the run: idle GPU, each class beyond its roofline.
    short = {"gpu idle": result["gpu_idle_s"]}
    for op in OPS:
        short[f"{op} beyond roofline" if op in ideal else op] = ops[op] - ideal.get(op, 0.0)
    if unsampled:
        short["steps of an unsampled kind"] = unsampled
    result["shortfall_s"] = short
    return result


def format_breakdown(b: dict[str, Any]) -> str:
    lines = [f"{' Roofline breakdown (driver rank) ':=^72}",
             f"{'step kind':<12}{'steps':>9}{'tokens':>12}{'GPU s':>10}{'share':>9}{'timed':>8}"]
    run = b["elapsed_s"] or 1.0
    for kind, k in b["kinds"].items():
        lines.append(f"{kind:<12}{k['steps']:>9}{k['tokens']:>12}{k['gpu_s']:>10.2f}{100 * k['gpu_s'] / run:>8.1f}%"
                     f"{k['timed_steps']:>8}")
    lines.append(f"{'GPU idle':<12}{'':>9}{'':>12}{b['gpu_idle_s']:>10.2f}{100 * b['gpu_idle_s'] / run:>8.1f}%")
    r = b["rooflines"]
    lines += ["", f"{'operation':<12}{'s':>10}{'roofline s':>12}{'efficiency':>12}   roofline"]
    roof = {"gemm": f"matmul peak {r['matmul_tflops'] or 0:.0f} TFLOP/s",
            "attention": f"copy {r['copy_tbps'] or 0:.2f} TB/s (decode), matmul peak (prefill)",
            "collective": "no link bandwidth measured", "other": "none"}
    for op, o in b["ops"].items():
        ideal = "" if o["ideal_s"] is None else f"{o['ideal_s']:.2f}"
        eff = "" if o["efficiency"] is None else f"{100 * o['efficiency']:.1f}%"
        lines.append(f"{op:<12}{o['s']:>10.2f}{ideal:>12}{eff:>12}   {roof[op]}")
    if b["serial_ceiling_percent"] is not None:
        lines += ["", f"serial ceiling: {b['serial_ceiling_percent']:.1f} % of the optimum "
                  f"({b['serial_ceiling_s']:.2f} s of GEMM and KV reads at their rooflines); achieved "
                  f"{b['achieved_percent']:.1f} % in {b['elapsed_s']:.2f} s"]
    lines.append("short of the ceiling by: " + ", ".join(f"{k} {v:.2f} s ({100 * v / run:.1f} %)"
                                                          for k, v in b["shortfall_s"].items()))
    return "\n".join(lines)
