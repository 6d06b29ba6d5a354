"""GPU component check: each fused kernel and attention backend against a plain torch reference, on random
inputs, as relative error. Run on the GPU machine: python3 scripts/gpu_components.py"""
import torch

torch.manual_seed(0)
dev = "cuda"
bf = torch.bfloat16


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    from gpu_workers.layers import fused_ops
    from gpu_workers.layers.rotary import RotaryEmbedding, _rotate

    assert fused_ops.enable_for(torch.device(dev))
    for shape in ((8, 2, 128, 1024), (9, 3, 64, 576)):  # Llama-like and SmolLM2's shapes
        check_fused(*shape)
    attention_check()


def check_fused(H, Hkv, D, hidden):
    from gpu_workers.layers import fused_ops
    from gpu_workers.layers.rotary import RotaryEmbedding, _rotate

    print(f"--- fused ops, hidden {hidden}, heads {H}/{Hkv}, head_dim {D}")
    T = 37
    x = torch.randn(T, hidden, device=dev, dtype=bf)
    res = torch.randn(T, hidden, device=dev, dtype=bf)
    w = torch.randn(hidden, device=dev, dtype=bf)

    def ref_norm(v):
        v32 = v.float()
        return w * (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(bf)

    print("rmsnorm", rel(fused_ops.rms_norm(x, w, 1e-6), ref_norm(x)))
    x2, r2 = x.clone(), res.clone()
    fused_ops.add_rms_norm_(x2, r2, w, 1e-6)
    print("add_rmsnorm residual", rel(r2, x + res), "normed", rel(x2, ref_norm(x + res)))
    gu = torch.randn(T, 2 * hidden, device=dev, dtype=bf)
    g, u = gu.chunk(2, -1)
    print("silu_and_mul", rel(fused_ops.silu_and_mul(gu), torch.nn.functional.silu(g) * u))
    for d in (D,):
        rot = RotaryEmbedding(d, 4096, 10000.0, {"rope_type": "default"}).to(dev)
        qkv = torch.randn(T, (H + 2 * Hkv) * d, device=dev, dtype=bf)
        pos = torch.randint(0, 4000, (T,), device=dev)
        q, k, _ = qkv.split([H * d, Hkv * d, Hkv * d], -1)
        q, k = q.view(T, H, d), k.view(T, Hkv, d)
        cos = rot.cos[pos].unsqueeze(1)
        sin = rot.sin[pos].unsqueeze(1)
        cs = (torch.cat((cos, cos), -1).to(bf), torch.cat((sin, sin), -1).to(bf))
        q_ref, k_ref = _rotate(q.clone(), *cs), _rotate(k.clone(), *cs)
        qf, kf = rot(pos, q, k)
        print(f"rope d={d} q", rel(qf, q_ref), "k", rel(kf, k_ref))


def attention_check():
    from gpu_workers.attention.base import BatchLayout
    from gpu_workers.attention.flashinfer_backend import FlashInferBackend
    from gpu_workers.attention.sdpa import SdpaBackend

    for H, Hkv, D in ((8, 2, 128), (9, 3, 64)):
        ps = 16
        lens = [5, 40, 1, 77]
        starts = [0, 0, 0, 0]
        for mode in ("prefill", "decode"):
            fi = FlashInferBackend(1, 64, ps, H, Hkv, D, bf, torch.device(dev))
            sd = SdpaBackend(1, 64, ps, H, Hkv, D, bf, torch.device(dev))
            tables = torch.tensor([[i * 8 + j for j in range(8)] for i in range(4)], dtype=torch.int32)
            # prefill history first (same for both), then the step under test
            q_lens = torch.tensor(lens, dtype=torch.int32)
            st = torch.tensor(starts, dtype=torch.int32)
            if mode == "decode":
                hist = q_lens
                kv = torch.randn(int(hist.sum()), Hkv, D, device=dev, dtype=bf)
                pos = torch.cat([torch.arange(n) for n in lens])
                seq = torch.repeat_interleave(torch.arange(4), hist)
                slots = (tables[seq, pos // ps].long() * ps + pos % ps).to(dev)
                for b in (fi, sd):
                    b.write_kv(0, kv, kv * 0.5, slots)
                q_lens = torch.ones(4, dtype=torch.int32)
                st = hist.clone()
            n = int(q_lens.sum())
            pos = torch.cat([torch.arange(s, s + q) for s, q in zip(st.tolist(), q_lens.tolist())])
            seq = torch.repeat_interleave(torch.arange(4), q_lens)
            slots = (tables[seq, pos // ps].long() * ps + pos % ps).to(dev)
            layout = BatchLayout(q_lens, st, tables, pos.to(dev), slots)
            q = torch.randn(n, H, D, device=dev, dtype=bf)
            k = torch.randn(n, Hkv, D, device=dev, dtype=bf)
            v = torch.randn(n, Hkv, D, device=dev, dtype=bf)
            outs = []
            for b in (fi, sd):
                b.plan(layout)
                outs.append(b.forward(0, q, k, v))
            print(f"attention D={D} {mode}: flashinfer vs sdpa", rel(outs[0], outs[1]))


if __name__ == "__main__" and len(__import__("sys").argv) == 1:
    main()


def engine_matrix():
    """HF bf16 greedy agreement (first 32 tokens) of the engine per attention backend and fused-ops setting."""
    import os
    import subprocess
    import sys
    import tempfile

    sys.path.insert(0, "tests")
    from tiny_models import make_tiny_model

    root = tempfile.mkdtemp()
    shapes = {128: dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2),
              64: dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)}
    for d in (128, 64):
        folder = make_tiny_model("llama", f"{root}/hd{d}", num_layers=4, vocab_size=1024, dtype=torch.bfloat16,
                                 head_dim=d, **shapes[d])
        for backend, fused in (("sdpa", "0"), ("flashinfer", "0"), ("flashinfer", "1")):
            code = f"""
import sys, torch
sys.path.insert(0, 'tests')
from conftest import random_prompts
from nanoslg import LLM, SamplingParams
sys.path.insert(0, 'tests/gpu')
from test_gpu import _hf_bf16_greedy, _match_rate
prompts = [[t % 1024 for t in p] for p in random_prompts(20, seed=32)]
with LLM({folder!r}, max_model_len=512, attention_backend={backend!r}, enforce_eager=True) as llm:
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))]
ref = _hf_bf16_greedy({folder!r}, prompts, 32)
first = sum(a[:8] == b[:8] for a, b in zip(ours, ref)) / len(ref)
print('RESULT', _match_rate(ours, ref), first)
"""
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "NANOSLG_FUSED_OPS": fused})
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
            print(f"engine hd{d} {backend} fused={fused}: match32/match8 =",
                  line[0][7:] if line else out.stderr[-800:])


if __name__ == "__main__" and __import__("sys").argv[1:] == ["engines"]:
    engine_matrix()


def teacher_forced():
    """Logits of the FlashInfer and SDPA backends along the same token sequence (HF's greedy continuation), per
    decode step: tells kernel noise (flat, ~1e-3) from a bug (grows or jumps)."""
    import sys

    sys.path.insert(0, "tests")
    sys.path.insert(0, "tests/gpu")
    import tempfile

    from gpu_workers.attention.context import forward_context
    from gpu_workers.model_runner import ModelRunner
    from nanoslg.config import EngineConfig
    from nanoslg.protocol import SeqChunk, StepPlan, token_ids
    from test_gpu import _hf_bf16_greedy
    from tiny_models import make_tiny_model

    folder = make_tiny_model("llama", f"{tempfile.mkdtemp()}/m", num_layers=4, vocab_size=1024,
                             dtype=torch.bfloat16, head_dim=64, hidden_size=576, intermediate_size=1536,
                             num_attention_heads=9, num_key_value_heads=3)
    prompt = list(range(5, 45))
    cont = _hf_bf16_greedy(folder, [prompt], 40)[0]
    per_backend = {}
    for backend in ("flashinfer", "sdpa"):
        cfg = EngineConfig(model=folder, attention_backend=backend, enforce_eager=True, max_model_len=512,
                           num_kv_pages=64).resolve()
        runner = ModelRunner(cfg)
        table = token_ids(range(0, 16))
        chunks = [(prompt, 0)] + [([t], len(prompt) + i) for i, t in enumerate(cont[:-1])]
        logits = []
        for step, (toks, start) in enumerate(chunks):
            plan = StepPlan(step, [SeqChunk("r", token_ids(toks), start, table, True)])
            input_ids, layout, cu = runner._layout(plan)
            with torch.inference_mode(), forward_context(runner.backend):
                runner.backend.plan(layout)
                hidden = runner.model(layout.positions, input_ids=input_ids)
                logits.append(runner.model.compute_logits(hidden[-1:]).float().cpu())
        per_backend[backend] = logits
    errs = [rel(a, b) for a, b in zip(per_backend["flashinfer"], per_backend["sdpa"])]
    agree = [int(a.argmax() == b.argmax()) for a, b in zip(per_backend["flashinfer"], per_backend["sdpa"])]
    hf_agree = [int(a.argmax() == t) for a, t in zip(per_backend["sdpa"], cont)]
    print("teacher-forced rel err per step:", " ".join(f"{e:.1e}" for e in errs))
    print("argmax fi==sdpa:", "".join(map(str, agree)), " sdpa==hf:", "".join(map(str, hf_agree)))


if __name__ == "__main__" and __import__("sys").argv[1:] == ["forced"]:
    teacher_forced()
