"""Sequence parallelism for tensor-parallel layers (`--sequence-parallel`): between the attention and MLP blocks each
TP rank holds only its 1/TP of the tokens (rows padded to a multiple of TP), so the norms and residual adds that
every rank would otherwise repeat in full run on a shard, and each all-reduce becomes a reduce-scatter after the
row-parallel GEMM and an all-gather before the column-parallel one (the same bytes on the link, split in two
collectives that nano-batching can each overlap with another nano-batch's GEMMs).

The layer's operations keep their classes (gemm, attention, collective, other) so nano_batch.OpRunner runs them as it
runs the unsplit ones; collectives write into buffers made on the main stream beforehand."""
from __future__ import annotations

import torch
import torch.distributed as dist

from gpu_workers.layers.activation import silu_and_mul
from gpu_workers.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from gpu_workers.nano_batch import ATTENTION, COLLECTIVE, GEMM, OTHER, NanoState, Op
from gpu_workers.parallel import _all_gather_single, parallel_state


def shard_rows(num_tokens: int) -> int:
    """Rows of a num_tokens batch that each TP rank holds."""
    tp = parallel_state().tp_size
    return -(-num_tokens // tp)


def shard_of(full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full [T, H] tensor (zero rows where the padding falls)."""
    ps = parallel_state()
    n = shard_rows(len(full))
    out = full.new_zeros(n, full.shape[1])
    start = ps.tp_rank * n
    rows = max(0, min(len(full), start + n) - start)
    if rows:
        out[:rows] = full[start:start + rows]
    return out


def gathered(shard: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The full [num_tokens, H] tensor from every rank's shard."""
    full = shard.new_empty(parallel_state().tp_size * len(shard), shard.shape[1])
    _all_gather_single(full, shard.contiguous(), group=parallel_state().tp_group)
    return full[:num_tokens]


def layer_ops(norm_in_op: Op, qkv: Op, attend: Op, norm_post_op: Op, o_proj_layer: RowParallelLinear,
              attn_width: int, gate_up: MergedColumnParallelLinear,
              down_proj: RowParallelLinear) -> list[tuple[str, Op]]:
    """A decoder layer's operations over shards (models/llama.py's DecoderLayer.ops are the unsplit ones): its
    norms, QKV projection and attention as they are, the row-parallel GEMMs and the collectives around them here.
    attn_width: this rank's query heads x head size (o_proj's input)."""
    tp = parallel_state().tp_size

    def norm_in(s: NanoState) -> None:
        norm_in_op(s)
        s.buffer = s.hidden.new_empty(tp * len(s.hidden), s.hidden.shape[1])  # the all-gather's output

    def gather(s: NanoState) -> None:
        full = s.buffer
        assert full is not None  # made by the norm before
        _all_gather_single(full, s.hidden, group=parallel_state().tp_group)
        s.hidden, s.buffer = full[:s.num_tokens], None

    def row_parallel(s: NanoState, layer: RowParallelLinear, x: torch.Tensor) -> None:
        """x's product with the layer's weight into rows padded to a multiple of TP, and the reduce-scatter's
        output beside it."""
        shard = shard_rows(s.num_tokens)
        out = x.new_empty(tp * shard, layer.out_local)
        layer.method.apply(layer, x, None, out=out[:s.num_tokens])
        out[s.num_tokens:].zero_()
        s.hidden, s.buffer = out, x.new_empty(shard, layer.out_local)

    def o_proj(s: NanoState) -> None:
        row_parallel(s, o_proj_layer, s.hidden.view(-1, attn_width))

    def mlp_op(s: NanoState) -> None:
        row_parallel(s, down_proj, silu_and_mul(gate_up(s.hidden)))

    def scatter(s: NanoState) -> None:
        shard = s.buffer
        assert shard is not None  # made by row_parallel
        dist.reduce_scatter_tensor(shard, s.hidden, group=parallel_state().tp_group)
        s.hidden, s.buffer = shard, None

    def norm_post(s: NanoState) -> None:
        norm_post_op(s)
        s.buffer = s.hidden.new_empty(tp * len(s.hidden), s.hidden.shape[1])

    if o_proj_layer.bias is not None or down_proj.bias is not None:
        raise ValueError("sequence parallelism supports row-parallel layers without bias")
    return [(OTHER, norm_in), (COLLECTIVE, gather), (GEMM, qkv), (ATTENTION, attend), (GEMM, o_proj),
            (COLLECTIVE, scatter), (OTHER, norm_post), (COLLECTIVE, gather), (GEMM, mlp_op), (COLLECTIVE, scatter)]
