"""SiLU-and-multiply over the merged gate/up projection."""
import torch
import torch.nn.functional as F

from gpu_workers.layers import fused_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if fused_ops.enabled():
        return fused_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
