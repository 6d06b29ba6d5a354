"""Hugging Face bf16/fp32 references and the engine's teacher-forced logits, shared by the GPU tests and
scripts/gpu_numerics.py.

Why not exact token equality in bf16: two correct bf16 implementations round differently, and greedy decoding
amplifies any near-tie into a different continuation. Measured on an H100 (BENCHMARKS.md): Hugging Face's own
eager and sdpa attention agree on 32 greedy tokens for 10-30 % of prompts of a tiny random model and 64-90 % of
SmolLM2's, and SmolLM2's chat answer starts with a tie ('The' 25.62 vs 'L' 25.5 through HF's kernels: one bf16
step). So the oracle checks what separates a defect from rounding: the error against fp32 is no larger than
bf16's own, and every divergence from Hugging Face starts at a tie within bf16's rounding error."""
from __future__ import annotations

import dataclasses
import math
import os

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MAX_LEN = 1024
# SmolLM2 completion prompts: facts, code, stories, letters, so greedy decoding meets different kinds of ties
SMOLLM2_TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
                 "In 1969, the first", "Water boils at", "The largest planet in the solar system",
                 "To make a cup of tea,", "Machine learning is", "The Pythagorean theorem states",
                 "My favourite food is", "import numpy as np\n", "Dear Sir or Madam,", "The speed of light",
                 "Photosynthesis converts", "A haiku about autumn:", "The stock market", "Roses are red,",
                 "How do airplanes fly?", "The mitochondria is"]
CAPITAL_QUESTION = "What is the capital of France?"


def chat_ids(tok, question: str) -> list:
    """Token ids of a one-turn chat asking question, ready for the assistant's answer."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


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
def engine_logits(folder: str, backend: str, prompts: list, n: int, forced: list = None, fused: str = "1",
                  **engine_args) -> tuple:
    """(greedy tokens, per-prompt [n, V] logits) from the engine's model runner: one prefill of every prompt, then
    n - 1 decode steps fed the engine's own tokens or, teacher-forced, forced[i]. Eager, one batch."""
    from gpu_workers.model_runner import ModelRunner
    from nanoslg.config import EngineConfig
    from nanoslg.protocol import SeqChunk, StepPlan, token_ids

    previous = os.environ.get("NANOSLG_FUSED_OPS")
    os.environ["NANOSLG_FUSED_OPS"] = fused
    try:
        cfg = EngineConfig(model=folder, attention_backend=backend, enforce_eager=True,
                           max_model_len=MAX_LEN, **engine_args).resolve()
        per_seq = -(-MAX_LEN // cfg.page_size)
        cfg = dataclasses.replace(cfg, num_kv_pages=len(prompts) * per_seq + 1)
        runner = ModelRunner(cfg)
    finally:
        if previous is None:
            os.environ.pop("NANOSLG_FUSED_OPS", None)
        else:
            os.environ["NANOSLG_FUSED_OPS"] = previous
    assert runner.backend.name == backend
    # Pages handed out in a shuffled order, so a page-table bug cannot hide behind contiguous pages.
    pages = torch.randperm(len(prompts) * per_seq, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [token_ids(pages[i * per_seq:(i + 1) * per_seq]) for i in range(len(prompts))]
    toks, logits = [[] for _ in prompts], [[] for _ in prompts]
    for step in range(n):
        chunks = [(p, 0) if step == 0 else ([(forced[i] if forced else toks[i])[step - 1]], len(p) + step - 1)
                  for i, p in enumerate(prompts)]
        plan = StepPlan(step, [SeqChunk(f"r{i}", token_ids(c), s, tables[i], True) for i, (c, s) in
                               enumerate(chunks)])
        out = runner.logits(plan).float().cpu()
        for i in range(len(prompts)):
            logits[i].append(out[i])
            toks[i].append(int(out[i].argmax()))
    del runner
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return toks, [torch.stack(x) for x in logits]


def forced_errors(logits: list, reference: list) -> torch.Tensor:
    """[prompts, steps] relative error of teacher-forced logits, one row of the vocabulary at a time (a defect
    confined to one step of one sequence is not averaged away)."""
    return torch.stack([(a - b).norm(dim=-1) / b.norm(dim=-1) for a, b in zip(logits, reference)])


def bf16_step(row: torch.Tensor) -> float:
    """The spacing of bf16 values at the row's largest logit: logits are rounded to bf16, so ties are exact."""
    return 2.0 ** (math.floor(math.log2(float(row.abs().max()))) - 7)


def divergences(ours: list, theirs: list, their_logits: list, bf16_rel_error: float) -> list:
    """For each prompt whose greedy tokens differ, (prompt, step, their margin over our token, allowed margin).

    At the first differing step t the two programs rank tokens a (ours) and b (theirs) oppositely, so their margin
    l_b - l_a is at most (e_b - e_a) of theirs plus (e_a - e_b) of ours, four rounding errors of one logit each.
    One bf16 implementation's error in a logit has a standard deviation of about bf16_rel_error times the row's
    RMS, so the sum has about twice that; allowed is three of those standard deviations plus one bf16 step (the
    logits themselves are rounded). Below it the two tokens are tied as far as bf16 can tell."""
    out = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        t = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if t is None:
            continue
        row = their_logits[i][t]
        margin = float(row[b[t]] - row[a[t]])
        out.append((i, t, margin, 6 * bf16_rel_error * float(row.pow(2).mean().sqrt()) + bf16_step(row)))
    return out
