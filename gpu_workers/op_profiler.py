"""Timings of this rank's real operations for `nanoslg tune`: the model's own GEMMs at a range of token counts,
its attention over the paged cache at a range of (sequences, context), the TP all-reduce at a range of sizes, and
whole steps of given shapes, also split into nano-batches with their overlaps. Runs between steps on an idle engine
(the KV pages it writes belong to no request); every rank runs the same list in the same order, so collectives and
pipeline transfers match."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from gpu_workers.attention.context import forward_context
from gpu_workers.nano_batch import OP_CLASSES, OpTimer
from gpu_workers.parallel import parallel_state, tp_all_reduce
from nanoslg.protocol import SeqChunk, StepPlan, token_ids


def _median_ms(fn, device: torch.device, reps: int = 5, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = 1000 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def _synthetic_plan(runner, decodes: int, context: int, prefill: int, prefill_context: int = 0,
                    max_pages: int = 0) -> StepPlan:
    """`decodes` one-token rows at `context`, plus one prefill row of `prefill` tokens after `prefill_context`
    cached ones, on the first pages of the pool (none of them belong to a request while the engine is idle).
    max_pages: the scheduler's pool (the smallest of every rank's), so that every rank accepts or refuses alike."""
    ps, seqs, page = runner.cfg.page_size, [], 0
    limit = min(runner.num_pages, max_pages or runner.num_pages)

    def pages(n_tokens: int) -> list[int]:
        nonlocal page
        n = -(-n_tokens // ps)
        if page + n > limit:
            raise ValueError(f"the KV pool ({limit} pages) cannot hold this shape")
        page += n
        return list(range(page - n, page))

    for i in range(decodes):
        seqs.append(SeqChunk(f"profile-d{i}", token_ids([1]), context - 1, token_ids(pages(context)), False))
    if prefill:
        seqs.append(SeqChunk("profile-p", token_ids([1] * prefill), prefill_context,
                             token_ids(pages(prefill_context + prefill)), True))
    return StepPlan(-1, seqs)


def profile_ops(runner, shapes: dict[str, Any]) -> dict[str, list[list[float]]]:
    """{"gemm": [[tokens, ms]], "lm_head": [[rows, ms]], "decode_attention": [[seqs, context, ms]],
    "prefill_attention": [[tokens, context, ms]], "allreduce": [[tokens, ms]]}: per step of this rank (all its
    layers)."""
    device, dtype = runner.device, runner.dtype
    model, spec = runner.model, runner.cfg.model_spec
    layer, n_layers = model.layers[0], len(model.layers)
    attn = layer.self_attn
    out: dict[str, list[list[float]]] = {"gemm": [], "lm_head": [], "decode_attention": [], "prefill_attention": [],
                                         "allreduce": []}
    with torch.inference_mode():
        for m in shapes.get("tokens", []):
            x = torch.randn(m, spec.hidden_size, dtype=dtype, device=device)
            a = torch.randn(m, attn.num_heads * attn.head_dim, dtype=dtype, device=device)
            inter = layer.mlp.gate_up_proj.out_local // 2
            g = torch.randn(m, inter, dtype=dtype, device=device)

            def gemms():
                attn.qkv_proj(x)
                attn.o_proj.local(a)
                layer.mlp.gate_up_proj(x)
                layer.mlp.down_proj.local(g)

            out["gemm"].append([m, n_layers * _median_ms(gemms, device)])
            if model.lm_head is not None:
                out["lm_head"].append([m, _median_ms(lambda: model.compute_logits(x, False), device)])
            if parallel_state().tp_size > 1:
                y = torch.randn(m, spec.hidden_size, dtype=dtype, device=device)
                out["allreduce"].append([m, 2 * n_layers * _median_ms(lambda: tp_all_reduce(y), device)])
        for key, rows in (("decode_attention", shapes.get("decode", [])),
                          ("prefill_attention", shapes.get("prefill", []))):
            for a_, b_ in rows:
                plan = _synthetic_plan(runner, a_, b_, 0, 0, shapes.get("max_pages", 0)) \
                    if key == "decode_attention" else _synthetic_plan(runner, 0, 0, a_, b_, shapes.get("max_pages", 0))
                out[key].append([a_, b_, n_layers * _attention_ms(runner, plan)])
    return out


def _attention_ms(runner, plan: StepPlan) -> float:
    batch = runner.batch(plan)
    backend, attn = runner.backend, runner.model.layers[0].self_attn
    n = len(batch.input_ids)
    q = torch.randn(n, attn.num_heads, attn.head_dim, dtype=runner.dtype, device=runner.device)
    k = torch.randn(n, attn.num_kv_heads, attn.head_dim, dtype=runner.dtype, device=runner.device)
    out = torch.empty_like(q)
    backend.begin_planning()
    plan_ = backend.plan(batch.layout)
    backend.finish_planning()
    return _median_ms(lambda: backend.forward(0, q, k, k, plan_, out=out), runner.device)


def profile_steps(runner, shapes: dict[str, Any]) -> dict[str, Any]:
    """{"steps": [[decodes, context, prefill, nano, overlap, sequence_parallel, ms, {class: ms}]]}: whole forward
    steps of each shape, for each variant [nano-batches, overlap, sequence parallel] asked for, through the model
    runner's own path (CUDA graphs where it would use them), with one more timed run per shape for its operation
    classes."""
    results = []
    saved = runner.nano_batches, runner.op_runner, runner.sequence_parallel
    try:
        for decodes, context, prefill in shapes.get("steps", []):
            plan = _synthetic_plan(runner, decodes, context, prefill, context if prefill else 0,
                                   shapes.get("max_pages", 0))
            for nano, overlap, sp in shapes.get("variants", [[1, "none", False]]):
                runner.nano_batches, runner.op_runner = nano, runner.make_op_runner(overlap)
                runner.sequence_parallel = sp and parallel_state().tp_size > 1
                batch = runner.batch(plan)
                ms = _median_ms(lambda: _forward(runner, batch, None), runner.device)
                timer = OpTimer(runner.device.type == "cuda")
                _forward(runner, batch, timer)
                if runner.device.type == "cuda":
                    torch.cuda.synchronize()
                ops = timer.result()
                results.append([decodes, context, prefill, nano, overlap, sp, ms,
                                {c: round(ops[c], 4) for c in OP_CLASSES}])
    finally:
        runner.nano_batches, runner.op_runner, runner.sequence_parallel = saved
    return {"steps": results}


def _forward(runner, batch, timer) -> None:
    runner.op_runner.timer = timer
    try:
        with torch.inference_mode(), forward_context(runner.backend):
            runner.forward(batch, timer)
    finally:
        runner.op_runner.timer = None


def run_profile(runner, kind: str, shapes: dict[str, Any]) -> dict[str, Any]:
    if kind == "ops":
        return profile_ops(runner, shapes)
    if kind == "steps":
        return profile_steps(runner, shapes)
    raise ValueError(f"unknown profile kind {kind!r}")
