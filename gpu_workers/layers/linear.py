"""Tensor-parallel linear layers. Each parameter carries a ``weight_loader`` that copies this rank's slice of a
full checkpoint tensor, so the weight loader never needs to know the parallel layout."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.parallel import parallel_state, tp_all_reduce


def _param(shape, bias_or_weight_loader, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    setattr(p, "weight_loader", bias_or_weight_loader)  # noqa: B010 (an attribute nn.Parameter does not declare)
    return p


def copy_checked(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
    """The whole of loaded (a tensor, or a weight_loader.CheckpointTensor read only now) into param, converting
    dtype and device (shard: accepted so this serves as any parameter's loader)."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded.load())


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across TP ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        tp = parallel_state().tp_size
        if out_features % tp:
            raise ValueError(f"{out_features} output features do not split over {tp} TP ranks")
        self.weight = _param((out_features // tp, in_features), self.load_weight, dtype)
        self.bias = _param((out_features // tp,), self.load_weight, dtype) if bias else None

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard: Optional[str] = None) -> None:
        n = param.shape[0]
        copy_checked(param, loaded.narrow(0, parallel_state().tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of equal width stored as one matrix (gate and up of the MLP)."""

    def __init__(self, in_features: int, out_features: int, shard_names: tuple[str, ...], dtype: torch.dtype):
        super().__init__(in_features, out_features * len(shard_names), False, dtype)
        self.shard_names = shard_names
        self.shard_rows = out_features // parallel_state().tp_size

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard: Optional[str] = None) -> None:
        n = self.shard_rows
        dest = param.data.narrow(0, self.shard_names.index(shard) * n, n)
        copy_checked(dest, loaded.narrow(0, parallel_state().tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix. KV heads are replicated when there are fewer of them than TP ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype):
        tp = parallel_state().tp_size
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads do not split over {tp} TP ranks")
        self.head_dim = head_dim
        self.local_heads = num_heads // tp
        self.local_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.local_heads + 2 * self.local_kv_heads) * head_dim * tp
        super().__init__(hidden, out, bias, dtype)

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard: Optional[str] = None) -> None:
        tp_rank, d = parallel_state().tp_rank, self.head_dim
        q_rows, kv_rows = self.local_heads * d, self.local_kv_heads * d
        if shard == "q":
            offset, rows, src = 0, q_rows, tp_rank * q_rows
        else:
            offset = q_rows + (0 if shard == "k" else kv_rows)
            rows, src = kv_rows, (tp_rank // self.kv_replicas) * kv_rows
        copy_checked(param.data.narrow(0, offset, rows), loaded.narrow(0, src, rows))


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across TP ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        tp = parallel_state().tp_size
        if in_features % tp:
            raise ValueError(f"{in_features} input features do not split over {tp} TP ranks")
        self.weight = _param((out_features, in_features // tp), self.load_weight, dtype)
        # the bias is not sharded: every rank holds all of it
        self.bias = _param((out_features,), copy_checked, dtype) if bias else None

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard: Optional[str] = None) -> None:
        n = param.shape[1]
        copy_checked(param, loaded.narrow(1, parallel_state().tp_rank * n, n))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product (the GEMM alone)."""
        return F.linear(x, self.weight)

    def reduce_(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the partial products over the TP ranks, in place, and add the bias (allocates nothing, so it may
        run on a side stream)."""
        tp_all_reduce(y)
        # The bias is added once, after the reduction, not once per rank.
        return y.add_(self.bias) if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_(self.local(x))
