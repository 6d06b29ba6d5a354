"""Steps the decode graphs do not cover (prefill, mixed, decode batches above their ladder) replayed from CUDA graphs
of everything but the attention: for each token count of a ladder, one graph per stretch between two attentions
(the embedding and the first layer's projections, then o_proj, MLP and the next layer's projections, ...). A step is
padded up to the next count; the attention with its KV write runs eagerly between the pieces, on the real tokens
only, since its kernels are planned per step from the batch's shape.

Why: an eager 32-layer step launches ~15 operations a layer, each tens of microseconds of Python, torch and driver
time (FP8 adds its activation quantizations): 25-40 ms of host time a step, longer than the GPU's own time on steps
of a few thousand tokens, so the host set the pace of mixed steps. Replayed, the host launches 33 graphs and the
attention's kernels.

Memory: a token count's pieces are captured in order into one pool and always replayed in that order, so a block
one piece hands to the attention may serve the next piece for something else. What the attention reads (q, k, v)
is therefore kept as non-owning views: owning ones would keep every layer's q, k and v alive, gigabytes. It writes
into one buffer outside the pool that every layer and count shares; its padding rows keep old, finite values.
Padding rows never mix with real ones: every operation in a piece is row-wise (norms, per-token quantization,
GEMMs, all-reduces).

The same pieces run uncaptured where NANOSLG_PIECEWISE_GRAPHS=eager (the CPU tests, or to compare on a GPU): each
step is padded and cut the same way, with the attention run at the cut."""
from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from gpu_workers.attention.base import BatchLayout
from gpu_workers.nano_batch import ATTENTION, NanoState, Op, OpRunner

log = logging.getLogger("nanoslg.worker")
Output = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def token_ladder(max_tokens: int) -> list[int]:
    """Token counts to capture: steps of 32 up to 256 tokens, 64 above (a padded step computes its padding rows:
    at most 1/4 more above 256 tokens, 1/32 above 2048). 72 counts up to 4096 (48 took 5.3 s to capture on an
    H100)."""
    sizes = [8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256] + list(range(320, max_tokens, 64))
    return [s for s in sizes if s < max_tokens] + [max_tokens]


