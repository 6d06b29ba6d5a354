"""Issue 9, second probe: do a GEMM and a decode attention overlap when each kernel is persistent on its own share of
the SMs? The first probe (gpu_overlap_probe.py) found that cuBLAS and FlashInfer, each filling every SM, run one
after the other on two streams, and lose in green contexts. Here both sides are Triton kernels whose grid is a
chosen number of programs that loop over their tiles (work items), so a GEMM on G programs and an attention on the
rest can hold disjoint SMs for the whole pass. Shapes: Llama-3.1-8B (the four GEMMs of a layer for M tokens; GQA
decode over a paged cache of 16-token pages, S sequences at context 1280), x 32 layers, best of 3, ms.
Run on the GPU machine: python3 scripts/gpu_persistent_overlap_probe.py"""
import torch
import triton
import triton.language as tl

# the first probe's shapes and timing (this script runs from scripts/, next to it)
from gpu_overlap_probe import (CTX, HEAD_DIM, HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, PAGE, bf, dev, side_by_side,
                               timed)

GROUP = HEADS // KV_HEADS


@triton.jit
def persistent_linear(a_ptr, w_ptr, c_ptr, M, N, K, num_progs, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr):
    """c[M, N] = a[M, K] @ w[N, K]^T, row-major, K a multiple of BK; tiles in grouped order, num_progs programs."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in range(pid, num_m * num_n, num_progs):
        first_m = (tile // (GROUP_M * num_n)) * GROUP_M
        rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + tile % rows
        pid_n = (tile % (GROUP_M * num_n)) // rows
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[None, :] * K + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, mask=offs_n[None, :] < N, other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BK
            w_ptrs += BK
        c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def persistent_decode(q_ptr, k_ptr, v_ptr, table_ptr, o_ptr, num_items, ctx_len, pages_per_seq, scale, num_progs,
                      KVH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
                      BLOCK: tl.constexpr, EVICT: tl.constexpr):
    """GQA decode: item = (sequence, kv head); q [S, KVH*G, D], caches [pages, PAGE_SIZE, KVH, D] (NHD), table
    [S, pages_per_seq]; GP = G padded to 16 rows for tl.dot. EVICT: the KV loads' L2 eviction policy ("" or
    "evict_first", so that streaming the cache does not push the GEMM's tiles out of L2)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    toks = tl.arange(0, BLOCK)
    for item in range(pid, num_items, num_progs):
        seq = item // KVH
        kvh = item % KVH
        q_rows = seq * KVH * G + kvh * G + rows
        q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=rows[:, None] < G, other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for start in range(0, ctx_len, BLOCK):
            t = start + toks
            page = tl.load(table_ptr + seq * pages_per_seq + t // PAGE_SIZE, mask=t < ctx_len, other=0)
            slot = (page.to(tl.int64) * PAGE_SIZE + t % PAGE_SIZE) * (KVH * D) + kvh * D
            k = tl.load(k_ptr + slot[:, None] + dims[None, :], mask=t[:, None] < ctx_len, other=0.0,
                        eviction_policy=EVICT)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(t[None, :] < ctx_len, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slot[:, None] + dims[None, :], mask=t[:, None] < ctx_len, other=0.0,
                        eviction_policy=EVICT)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + q_rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < G)


GEMM_CONFIGS = [dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
                dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4)]


def linear(a, w, out, progs, cfg):
    M, K = a.shape
    N = w.shape[0]
    persistent_linear[(progs,)](a, w, out, M, N, K, progs, **cfg)


class Gemms:
    """The four GEMMs of a layer for `tokens` tokens."""

    def __init__(self, tokens: int):
        self.x = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
        self.h = torch.randn(tokens, INTER, device=dev, dtype=bf)
        self.weights = [torch.randn(n, k, device=dev, dtype=bf) * 0.01 for n, k in (
            (HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER))]
        self.outs = [torch.empty(tokens, w.shape[0], device=dev, dtype=bf) for w in self.weights]
        self.inputs = [self.x, self.x, self.x, self.h]

    def cublas(self):
        for _ in range(LAYERS):
            for a, w, o in zip(self.inputs, self.weights, self.outs):
                torch.matmul(a, w.t(), out=o)

    def triton(self, progs, cfg):
        def run():
            for _ in range(LAYERS):
                for a, w, o in zip(self.inputs, self.weights, self.outs):
                    linear(a, w, o, progs, cfg)
        return run


