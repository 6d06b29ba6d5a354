"""Paged decode attention over an FP8 (e4m3) KV cache in Triton: a candidate for the engine's FP8 decode, measured
against FlashInfer's by benchmarks/fp8_decode_attention.py before it runs there (FlashInfer's tensor-core FP8
decode reads FP8 at ~70 % of the copy bandwidth: ../shared/probes/fp8-h100.md).

One program per (sequence, KV head, split of the context): the GQA group's query heads (padded to 16 rows, the
smallest tensor-core tile) against a block of keys at a time, gathered through the page table, with an online
softmax; a second kernel merges the splits. The split count depends only on the batch shape (so a CUDA graph can
hold it): enough programs to fill the GPU when the batch alone does not."""
from __future__ import annotations

import os
from typing import Optional

import torch

from gpu_workers.attention.base import BatchLayout
from gpu_workers.upload import upload

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU build of torch has no Triton
    triton = None

# (keys per iteration, num_warps, num_stages, fp16): the best of benchmarks/fp8_kernel_sweep.py on an H100
# (BENCHMARKS.md). fp16 1 multiplies in fp16 rather than bf16 (e4m3 converts to fp16 exactly and in fewer
# instructions; the query is scaled by 1/sqrt(head_dim) first, which keeps it far inside fp16's range).
DECODE_TILES = tuple(int(v) for v in os.environ.get("NANOSLG_FP8_DECODE_TILES", "128,4,2,0").split(","))
LOG2E = 1.4426950408889634