def non_owning(t: torch.Tensor) -> torch.Tensor:
    """A view of t's memory that does not keep it allocated."""
    storage = torch._C._construct_storage_from_data_pointer(t.untyped_storage().data_ptr(), t.device,
                                                            t.untyped_storage().nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


@dataclass(slots=True)
class _Cut:
    """One layer's attention between two pieces: the operation and the (padded) tensors it reads."""

    attend: Op
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def run(self, n: int, plan: object, out: torch.Tensor) -> None:
        self.attend(NanoState(out[:0], plan, out[:n], q=self.q[:n], k=self.k[:n], v=self.v[:n]))


class _Cutter(OpRunner):
    """Stands in for the op runner while a token count's pieces are made: runs the layers' operations in order
    (one nano-batch) and hands each attention to at_attention instead of running it."""

    def __init__(self, at_attention: Callable[[_Cut], None], out: torch.Tensor):
        super().__init__(torch.device("cpu"), frozenset())
        self.at_attention, self.out = at_attention, out

    def run(self, layers, states: list[NanoState], sequence_parallel: bool = False) -> None:
        assert len(states) == 1 and not sequence_parallel  # the pieces hold one unsplit batch
        s = states[0]
        for layer in layers:
            for kind, op in layer.ops:
                if kind != ATTENTION:
                    op(s)
                    continue
                assert s.q is not None and s.k is not None and s.v is not None  # the projection came first
                cut = _Cut(op, s.q, s.k, s.v)
                s.q = s.k = s.v = None
                s.hidden = self.out[:len(cut.q)]  # what the next piece reads: the attention's output
                self.at_attention(cut)
                del cut  # captured: q, k and v are free for the next piece


@dataclass(slots=True)
class _Pieces:
    graphs: list[Any]  # torch.cuda.CUDAGraph, one more than cuts
    cuts: list[_Cut]
    output: Output


class PiecewiseGraphs:
    """The pieces of every token count of the ladder up to max_tokens, for one pipeline stage's layers. run() is
    called inside the step's forward context (the attention between the pieces finds its backend there)."""

    def __init__(self, model, max_tokens: int, first_stage: bool, capture: bool = True):
        self.model, self.capture = model, capture
        self.sizes = token_ladder(max_tokens)
        device, spec, dtype = next(model.parameters()).device, model.spec, model.compute_dtype
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        if first_stage:
            self.inputs = {"input_ids": torch.zeros(max_tokens, dtype=torch.long, device=device)}
        else:
            self.inputs = {name: torch.zeros(max_tokens, spec.hidden_size, dtype=dtype, device=device)
                           for name in ("hidden", "residual")}
        attn = model.layers[0].self_attn
        self.out = torch.zeros(max_tokens, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
        self.pieces: dict[int, _Pieces] = {}
        if capture:
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(device)
            for n in reversed(self.sizes):  # largest first: the smaller counts' pieces reuse its pool
                self._capture(n, pool, stream)
            log.info("captured piecewise CUDA graphs for %d token counts up to %d", len(self.sizes), max_tokens)

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def _forward(self, n: int, runner: OpRunner) -> Output:
        inputs = {name: t[:n] for name, t in self.inputs.items()}
        return self.model(self.positions[:n], [None], [(0, n)], runner, **inputs)

    def _capture(self, n: int, pool, stream: torch.cuda.Stream) -> None:
        with torch.no_grad(), torch.cuda.stream(stream):  # warm-up: kernels compiled, the stream's workspaces made
            self._forward(n, _Cutter(lambda cut: None, self.out))
        torch.cuda.synchronize()
        graphs: list[Any] = [torch.cuda.CUDAGraph()]
        cuts: list[_Cut] = []

        def cut_here(cut: _Cut) -> None:
            cuts.append(_Cut(cut.attend, non_owning(cut.q), non_owning(cut.k), non_owning(cut.v)))
            graphs[-1].capture_end()
            graphs.append(torch.cuda.CUDAGraph())
            graphs[-1].capture_begin(pool=pool)

        with torch.no_grad(), torch.cuda.stream(stream):
            graphs[0].capture_begin(pool=pool)
            output = self._forward(n, _Cutter(cut_here, self.out))
            graphs[-1].capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        # the output is read before anything else replays: as a non-owning view, the smaller counts may reuse it
        kept: Output = (non_owning(output[0]), non_owning(output[1])) if isinstance(output, tuple) else \
            non_owning(output)
        self.pieces[n] = _Pieces(graphs, cuts, kept)

    def run(self, layout: BatchLayout, plan: object, between_layers: Optional[Callable[[], None]] = None,
            **inputs: torch.Tensor) -> Output:
        """The stage's output for the layout's tokens, as the model's forward pass gives it; plan: the backend's
        plan of the layout (the attention runs between the pieces)."""
        n = len(layout.positions)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        for name, value in inputs.items():
            self.inputs[name][:n].copy_(value)
            if value.is_floating_point():  # a later stage's norms update these in place: no drift in the padding
                self.inputs[name][n:size].zero_()
        self.positions[:n].copy_(layout.positions)
        if not self.capture:
            return self._run_uncaptured(n, size, plan, between_layers)
        pieces = self.pieces[size]
        for i, graph in enumerate(pieces.graphs):
            graph.replay()
            if i < len(pieces.cuts):
                pieces.cuts[i].run(n, plan, self.out)
                if between_layers is not None:
                    between_layers()
        out = pieces.output
        return (out[0][:n], out[1][:n]) if isinstance(out, tuple) else out[:n]

    def _run_uncaptured(self, n: int, size: int, plan: object, between_layers) -> Output:
        def attend_now(cut: _Cut) -> None:
            cut.run(n, plan, self.out)
            if between_layers is not None:
                between_layers()

        out = self._forward(size, _Cutter(attend_now, self.out))
        return (out[0][:n], out[1][:n]) if isinstance(out, tuple) else out[:n]


def mode() -> str:
    """NANOSLG_PIECEWISE_GRAPHS: "" (captured on CUDA), "eager" (padded and cut, not captured: tests), "0" (off)."""
    how = os.environ.get("NANOSLG_PIECEWISE_GRAPHS", "")
    if how not in ("", "eager", "0"):
        raise ValueError(f"NANOSLG_PIECEWISE_GRAPHS={how!r}: use eager, 0 or leave it unset")
    return how
