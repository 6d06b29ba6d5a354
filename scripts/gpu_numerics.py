"""Where bf16 greedy disagreement with Hugging Face comes from. Every variant (HF bf16 with sdpa or eager attention,
the engine with each attention backend and with the fused kernels on or off) is measured against HF in fp32:

- free-running: the first N greedy tokens, as the fraction of prompts that match HF bf16 (sdpa) and HF fp32;
- teacher-forced along HF fp32's greedy continuation: logits' relative error against fp32, and how often the
  argmax agrees with fp32's.

If the engine's error against fp32 is of the size of HF bf16's own, what remains is bf16 rounding, not a defect.
Run on the GPU machine: python3 scripts/gpu_numerics.py [tiny] [smollm2] (SmolLM2 from $NANOSLG_MODELS_DIR)."""
import json
import os
import sys
import tempfile

import torch

sys.path[:0] = ["tests", "tests/gpu", "."]
from bf16_oracle import (CAPITAL_QUESTION, DEV, SMOLLM2_TEXTS, chat_ids, engine_logits, hf_forced,  # noqa: E402
                         hf_greedy, hf_model, rel)

N = 32


ENGINE_VARIANTS = (("sdpa", "0"), ("flashinfer", "0"), ("flashinfer", "1")) if DEV == "cuda" else (("sdpa", "0"),)


def study(name, folder, prompts):
    ref32 = hf_model(folder, torch.float32)
    cont32, _ = hf_greedy(ref32, prompts, N)
    logits32 = hf_forced(ref32, prompts, cont32)
    del ref32
    variants = {}
    for attn in ("sdpa", "eager"):
        m = hf_model(folder, torch.bfloat16, attn)
        variants[f"hf-bf16-{attn}"] = (hf_greedy(m, prompts, N)[0], hf_forced(m, prompts, cont32))
        del m
    for backend, fused in ENGINE_VARIANTS:
        free, _ = engine_logits(folder, backend, prompts, N, fused=fused)
        _, forced = engine_logits(folder, backend, prompts, N, forced=cont32, fused=fused)
        variants[f"engine-{backend}-fused{fused}"] = (free, forced)
    hf_bf16 = variants["hf-bf16-sdpa"][0]
    rows = []
    for key, (free, forced) in variants.items():
        err = sum(rel(a, b) for a, b in zip(forced, logits32)) / len(prompts)
        top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(forced, logits32)) / (N * len(prompts))
        row = {"model": name, "variant": key, "match_hf_bf16": sum(a == b for a, b in zip(free, hf_bf16)) / len(prompts),
               "match_hf_fp32": sum(a == b for a, b in zip(free, cont32)) / len(prompts),
               "forced_rel_err_vs_fp32": err, "forced_top1_vs_fp32": top1}
        rows.append(row)
        print("NUMERICS", json.dumps(row))
    return rows


def smollm2_chat(folder):
    """The chat answer to the capital question from HF fp32/bf16 and the engine's FlashInfer path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = chat_ids(tok, CAPITAL_QUESTION)
    for label, dtype in (("hf-fp32", torch.float32), ("hf-bf16-sdpa", torch.bfloat16)):
        m = hf_model(folder, dtype)
        print("CHAT", label, repr(tok.decode(hf_greedy(m, [ids], 24)[0][0])))
        del m
    for backend, fused in ENGINE_VARIANTS:
        toks, _ = engine_logits(folder, backend, [ids], 24, fused=fused)
        print("CHAT", f"engine-{backend}-fused{fused}", repr(tok.decode(toks[0])))
    from nanoslg import LLM, SamplingParams

    os.environ["NANOSLG_FUSED_OPS"] = "1"
    with LLM(folder, dtype="bfloat16", max_model_len=1024) as llm:  # the whole engine: graphs, overlap, caching
        out = llm.chat([{"role": "user", "content": CAPITAL_QUESTION}],
                       SamplingParams(max_tokens=24, temperature=0))[0]
        print("CHAT", "LLM.chat", llm.engine.info["worker0"]["attention_backend"], repr(out.text))


def main():
    from conftest import random_prompts
    from tiny_models import make_tiny_model

    which = sys.argv[1:] or ["tiny", "smollm2"]
    if "tiny" in which:
        folder = make_tiny_model("llama", f"{tempfile.mkdtemp()}/tiny", num_layers=4, vocab_size=1024,
                                 dtype=torch.bfloat16, hidden_size=512, intermediate_size=1024,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=128)
        study("tiny-hd128", folder, random_prompts(20, seed=32))
    if "smollm2" in which:
        from transformers import AutoTokenizer

        folder = os.path.join(os.environ.get("NANOSLG_MODELS_DIR", ""), "smollm2-135m-instruct")
        tok = AutoTokenizer.from_pretrained(folder)
        study("smollm2", folder, [tok(t).input_ids for t in SMOLLM2_TEXTS[:10]])
        smollm2_chat(folder)


if __name__ == "__main__":
    main()