def supports(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel runs here: Triton's e4m3 needs SM89+, its tiles a power-of-two head size."""
    if triton is None or head_dim & (head_dim - 1):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def num_splits(batch: int, kv_heads: int, sms: int) -> int:
    """Context splits per (sequence, KV head), a power of two up to 16: about two waves of programs over the SMs.
    A CUDA graph's batch is padded up to its captured size, so at some sizes (65 rows padded to 80, with 2 KV heads)
    graphed and eager steps split differently and sum in another order: equal to rounding, not bit for bit."""
    want = -(-2 * sms // (batch * kv_heads))
    return min(16, 1 << max(0, (want - 1).bit_length()))


def split_buffers(batch: int, heads: int, splits: int, dim: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits' partial outputs [B, heads, splits, D] and their (max, sum) [B, heads, splits, 2]."""
    return (torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=device),
            torch.empty(batch, heads, splits, 2, dtype=torch.float32, device=device))


def paged_decode_fp8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     kv_lens: torch.Tensor, page_size: int, sm_scale: float, k_scale: float, v_scale: float,
                     out: torch.Tensor, splits: int, interpret_dot: bool = False,
                     buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                     tiles: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """q [B, heads, D] (bf16); caches [slots, kv heads, D] (e4m3) with slot = page * page_size + offset;
    page_table [B, max pages] int32; kv_lens [B] int32 (keys of each row, its own token included); splits a power
    of two (num_splits); buffers: split_buffers() for at least B rows (made here when not given).
    interpret_dot: float32 tiles, for Triton's CPU interpreter (its bf16 dot is wrong)."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    partial, stats = buffers or split_buffers(batch, heads, splits, dim, q.device)
    block, warps, stages, fp16 = (tuple(tiles or DECODE_TILES) + (0,))[:4]
    dot = tl.float32 if interpret_dot else tl.float16 if fp16 else tl.bfloat16
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, page_table, kv_lens, partial, stats, sm_scale * k_scale * LOG2E, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), page_table.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, PAGE=page_size,
        SPLITS=splits, BLOCK=block, DOT=dot, num_warps=warps, num_stages=stages)
    _merge_splits_kernel[(batch, heads)](partial, stats, out, out.stride(0), out.stride(1), SPLITS=splits, DIM=dim)
    return out


class PagedDecodeWrapper:
    """FlashInfer's decode-wrapper interface (plan, then run per layer) over a kernel that reads each row's page table
    [B, max pages] and KV length [B] (int32) from the device, so the FlashInfer backend and its CUDA graphs hold
    either. batch_size given: fixed buffers a captured graph reads (plan copies each step's page tables and lengths
    into them, on the stream, behind the replay still reading them)."""

    def __init__(self, device: torch.device, heads: int, kv_heads: int, head_dim: int, page_size: int,
                 sm_scale: float, batch_size: Optional[int] = None, max_pages_per_seq: int = 0):
        self.device, self.heads, self.kv_heads, self.head_dim = device, heads, kv_heads, head_dim
        self.page_size, self.sm_scale = page_size, sm_scale
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.fixed = batch_size is not None
        self.batch = batch_size or 0
        if batch_size is not None:
            self.tables = torch.zeros(batch_size, max_pages_per_seq, dtype=torch.int32, device=device)
            self.lens = torch.ones(batch_size, dtype=torch.int32, device=device)
            self.resized(batch_size)

    def resized(self, batch: int) -> None:
        """Called when the batch size is set: per-size state (split buffers)."""

    def plan(self, layout: BatchLayout) -> None:
        batch = len(layout.q_lens)
        tables = upload(layout.page_tables, self.device, torch.int32)
        lens = upload(layout.kv_lens, self.device, torch.int32)
        if self.fixed:
            self.tables[:batch, :tables.shape[1]].copy_(tables)
            self.lens[:batch].copy_(lens)
            return
        self.batch, self.tables, self.lens = batch, tables, lens
        self.resized(batch)

    def run(self, q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


class Fp8DecodeWrapper(PagedDecodeWrapper):
    """paged_decode_fp8 behind the decode-wrapper interface."""

    def resized(self, batch: int) -> None:
        self.splits = num_splits(batch, self.kv_heads, self.sms)
        self.buffers = split_buffers(batch, self.heads, self.splits, self.head_dim, self.device)

    def run(self, q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        k, v = (c.view(-1, self.kv_heads, self.head_dim) for c in cache)
        rows = q.shape[0]
        return paged_decode_fp8(q, k, v, self.tables[:rows], self.lens[:rows], self.page_size, self.sm_scale,
                                k_scale, v_scale, out, self.splits, buffers=self.buffers)


if triton is not None:
    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_ptr, stats_ptr, qk_scale, v_scale,
                             q_stride_b, q_stride_h, kv_stride_slot, kv_stride_head, table_stride,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, PAGE: tl.constexpr,
                             SPLITS: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        kv_len = tl.load(lens_ptr + b)
        per_split = tl.cdiv(tl.cdiv(kv_len, SPLITS), BLOCK) * BLOCK
        start = split * per_split
        end = tl.minimum(start + per_split, kv_len)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM)
        head = kvh * GROUP + rows
        q = tl.load(q_ptr + b * q_stride_b + head[:, None] * q_stride_h + dims[None, :],
                    mask=rows[:, None] < GROUP, other=0.0)
        q = (q.to(tl.float32) * qk_scale).to(DOT)  # scores come out in log2 units: softmax by exp2
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_sum = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM), tl.float32)
        for t0 in range(start, end, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            valid = t < end
            page = tl.load(table_ptr + b * table_stride + t // PAGE, mask=valid, other=0)
            slot = page.to(tl.int64) * PAGE + t % PAGE
            offs = slot[:, None] * kv_stride_slot + kvh * kv_stride_head + dims[None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)  # in flight beside K
            s = tl.dot(q, tl.trans(k.to(DOT)))
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT))
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        heads = GROUP * tl.num_programs(1)  # partial and stats are [batch, heads, SPLITS, ...]
        part = part_ptr + ((b * heads + head[:, None]) * SPLITS + split) * DIM + dims[None, :]
        tl.store(part, acc * v_scale, mask=rows[:, None] < GROUP)
        stat = stats_ptr + ((b * heads + head) * SPLITS + split) * 2
        tl.store(stat, m, mask=rows < GROUP)
        tl.store(stat + 1, l_sum, mask=rows < GROUP)

    @triton.jit
    def _merge_splits_kernel(part_ptr, stats_ptr, out_ptr, out_stride_b, out_stride_h, SPLITS: tl.constexpr,
                             DIM: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        heads = tl.num_programs(1)
        splits = tl.arange(0, SPLITS)
        dims = tl.arange(0, DIM)
        base = (b * heads + h) * SPLITS
        m = tl.load(stats_ptr + (base + splits) * 2)
        l_sum = tl.load(stats_ptr + (base + splits) * 2 + 1)
        m_all = tl.max(m, axis=0)
        weight = tl.where(l_sum > 0, tl.exp2(m - m_all), 0.0)  # m in log2 units
        part = tl.load(part_ptr + (base + splits)[:, None] * DIM + dims[None, :])
        norm = tl.sum(l_sum * weight, axis=0)
        total = tl.sum(part * weight[:, None], axis=0) / tl.where(norm > 0, norm, 1.0)  # no keys: 0, not NaN
        tl.store(out_ptr + b * out_stride_b + h * out_stride_h + dims, total.to(out_ptr.dtype.element_ty))
