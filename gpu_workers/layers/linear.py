"""Tensor-parallel linear layers. Each says which part of a full checkpoint tensor is its own (out_span: output rows,
in_span: input columns); its linear method (linear_methods.py: plain, or FP8) holds the parameters, whose
``weight_loader``s copy that part, so the weight loader never needs to know the parallel layout or the quantization."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gpu_workers.layers.linear_methods import UNQUANTIZED, LinearMethod, copy_checked
from gpu_workers.parallel import parallel_state, tp_all_reduce

class ParallelLinear(nn.Module):
    """y = x W^T (+ b) over this rank's [out_local, in_local] part of W."""

    shard_names: tuple[Optional[str], ...] = (None,)  # the checkpoint tensors merged into this one
    fp8_scale_chunk = 0  # columns that share a block scale here (an FP8 block checkpoint's; linear_methods.py)

    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype,
                 method: Optional[LinearMethod]):
        super().__init__()
        self.in_local, self.out_local = in_local, out_local
        self.method = method or UNQUANTIZED
        self.method.create_weights(self, dtype)
        self.bias: Optional[nn.Parameter] = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.bias_rows, dtype=dtype), requires_grad=False)
            setattr(self.bias, "weight_loader", self.load_bias)  # noqa: B010 (not an nn.Parameter attribute)

    @property
    def bias_rows(self) -> int:
        return self.out_local

    def out_span(self, shard: Optional[str]) -> tuple[int, int, int]:
        """(first row here, rows, first row in the checkpoint tensor) of the output rows a shard's tensor fills."""
        raise NotImplementedError

    def in_span(self) -> tuple[int, int]:
        """(first column in the checkpoint tensor, columns) of this rank's input columns."""
        return 0, self.in_local

    def full_shape(self, shard: Optional[str]) -> tuple[int, int]:
        """The shape of a shard's checkpoint tensor (every rank's rows and columns)."""
        raise NotImplementedError

    def load_bias(self, param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
        full = self.full_shape(shard)[0]
        if tuple(loaded.shape) != (full,):
            raise ValueError(f"a bias of shape {tuple(loaded.shape)}; this layer's is ({full},)")
        dest, rows, src = self.out_span(shard)
        copy_checked(param.data.narrow(0, dest, rows), loaded.narrow(0, src, rows))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product, without the bias of a row-parallel layer (added after the reduction)."""
        return self.method.apply(self, x, None)

    def local_fp8(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """local() for activations its method takes already quantized (method.takes_fp8_input)."""
        return self.method.apply_fp8(self, xq, xs, None, out_dtype)


class ColumnParallelLinear(ParallelLinear):
    """W's output rows split across TP ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 method: Optional[LinearMethod] = None):
        tp = parallel_state().tp_size
        if out_features % tp:
            raise ValueError(f"{out_features} output features do not split over {tp} TP ranks")
        super().__init__(in_features, out_features // tp, bias, dtype, method)

    def out_span(self, shard: Optional[str]) -> tuple[int, int, int]:
        n = self.out_local
        return 0, n, parallel_state().tp_rank * n

    def full_shape(self, shard: Optional[str]) -> tuple[int, int]:
        return self.out_span(shard)[1] * parallel_state().tp_size, self.in_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def forward_fp8(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """forward() for activations its method takes already quantized (method.takes_fp8_input), bias included."""
        return self.method.apply_fp8(self, xq, xs, self.bias, out_dtype)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of equal width stored as one matrix (gate and up of the MLP)."""

    def __init__(self, in_features: int, out_features: int, shard_names: tuple[str, ...], dtype: torch.dtype,
                 method: Optional[LinearMethod] = None):
        self.shard_names = shard_names
        self.shard_rows = out_features // parallel_state().tp_size
        super().__init__(in_features, out_features * len(shard_names), False, dtype, method)

    def out_span(self, shard: Optional[str]) -> tuple[int, int, int]:
        n = self.shard_rows
        return self.shard_names.index(shard) * n, n, parallel_state().tp_rank * n


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix. KV heads are replicated when there are fewer of them than TP ranks."""

    shard_names = ("q", "k", "v")

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, method: Optional[LinearMethod] = None):
        tp = parallel_state().tp_size
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads do not split over {tp} TP ranks")
        self.head_dim = head_dim
        self.local_heads = num_heads // tp
        self.local_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.local_heads + 2 * self.local_kv_heads) * head_dim * tp
        super().__init__(hidden, out, bias, dtype, method)

    def out_span(self, shard: Optional[str]) -> tuple[int, int, int]:
        tp_rank, d = parallel_state().tp_rank, self.head_dim
        q_rows, kv_rows = self.local_heads * d, self.local_kv_heads * d
        if shard == "q":
            return 0, q_rows, tp_rank * q_rows
        return q_rows + (0 if shard == "k" else kv_rows), kv_rows, (tp_rank // self.kv_replicas) * kv_rows

    def full_shape(self, shard: Optional[str]) -> tuple[int, int]:
        rows = self.out_span(shard)[1] * parallel_state().tp_size  # a replicated KV head counts once
        return (rows if shard == "q" else rows // self.kv_replicas), self.in_local


class RowParallelLinear(ParallelLinear):
    """W's input columns split across TP ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 method: Optional[LinearMethod] = None):
        tp = parallel_state().tp_size
        if in_features % tp:
            raise ValueError(f"{in_features} input features do not split over {tp} TP ranks")
        super().__init__(in_features // tp, out_features, bias, dtype, method)

    def out_span(self, shard: Optional[str]) -> tuple[int, int, int]:
        return 0, self.out_local, 0

    def in_span(self) -> tuple[int, int]:
        n = self.in_local
        return parallel_state().tp_rank * n, n

    def full_shape(self, shard: Optional[str]) -> tuple[int, int]:
        return self.out_local, self.in_local * parallel_state().tp_size

    def reduce_(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the partial products over the TP ranks, in place, and add the bias (allocates nothing, so it may
        run on a side stream)."""
        tp_all_reduce(y)
        # The bias is added once, after the reduction, not once per rank (every rank holds all of it).
        return y.add_(self.bias) if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_(self.local(x))
