"""Hugging Face bf16/fp32 references and the engine's teacher-forced logits, shared by the GPU tests and
scripts/gpu_numerics.py.

Why not exact token equality in bf16: two correct bf16 implementations round differently, and greedy decoding
amplifies any near-tie into a different continuation. Measured on an H100 (BENCHMARKS.md): Hugging Face's own
eager and sdpa attention agree on 32 greedy tokens for 10-30 % of prompts of a tiny random model and 64-90 % of
SmolLM2's, and SmolLM2's chat answer starts with a tie ('The' 25.62 vs 'L' 25.5 through HF's kernels: one bf16
step). So the oracle checks what separates a defect from rounding: the error against fp32 is no larger than
bf16's own, and every divergence from Hugging Face starts at a tie within bf16's rounding error."""
from __future__ import annotations

import math
import os

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf_model(folder: str, dtype: torch.dtype, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).to(DEV).eval()


@torch.no_grad()
def hf_greedy(model, prompts: list, n: int) -> tuple:
    """(tokens, per-prompt [n, V] fp32 logits of each greedy step)."""
    toks, logits = [], []
    for p in prompts:
        ids = torch.tensor([p], device=DEV)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        toks.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.cat(out.logits).float().cpu())
    return toks, logits


@torch.no_grad()
def hf_forced(model, prompts: list, conts: list) -> list:
    """Per prompt, [n, V] fp32 logits where row t predicts conts[t] given the prompt and conts[:t]."""
    out = []
    for p, c in zip(prompts, conts):
        ids = torch.tensor([p + c[:-1]], device=DEV)
        out.append(model(ids).logits[0, len(p) - 1:].float().cpu())
    return out


@torch.inference_mode()
def engine_logits(folder: str, backend: str, prompts: list, n: int, forced: list = None, fused: str = "1") -> tuple:
    """(greedy tokens, per-prompt [n, V] logits) from the engine's model runner: one prefill of every prompt, then
    n - 1 decode steps fed the engine's own tokens or, teacher-forced, forced[i]. Eager, one batch."""
    from gpu_workers.attention.context import forward_context
    from gpu_workers.model_runner import ModelRunner
    from gpu_workers.upload import upload
    from nanoslg.config import EngineConfig
    from nanoslg.protocol import SeqChunk, StepPlan, token_ids

    os.environ["NANOSLG_FUSED_OPS"] = fused
    cfg = EngineConfig(model=folder, attention_backend=backend, enforce_eager=True, max_model_len=1024,
                       num_kv_pages=len(prompts) * 64 + 1).resolve()
    runner = ModelRunner(cfg)
    assert runner.backend.name == backend
    per_seq = 1024 // cfg.page_size
    tables = [token_ids(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    toks, logits = [[] for _ in prompts], [[] for _ in prompts]
    for step in range(n):
        chunks = [(p, 0) if step == 0 else ([(forced[i] if forced else toks[i])[step - 1]], len(p) + step - 1)
                  for i, p in enumerate(prompts)]
        plan = StepPlan(step, [SeqChunk(f"r{i}", token_ids(c), s, tables[i], True) for i, (c, s) in
                               enumerate(chunks)])
        input_ids, layout, cu = runner._layout(plan)
        with forward_context(runner.backend):
            runner.backend.plan(layout)
            hidden = runner.model(layout.positions, input_ids=input_ids)
        out = runner.model.compute_logits(hidden[upload(cu[1:] - 1, runner.device)]).float().cpu()
        for i in range(len(prompts)):
            logits[i].append(out[i])
            toks[i].append(int(out[i].argmax()))
    del runner
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return toks, [torch.stack(x) for x in logits]


def forced_error(logits: list, reference: list) -> float:
    """Mean over prompts of the relative error of teacher-forced logits."""
    return sum(rel(a, b) for a, b in zip(logits, reference)) / len(reference)


def divergences(ours: list, theirs: list, their_logits: list, bf16_rel_error: float) -> list:
    """For each prompt whose greedy tokens differ, (prompt, step, their margin over our token, allowed margin).
    One bf16 implementation's error in a logit has a standard deviation of about bf16_rel_error times the logits'
    RMS; two independent ones differ by sqrt(2) times that. Allowed: three standard deviations of that difference,
    below which the two tokens are tied as far as bf16 can tell."""
    out = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        t = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        row = their_logits[i][t]
        margin = float(row[b[t]] - row[a[t]])
        out.append((i, t, margin, 3 * math.sqrt(2) * bf16_rel_error * float(row.pow(2).mean().sqrt())))
    return out
