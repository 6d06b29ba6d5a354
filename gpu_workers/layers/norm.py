"""RMSNorm with the optional fused residual add that the decoder layers use."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gpu_workers.layers import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same operation order as Hugging Face's LlamaRMSNorm, so fp32 results match bit for bit.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without residual: norm(x). With residual: returns (norm(x + residual), x + residual)."""
        if fused_ops.enabled() and x.dim() == 2:
            if residual is None:
                return fused_ops.rms_norm(x, self.weight, self.eps)
            fused_ops.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
