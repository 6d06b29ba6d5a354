"""A stand-in for FlashInfer's two paged-attention wrappers, in plain torch on the CPU, with their plan()/run()
signatures: lets the CPU suite drive FlashInferBackend's planning (the CSR page tables, the split of a mixed step
into decode and prefill rows, one wrapper set per nano-batch) against the SDPA backend."""
import math
import types

import torch


class _Wrapper:
    def __init__(self, workspace, layout, backend=None, use_tensor_cores=False, use_cuda_graph=False, **buffers):
        assert layout == "NHD"
        self.prefill = False

    def _attend(self, q, cache, q_indptr, out, k_scale=None, v_scale=None):
        k_cache, v_cache = cache
        ps = k_cache.shape[1]
        out = torch.empty_like(q) if out is None else out
        for b in range(len(self.indptr) - 1):
            pages = self.indices[self.indptr[b]:self.indptr[b + 1]].long()
            kv_len = (len(pages) - 1) * ps + int(self.last[b])
            k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:kv_len].float()
            v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:kv_len].float()
            k, v = k * (k_scale or 1.0), v * (v_scale or 1.0)  # an FP8 cache's per-tensor scales
            rows = q[q_indptr[b]:q_indptr[b + 1]].float()
            group = rows.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", rows, k) / math.sqrt(q.shape[-1])
            pos = kv_len - len(rows) + torch.arange(len(rows))
            scores = scores.masked_fill(torch.arange(kv_len)[None, :] > pos[:, None], float("-inf"))
            out[q_indptr[b]:q_indptr[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
        return out


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):
        self.indptr, self.indices, self.last = indptr.tolist(), indices.cpu(), last_page_len.tolist()

    def run(self, q, paged_kv_cache, out=None, k_scale=None, v_scale=None):
        assert q.is_contiguous() and q.shape[0] == len(self.indptr) - 1
        return self._attend(q, paged_kv_cache, list(range(q.shape[0] + 1)), out, k_scale, v_scale)


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    def plan(self, qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
             causal=True, seq_lens=None, **kw):
        assert causal
        self.qo_indptr = qo_indptr.tolist()
        self.indptr, self.indices, self.last = indptr.tolist(), indices.cpu(), last_page_len.tolist()

    def run(self, q, paged_kv_cache, out=None, k_scale=None, v_scale=None):
        assert q.is_contiguous() and q.shape[0] == self.qo_indptr[-1]
        return self._attend(q, paged_kv_cache, self.qo_indptr, out, k_scale, v_scale)


def module() -> types.ModuleType:
    m = types.ModuleType("flashinfer")
    m.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    m.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    return m
