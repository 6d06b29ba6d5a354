"""GPU component check: each fused kernel and attention backend against a plain torch reference, on random
inputs, as relative error. Run on the GPU machine: python3 scripts/gpu_components.py"""
import sys

import torch

sys.path[:0] = ["tests/gpu", "."]
from bf16_oracle import rel  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
bf = torch.bfloat16


def main():
    from gpu_workers.layers import fused_ops

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
    rot = RotaryEmbedding(D, 4096, 10000.0, {"rope_type": "default"}).to(dev)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=dev, dtype=bf)
    pos = torch.randint(0, 4000, (T,), device=dev)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    q, k = q.view(T, H, D), k.view(T, Hkv, D)
    cos = rot.cos[pos].unsqueeze(1)
    sin = rot.sin[pos].unsqueeze(1)
    cs = (torch.cat((cos, cos), -1).to(bf), torch.cat((sin, sin), -1).to(bf))
    q_ref, k_ref = _rotate(q.clone(), *cs), _rotate(k.clone(), *cs)
    qf, kf = rot(pos, q, k)
    print(f"rope d={D} q", rel(qf, q_ref), "k", rel(kf, k_ref))


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
