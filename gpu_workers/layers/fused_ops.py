"""Fused kernels for the hot elementwise ops (residual add + RMSNorm, SiLU-and-mul, rotary) from FlashInfer on CUDA,
with plain torch elsewhere. Chosen once per process; NANOSLG_FUSED_OPS=0 forces the torch versions."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("nanoslg.worker")
_flashinfer: Any = None  # the flashinfer module once enable_for() imported it
_enabled = False


def enable_for(device: torch.device, wanted: bool = True) -> bool:
    """Switch the fused kernels on for this process if wanted and the device and flashinfer allow it."""
    global _flashinfer, _enabled
    _enabled = False
    if not wanted or device.type != "cuda" or os.environ.get("NANOSLG_FUSED_OPS", "1") == "0":
        return False
    try:
        import flashinfer

        _flashinfer = flashinfer
        _enabled = True
    except Exception as e:
        log.warning("fused ops off: flashinfer does not import (%s)", e)
    return _enabled


def enabled() -> bool:
    return _enabled


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _flashinfer.rmsnorm(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x; x = rmsnorm(residual)."""
    _flashinfer.fused_add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _flashinfer.activation.silu_and_mul(gate_up)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq*D] and k [T, Hkv*D] rotated into new contiguous tensors: from views of the qkv projection, the copy
    that makes q contiguous for the attention kernels comes with the rotation rather than as a kernel of its own."""
    return _flashinfer.apply_rope_with_cos_sin_cache(positions, q, k, head_dim, cos_sin, is_neox=True)