class Attention:
    def __init__(self, num_seqs: int):
        self.pages_per_seq = CTX // PAGE
        num_pages = num_seqs * self.pages_per_seq
        self.k, self.v = (torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=dev, dtype=bf) for _ in range(2))
        self.table = torch.randperm(num_pages, dtype=torch.int32, device=dev).view(num_seqs, self.pages_per_seq)
        self.q = torch.randn(num_seqs, HEADS, HEAD_DIM, device=dev, dtype=bf)
        self.out = torch.empty_like(self.q)
        self.num_seqs = num_seqs
        self.flashinfer_run = None
        try:
            import flashinfer
            ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", backend="fa2", use_tensor_cores=True)
            indptr = torch.arange(num_seqs + 1, dtype=torch.int32) * self.pages_per_seq
            last = torch.full((num_seqs,), PAGE, dtype=torch.int32)
            w.plan(indptr, self.table.flatten(), last, HEADS, KV_HEADS, HEAD_DIM, PAGE, q_data_type=bf,
                   kv_data_type=bf)
            self._ws, self._wrapper = ws, w
            self.flashinfer_run = lambda: [w.run(self.q, (self.k, self.v)) for _ in range(LAYERS)]
        except Exception as e:  # the probe still answers its question without it
            print(f"PROBE flashinfer unavailable: {type(e).__name__}: {e}")

    def once(self, progs, block=64, num_warps=4, num_stages=3, evict=""):
        persistent_decode[(progs,)](self.q, self.k, self.v, self.table, self.out, self.num_seqs * KV_HEADS, CTX,
                                    self.pages_per_seq, HEAD_DIM ** -0.5, progs, KVH=KV_HEADS, G=GROUP, GP=16,
                                    D=HEAD_DIM, PAGE_SIZE=PAGE, BLOCK=block, EVICT=evict, num_warps=num_warps,
                                    num_stages=num_stages)

    def triton(self, progs, **kw):
        return lambda: [self.once(progs, **kw) for _ in range(LAYERS)]

    def reference(self, seq: int) -> torch.Tensor:
        pages = self.table[seq].long()
        k = self.k[pages].reshape(-1, KV_HEADS, HEAD_DIM).float().repeat_interleave(GROUP, 1)
        v = self.v[pages].reshape(-1, KV_HEADS, HEAD_DIM).float().repeat_interleave(GROUP, 1)
        s = torch.einsum("hd,thd->ht", self.q[seq].float(), k) * HEAD_DIM ** -0.5
        return torch.einsum("ht,thd->hd", s.softmax(-1), v)


def check_kernels(sms: int) -> None:
    g = Gemms(300)
    for cfg in GEMM_CONFIGS:
        linear(g.x, g.weights[2], g.outs[2], sms, cfg)
        want = g.x.float() @ g.weights[2].float().t()
        err = (g.outs[2].float() - want).abs().max().item() / want.abs().max().item()
        print(f"PROBE gemm check {cfg['BM']}x{cfg['BN']} w{cfg['num_warps']}: max rel error {err:.2e}")
    att = Attention(8)
    att.once(sms)
    err = max((att.out[s].float() - att.reference(s)).abs().max().item() for s in range(8))
    print(f"PROBE attention check: max abs error {err:.2e}")


def main():
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    print(f"PROBE {props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}; ms for {LAYERS} "
          f"layers")
    check_kernels(sms)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for num_seqs, tokens in ((256, 1024), (256, 512), (384, 1024), (256, 2048)):
        gemm, attn = Gemms(tokens), Attention(num_seqs)
        t_cublas = timed(gemm.cublas)
        best_cfg = min(GEMM_CONFIGS, key=lambda c: timed(gemm.triton(sms, c)))
        t_tgemm = timed(gemm.triton(sms, best_cfg))
        t_fi = timed(attn.flashinfer_run) if attn.flashinfer_run else float("nan")
        attn_kw = min(({"num_warps": w, "num_stages": st} for w in (4, 8) for st in (2, 3, 4)),
                      key=lambda kw: timed(attn.triton(4 * sms, **kw)))
        per_sm = min((1, 2, 4, 8), key=lambda n: timed(attn.triton(n * sms, **attn_kw)))
        t_tattn = timed(attn.triton(per_sm * sms, **attn_kw))
        serial = min(t_cublas, t_tgemm) + min(t_fi if t_fi == t_fi else 1e9, t_tattn)
        print(f"PROBE case attn {num_seqs} seqs, gemm {tokens} tok: cublas {t_cublas:.2f}, triton gemm "
              f"{t_tgemm:.2f} ({best_cfg['BM']}x{best_cfg['BN']} w{best_cfg['num_warps']}), flashinfer {t_fi:.2f}, "
              f"triton attn {t_tattn:.2f} ({per_sm}/SM {attn_kw}); best serial {serial:.2f}", flush=True)
        for gemm_sms in (sms - 16, sms - 32, sms - 48, sms - 66):
            attn_sms = sms - gemm_sms
            tg = timed(gemm.triton(gemm_sms, best_cfg))
            ta = timed(attn.triton(per_sm * attn_sms, **attn_kw))
            both = timed(side_by_side(s1, gemm.triton(gemm_sms, best_cfg), s2,
                                      attn.triton(per_sm * attn_sms, **attn_kw)))
            row = (f"PROBE   split {gemm_sms}/{attn_sms}: gemm alone {tg:.2f}, attn alone {ta:.2f}, side by side "
                   f"{both:.2f} ({serial / both:.2f}x of best serial)")
            evicting = timed(side_by_side(s1, gemm.triton(gemm_sms, best_cfg), s2,
                                          attn.triton(per_sm * attn_sms, evict="evict_first", **attn_kw)))
            row += f"; KV loads evict_first {evicting:.2f} ({serial / evicting:.2f}x)"
            # cuBLAS' grid takes every SM the attention's persistent programs do not hold
            with_cublas = timed(side_by_side(s2, attn.triton(per_sm * attn_sms, evict="evict_first", **attn_kw),
                                             s1, gemm.cublas))
            row += f"; cublas || that attn {with_cublas:.2f} ({serial / with_cublas:.2f}x)"
            if attn.flashinfer_run:
                fi_both = timed(side_by_side(s1, gemm.triton(gemm_sms, best_cfg), s2, attn.flashinfer_run))
                row += f"; triton gemm || flashinfer {fi_both:.2f} ({serial / fi_both:.2f}x)"
            print(row, flush=True)
        del gemm, attn
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
