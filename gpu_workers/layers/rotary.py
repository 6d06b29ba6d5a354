"""Rotary position embedding with the rope scalings nanoslg supports (default, linear, llama3)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from gpu_workers.layers import fused_ops


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position up to max_positions (rotate-half layout, as in Hugging Face)."""

    cos: torch.Tensor  # [max_positions, head_dim / 2], buffers registered in __init__
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]):
        super().__init__()
        inv_freq = _inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.head_dim = head_dim
        self._cos_sin_table: Optional[torch.Tensor] = None  # [max_positions, head_dim] fp32, the fused kernel's layout

        # (positions, dtype, cos, sin) of the step's nano-batches, newest last
        self._step_tables: list[tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor]] = []

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer of a step rotates at the same positions: build the tables once per step (per nano-batch),
        # not once per layer.
        for pos, dt, cos, sin in self._step_tables:
            if pos is positions and dt == dtype:
                return cos, sin
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        tables = (torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype))
        self._step_tables = self._step_tables[-7:] + [(positions, dtype, *tables)]
        return tables

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads, D], k: [T, kv_heads, D]; returns both rotated, in their dtype."""
        if fused_ops.enabled():
            if self._cos_sin_table is None:
                self._cos_sin_table = torch.cat((self.cos, self.sin), dim=-1).contiguous()
            t = q.shape[0]
            q_out, k_out = fused_ops.rope(positions, q.reshape(t, -1), k.reshape(t, -1), self.head_dim,
                                          self._cos_sin_table)
            return q_out.view(q.shape), k_out.view(k.shape)
        cos, sin = self._cos_sin(positions, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
