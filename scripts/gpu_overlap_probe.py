"""Does the model's decode attention run beside its GEMMs? The real kernels this time (FlashInfer's tensor-core
decode over a paged cache, cuBLAS GEMMs of the Llama-3.1-8B shape), unlike ../shared/probes which used a batched
GEMV: for each case, one "layer pass" x 32 of attention for S decoding sequences (context 1280) and of the four
GEMMs for M tokens, alone, one after the other, on two plain streams, and in green contexts at several SM splits.
Run on the GPU machine: python3 scripts/gpu_overlap_probe.py"""
import time

import torch

dev, bf = torch.device("cuda"), torch.bfloat16
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, PAGE, CTX = 4096, 14336, 32, 8, 128, 32, 16, 1280


def timed(fn, reps=3) -> float:
    fn()
    best = 1e9
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def make_attention(num_seqs: int):
    import flashinfer

    pages_per_seq = CTX // PAGE
    num_pages = num_seqs * pages_per_seq
    cache = tuple(torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=dev, dtype=bf) for _ in range(2))
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", backend="fa2", use_tensor_cores=True)
    indptr = torch.arange(num_seqs + 1, dtype=torch.int32) * pages_per_seq
    indices = torch.randperm(num_pages, dtype=torch.int32, device=dev)
    last = torch.full((num_seqs,), PAGE, dtype=torch.int32)
    wrapper.plan(indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, PAGE, q_data_type=bf, kv_data_type=bf)
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, device=dev, dtype=bf)

    def run():
        for _ in range(LAYERS):
            wrapper.run(q, cache)
    return run


def make_gemms(tokens: int):
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
    weights = [torch.randn(n, k, device=dev, dtype=bf) * 0.01 for n, k in
               ((HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER))]
    h = torch.randn(tokens, INTER, device=dev, dtype=bf)

    def run():
        for _ in range(LAYERS):
            torch.nn.functional.linear(x, weights[0])
            torch.nn.functional.linear(x, weights[1])
            torch.nn.functional.linear(x, weights[2])
            torch.nn.functional.linear(h, weights[3])
    return run


def side_by_side(stream_a, fa, stream_b, fb):
    def run():
        torch.cuda.current_stream().synchronize()
        with torch.cuda.stream(stream_a):
            fa()
        with torch.cuda.stream(stream_b):
            fb()
        stream_a.synchronize()
        stream_b.synchronize()
    return run


def main():
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    name = torch.cuda.get_device_name(dev)
    print(f"OVERLAP device {name}, {sms} SMs, torch {torch.__version__}; times in ms for {LAYERS} layers")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    try:
        from torch.cuda.green_contexts import GreenContext
        splits = [(sms - a, a) for a in (16, 32, 48)]
        contexts = {s: (GreenContext.create(num_sms=s[0], device_id=0), GreenContext.create(num_sms=s[1], device_id=0))
                    for s in splits}  # kept alive: a stream outliving its green context fails every launch
        greens = {s: (g.Stream(), a.Stream()) for s, (g, a) in contexts.items()}
    except Exception as e:
        print(f"OVERLAP green contexts unavailable: {type(e).__name__}: {e}")
        contexts, greens = {}, {}
    for num_seqs, tokens in ((128, 512), (256, 512), (256, 1024), (384, 1024), (256, 2048)):
        attn, gemm = make_attention(num_seqs), make_gemms(tokens)
        ta, tg = timed(attn), timed(gemm)
        serial = timed(lambda: (gemm(), attn()))
        streams = timed(side_by_side(s1, gemm, s2, attn))
        row = (f"OVERLAP attn {num_seqs:>3} seqs {ta:6.2f} | gemm {tokens:>4} tok {tg:6.2f} | serial {serial:6.2f}"
               f" | streams {streams:6.2f} ({serial / streams:.2f}x)")
        for (g, a), (sg, sa) in greens.items():
            alone_g, alone_a = timed(side_by_side(sg, gemm, sa, lambda: None)), timed(side_by_side(sg, lambda: None,
                                                                                                  sa, attn))
            both = timed(side_by_side(sg, gemm, sa, attn))
            row += f" | green {g}/{a}: gemm {alone_g:.2f} attn {alone_a:.2f} both {both:.2f} ({serial / both:.2f}x)"
        carve = getattr(torch._C, "_set_sm_carveout_experimental", None)
        for (g, a), (sg, sa) in greens.items() if carve is not None else ():
            carve(a)  # cuBLAS plans its tiles for the SMs left to it instead of all of them
            alone_g = timed(side_by_side(sg, gemm, sa, lambda: None))
            both = timed(side_by_side(sg, gemm, sa, attn))
            plain = timed(side_by_side(s1, gemm, s2, attn))
            carve(None)
            row += (f" | cublas carveout {a} in green {g}/{a}: gemm {alone_g:.2f} both {both:.2f} ({serial / both:.2f}x),"
                    f" plain streams {plain:.2f}")
        print(row, flush=True)
        del attn, gemm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
