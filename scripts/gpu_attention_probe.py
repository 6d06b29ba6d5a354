"""FlashInfer paged prefill against an fp32 reference for batch shapes and plan options, on random inputs: finds the
cases where the kernel (or our use of it) is wrong rather than rounded. Run on the GPU machine:
python3 scripts/gpu_attention_probe.py [fa2]"""
import sys

import torch

dev = "cuda"
bf = torch.bfloat16
PS = 16


def reference(q, k, v, lens):
    """Causal GQA attention in fp32, sequence by sequence (q/k/v flattened over the batch)."""
    out, at = [], 0
    group = q.shape[1] // k.shape[1]
    for n in lens:
        qs, ks, vs = (t[at:at + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        s = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        s = s.masked_fill(torch.ones(n, n, device=dev, dtype=torch.bool).triu(1), float("-inf"))
        out.append((s.softmax(-1) @ vs).transpose(0, 1))
        at += n
    return torch.cat(out)


def probe(H, Hkv, D, lens, backend, **plan_opts):
    import flashinfer

    n = sum(lens)
    q = torch.randn(n, H, D, device=dev, dtype=bf)
    k = torch.randn(n, Hkv, D, device=dev, dtype=bf)
    v = torch.randn(n, Hkv, D, device=dev, dtype=bf)
    pages = [-(-x // PS) for x in lens]
    cache_k = torch.zeros(sum(pages) + 3, PS, Hkv, D, device=dev, dtype=bf)
    cache_v = torch.zeros_like(cache_k)
    # sequence b's pages, written backwards through the cache so page order matters
    order, first = [], sum(pages) + 2
    at = 0
    for x, p in zip(lens, pages):
        ids = list(range(first, first - p, -1))
        first -= p
        order.append(ids)
        for t in range(x):
            cache_k[ids[t // PS], t % PS] = k[at + t]
            cache_v[ids[t // PS], t % PS] = v[at + t]
        at += x
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    qo = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).int()
    kv_indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0).int()
    indices = torch.tensor([i for ids in order for i in ids], dtype=torch.int32, device=dev)
    last = torch.tensor([x - (p - 1) * PS for x, p in zip(lens, pages)], dtype=torch.int32)
    w.plan(qo, kv_indptr, indices, last, H, Hkv, D, PS, causal=True, q_data_type=bf, kv_data_type=bf, **plan_opts)
    out = w.run(q, (cache_k, cache_v))
    ref = reference(q, k, v, lens)
    return ((out.float() - ref).norm() / ref.norm()).item()


def main():
    backends = ["fa3"] + (["fa2"] if "fa2" in sys.argv[1:] else [])
    for H, Hkv, D in ((9, 3, 64), (8, 2, 128), (4, 2, 128)):
        for lens in ([37], [17], [16], [100], [300], [5, 40, 1, 77], [37, 5], [1]):
            for backend in backends:
                for opts in ({}, {"disable_split_kv": True}):
                    try:
                        err = f"{probe(H, Hkv, D, lens, backend, **opts):.1e}"
                    except Exception as e:
                        err = f"error {type(e).__name__}: {str(e)[:80]}"
                    print(f"PROBE heads {H}/{Hkv} d{D} lens {lens} {backend} {opts or ''}: {err}", flush=True)


if __name__ == "__main__" and sys.argv[1:2] != ["model"]:
    main()


def model_probe(folder):
    """SmolLM2's chat prompt (one 37-token prefill) through the model runner, its next token with attention from:
    the SDPA backend, FlashInfer, FlashInfer writing into a guarded output buffer (rows past the end must stay
    NaN), and the fp32 reference in FlashInfer's place. Separates a wrong kernel from memory it corrupts."""
    import os

    from transformers import AutoTokenizer

    sys.path[:0] = ["tests/gpu", "."]
    from bf16_oracle import CAPITAL_QUESTION, chat_ids
    from gpu_workers.model_runner import ModelRunner
    from nanoslg.config import EngineConfig
    from nanoslg.protocol import SeqChunk, StepPlan, token_ids

    tok = AutoTokenizer.from_pretrained(folder)
    ids = chat_ids(tok, CAPITAL_QUESTION)
    os.environ["NANOSLG_FUSED_OPS"] = "0"

    def next_token(backend_name, mode, tokens):
        runner = ModelRunner(EngineConfig(model=folder, attention_backend=backend_name, enforce_eager=True,
                                          max_model_len=1024, num_kv_pages=65).resolve())
        backend = runner.backend
        run = backend.forward
        notes = []

        def patched(layer, q, k, v, plan, out=None):
            if mode == "reference":
                backend.write_kv(layer, k, v, plan.slot_mapping)
                return out.copy_(reference(q, k, v, [q.shape[0]]).to(q.dtype))
            if mode == "guarded":
                backend.write_kv(layer, k, v, plan.slot_mapping)
                t = q.shape[0]
                guard = torch.full((t + 512,) + q.shape[1:], float("nan"), dtype=q.dtype, device=q.device)
                q_in = q.contiguous().clone()
                q_copy = q_in.clone()
                result = plan.prefill.run(q_in, backend.layer_cache(layer), out=guard[:t])
                notes.append((int((~guard[t:].isnan()).sum()), int((q_in != q_copy).sum())))
                return out.copy_(result)
            return run(layer, q, k, v, plan, out)

        backend.forward = patched
        plan = StepPlan(0, [SeqChunk("r", token_ids(tokens), 0, token_ids(range(64)), True)])
        logits = runner.logits(plan)[0]
        top = logits.topk(3)
        print("NEXT", backend_name, mode, len(tokens), [tok.decode([int(i)]) for i in top.indices],
              [round(float(x), 2) for x in top.values],
              "guard rows written / q changed per layer:" if notes else "", notes[:3] if notes else "", flush=True)

    for tokens in (ids, ids[:17], ids[:16]):
        next_token("sdpa", "plain", tokens)
        for mode in ("plain", "guarded", "reference"):
            next_token("flashinfer", mode, tokens)


if __name__ == "__main__" and sys.argv[1:2] == ["model"]:
    model_probe(sys.argv[2])
