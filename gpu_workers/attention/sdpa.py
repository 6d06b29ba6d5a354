"""Attention with torch's scaled_dot_product_attention over the paged cache: each sequence's pages are gathered into
a padded contiguous batch, so one SDPA call per layer serves prefill, decode and mixed steps. Runs anywhere torch
does (CPU, any CUDA GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_workers.attention.base import AttentionBackend, BatchLayout
from gpu_workers.upload import upload


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def plan(self, layout: BatchLayout) -> None:
        device = self.kv_cache.device
        q_lens, start = layout.q_lens.long(), layout.start_pos.long()
        kv_lens = start + q_lens
        b, max_q, max_kv = len(q_lens), int(q_lens.max()), int(kv_lens.max())
        ps = self.page_size
        kv_pos = torch.arange(max_kv)
        pages = layout.page_tables.long()[:, (kv_pos // ps).clamp(max=layout.page_tables.shape[1] - 1)]
        kv_valid = kv_pos[None, :] < kv_lens[:, None]
        self.kv_index = upload(torch.where(kv_valid, pages * ps + kv_pos % ps, 0).flatten(), device)
        self.max_kv = max_kv
        q_off = torch.arange(max_q)
        q_valid = q_off[None, :] < q_lens[:, None]
        q_pos = start[:, None] + q_off[None, :]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]
        # Padding query rows attend to position 0 only, so no row is fully masked (which would give NaN).
        mask |= (~q_valid[:, :, None]) & (kv_pos[None, None, :] == 0)
        self.mask = upload(mask.unsqueeze(1), device, torch.bool)
        self.q_index = upload((torch.arange(b)[:, None] * max_q + q_off[None, :])[q_valid], device)
        self.batch, self.max_q = b, max_q
        self.slot_mapping = layout.slot_mapping

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.write_kv(layer, k, v, self.slot_mapping)
        shape = (self.batch, self.max_kv, self.num_kv_heads, self.head_dim)
        keys = self.kv_cache[layer, 0].index_select(0, self.kv_index).view(shape).transpose(1, 2)
        values = self.kv_cache[layer, 1].index_select(0, self.kv_index).view(shape).transpose(1, 2)
        out_dtype = q.dtype
        q = q.to(keys.dtype)
        heads, d = q.shape[1], q.shape[2]
        q_pad = q.new_zeros(self.batch * self.max_q, heads, d)
        q_pad[self.q_index] = q
        q_pad = q_pad.view(self.batch, self.max_q, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=self.mask, scale=self.scale,
                                             enable_gqa=heads != keys.shape[1])
        return out.transpose(1, 2).reshape(self.batch * self.max_q, heads, d)[self.q_index].to(out_dtype)
