"""The attention backend interface: the backend owns the paged KV cache, plans once per step and attends per layer."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch

from gpu_workers.layers.fp8 import FP8, store_kv


@dataclass(slots=True)
class BatchLayout:
    """Where a step's flattened tokens sit: sequence b owns tokens [cu_q[b], cu_q[b+1]) at positions
    start_pos[b].. and its KV lives in pages page_tables[b, :ceil(kv_lens[b] / page_size)]. Rows of one token
    (decodes) come first: num_decode of them."""

    q_lens: torch.Tensor  # [B] int32, host
    start_pos: torch.Tensor  # [B] int32, host
    page_tables: torch.Tensor  # [B, max_pages] int32, host, padded with 0
    positions: torch.Tensor  # [T] int64, device
    slot_mapping: torch.Tensor  # [T] int64, device: page * page_size + offset for each new token

    @property
    def kv_lens(self) -> torch.Tensor:
        return self.start_pos + self.q_lens

    @property
    def num_decode(self) -> int:
        """Leading rows of one token each."""
        ones = (self.q_lens == 1).int()
        return len(ones) if bool(ones.all()) else int(ones.argmin())

    @property
    def is_decode(self) -> bool:
        return bool((self.q_lens == 1).all())

    def rows(self, start: int, end: int, token_start: int, token_end: int) -> "BatchLayout":
        """Rows [start, end), whose tokens are [token_start, token_end): one nano-batch's layout."""
        return BatchLayout(self.q_lens[start:end], self.start_pos[start:end], self.page_tables[start:end],
                           self.positions[token_start:token_end], self.slot_mapping[token_start:token_end])


class AttentionBackend(ABC):
    name = "abstract"

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, kv_fp8: bool = False):
        self.num_pages, self.page_size = num_pages, page_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.compute_dtype = self.attention_dtype(dtype, device)
        # An FP8 cache holds K / k_scale and V / v_scale in e4m3. One scale per tensor, 1.0: vLLM's default where
        # the checkpoint calibrated none (e4m3 keeps 3 mantissa bits from 2^-6 to 448; K and V stay inside).
        self.kv_fp8 = kv_fp8
        self.k_scale = self.v_scale = 1.0
        # [layer, k|v, page * page_size + offset, kv_head, head_dim]. One page more than the scheduler hands out:
        # padding rows of a CUDA-graph batch write their KV there.
        self.scratch_page = num_pages
        self.kv_cache = torch.zeros(num_layers, 2, (num_pages + 1) * page_size, num_kv_heads, head_dim,
                                    dtype=FP8 if kv_fp8 else self.compute_dtype, device=device)

    @staticmethod
    def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype attention computes in: torch's CPU attention kernels are several times slower in bf16/fp16
        than in fp32 at decode shapes, so on CPU it is fp32 whatever the model's dtype."""
        return torch.float32 if device.type == "cpu" else dtype

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device, kv_fp8: bool = False) -> int:
        element = 1 if kv_fp8 else AttentionBackend.attention_dtype(dtype, device).itemsize
        return num_layers * 2 * page_size * num_kv_heads * head_dim * element

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.kv_fp8:
            store_kv(self.kv_cache[layer, 0], self.kv_cache[layer, 1], k, v, slot_mapping, self.k_scale, self.v_scale)
            return
        self.kv_cache[layer, 0].index_copy_(0, slot_mapping, k.to(self.kv_cache.dtype))
        self.kv_cache[layer, 1].index_copy_(0, slot_mapping, v.to(self.kv_cache.dtype))

    # Whether forward() writes into a given `out` without allocating, so it may run on a side CUDA stream (the
    # caching allocator serves a side stream's allocations outside a CUDA graph's memory pool).
    runs_on_side_streams = False
    # Whether decode steps can be captured in CUDA graphs and replayed (cuda_graphs.py), through the two hooks
    # below; the model runner asks this, never which backend it has.
    supports_cuda_graphs = False
    # Whether the model's fused kernels (layers/fused_ops.py) run beside this backend: they come with FlashInfer.
    uses_fused_ops = False

    def graph_decode_wrapper(self, batch_size: int, max_pages: int) -> object:
        """Capture hook: the decode state a graph of batch_size rows reads, in buffers that never move."""
        raise NotImplementedError(f"{self.name} has no CUDA-graph decode")

    def plan_decode(self, wrapper: object, layout: BatchLayout) -> object:
        """Replay hook: plan a decode-only batch into a graph's buffers (graph_decode_wrapper's) before replay."""
        raise NotImplementedError(f"{self.name} has no CUDA-graph decode")

    @abstractmethod
    def plan(self, layout: BatchLayout, slot: int = 0) -> object:
        """Prepare everything a batch's layers share (indices, masks, kernel plans) and return it. slot: which
        nano-batch of the step this is; plans of different slots stay valid side by side."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q: [T, heads, D], k/v: [T, kv_heads, D] for the batch's new tokens. Stores k/v in the cache and returns
        the attention output [T, heads, D] (in out when given). plan: what this backend's plan() or plan_decode()
        made (typed Any so each backend may name its own plan class)."""

    def begin_planning(self) -> None:
        """Called once before a step's plans are made."""

    def finish_planning(self) -> None:
        """Called once after a step's plans are made."""
