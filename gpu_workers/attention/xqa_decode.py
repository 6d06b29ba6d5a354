"""Paged decode over an FP8 KV cache on FlashInfer's XQA kernels (TensorRT-LLM's decode attention; on SM90 its
Hopper kernel, TMA loads and FP8 tensor-core MMAs), behind the decode-wrapper interface of fp8_decode.py. The
engine's FP8 decode on SM90 where it builds (flashinfer_backend.py), measured against FlashInfer's tensor-core decode
and the Triton kernel by benchmarks/fp8_decode_attention.py.

XQA runs the query and the softmax probabilities in FP8 too; K's scale goes into the logits' scale (bmm1) and V's
into the output's (bmm2). It splits long contexts itself, by a count derived from the batch size and the page
table's width, both fixed in a CUDA graph."""
from __future__ import annotations

from typing import Optional

import torch

from gpu_workers.attention.fp8_decode import PagedDecodeWrapper

# 8 MiB of semaphores (flashinfer's xqa_batch_decode_with_kv_cache takes them from the buffer's start), then the
# scratch of the context splits: at most ~3 x SMs / 4 (sequence, KV head) splits beyond one per pair, each a
# group's partial output and softmax statistics in fp32 (a few KiB)
WORKSPACE_BYTES = 8 * 1024 * 1024 + 64 * 1024 * 1024


def supports(device: torch.device, head_dim: int, group: int, page_size: int) -> bool:
    """Where XQA's Hopper FP8 kernel runs: SM90 (the SM100/SM120 variants are other kernels), and its shapes."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    if head_dim % 16 or head_dim > 256 or page_size not in (16, 32, 64, 128) or group > 64:
        return False
    try:
        from flashinfer.decode import xqa_batch_decode_with_kv_cache  # noqa: F401
    except Exception:  # an older flashinfer, or one that fails to load
        return False
    return True


class XqaDecodeWrapper(PagedDecodeWrapper):
    """The workspace must start zeroed (its semaphores) and belong to XQA alone: another kernel's scratch written
    over the semaphores would hang or corrupt the next launch."""

    def __init__(self, device: torch.device, heads: int, kv_heads: int, head_dim: int, page_size: int,
                 sm_scale: float, batch_size: Optional[int] = None, max_pages_per_seq: int = 0,
                 workspace: Optional[torch.Tensor] = None):
        super().__init__(device, heads, kv_heads, head_dim, page_size, sm_scale, batch_size, max_pages_per_seq)
        self.workspace = workspace if workspace is not None else \
            torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)

    def run(self, q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        from flashinfer.decode import xqa_batch_decode_with_kv_cache

        rows = q.shape[0]
        tables = self.tables[:rows]
        return xqa_batch_decode_with_kv_cache(
            q, cache, self.workspace, tables, self.lens[:rows].view(torch.uint32), tables.shape[1] * self.page_size,
            bmm1_scale=self.sm_scale * k_scale, bmm2_scale=v_scale, out=out)
