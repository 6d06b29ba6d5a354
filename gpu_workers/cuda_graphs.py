"""Decode steps replayed from CUDA graphs captured for a ladder of batch sizes. A batch is padded up to the next
captured size; padding rows decode a dummy token into the backend's scratch page and are dropped afterwards.

A graph holds this pipeline stage's layers, TP all-reduces included (every TP rank captures the same ladder in the
same order, so the captured collectives match); activations between stages travel outside the graph."""
from __future__ import annotations

import bisect
import logging
from typing import Any, Optional, Union

import torch

from gpu_workers.attention.base import BatchLayout
from gpu_workers.attention.context import forward_context
from gpu_workers.nano_batch import OpRunner, split_rows

log = logging.getLogger("nanoslg.worker")


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    """Captured decode steps. With nano-batches each graph holds the split too: its rows in fixed parts, each with
    its own decode wrapper, and the side streams' work as parallel branches of the graph."""

    def __init__(self, model, backend, runner: OpRunner, max_batch: int, max_model_len: int, page_size: int,
                 first_stage: bool, nano_batches: int = 1):
        self.model, self.backend, self.runner = model, backend, runner
        self.nano_batches = nano_batches
        self.sizes = batch_size_ladder(max_batch)
        self.max_pages_per_seq = -(-max_model_len // page_size)
        device, spec = backend.kv_cache.device, model.spec
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        # The stage's inputs: token ids on the first stage, the previous stage's (hidden, residual) on the others.
        if first_stage:
            self.inputs = {"input_ids": torch.zeros(max_batch, dtype=torch.long, device=device)}
        else:
            dtype = model.compute_dtype  # not a parameter's: an FP8 weight's dtype is not the activations'
            self.inputs = {name: torch.zeros(max_batch, spec.hidden_size, dtype=dtype, device=device)
                           for name in ("hidden", "residual")}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.parts: dict[int, list[tuple[int, int]]] = {}  # batch size -> [(first row, end row)] of its nano-batches
        self.wrappers: dict[int, list[Any]] = {}  # batch size -> one decode wrapper per part
        # batch size -> the graph's output: final hidden states on the last stage, else (hidden, residual)
        self.outputs: dict[int, Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self.parts[bs] = split_rows([1] * bs, nano_batches)
            self.wrappers[bs] = [backend.graph_decode_wrapper(b - a, (b - a) * self.max_pages_per_seq)
                                 for a, b in self.parts[bs]]
            self._capture(bs, pool)
        log.info("captured decode CUDA graphs for batch sizes %s (%d nano-batches)", self.sizes, nano_batches)

    def _padding_layout(self, bs: int, layout: Optional[BatchLayout] = None) -> BatchLayout:
        """layout's rows plus padding rows (one token at position 0 in the scratch page) up to bs."""
        n = 0 if layout is None else len(layout.q_lens)
        q_lens = torch.ones(bs, dtype=torch.int32)
        start = torch.zeros(bs, dtype=torch.int32)
        width = 1 if layout is None else max(1, layout.page_tables.shape[1])
        tables = torch.full((bs, width), self.backend.scratch_page, dtype=torch.int32)
        if layout is not None:
            start[:n] = layout.start_pos
            tables[:n] = layout.page_tables
        return BatchLayout(q_lens, start, tables, self.positions[:bs], self.slots[:bs])

    def _plan(self, bs: int, layout: BatchLayout) -> list[object]:
        self.backend.begin_planning()
        plans = [self.backend.plan_decode(w, layout.rows(a, b, a, b))
                 for w, (a, b) in zip(self.wrappers[bs], self.parts[bs])]
        self.backend.finish_planning()
        return plans

    def _forward(self, bs: int, plans: list[object]) -> Any:
        inputs = {name: t[:bs] for name, t in self.inputs.items()}
        return self.model(self.positions[:bs], plans, self.parts[bs], self.runner, **inputs)

    def _capture(self, bs: int, pool) -> None:
        self.slots[:bs].fill_(self.backend.scratch_page * self.backend.page_size)
        plans = self._plan(bs, self._padding_layout(bs))
        with forward_context(self.backend):
            self._forward(bs, plans)  # warm-up outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs, plans)
        self.graphs[bs] = graph

    def can_run(self, layout: BatchLayout) -> bool:
        return layout.is_decode and len(layout.q_lens) <= self.sizes[-1] and \
            layout.page_tables.shape[1] <= self.max_pages_per_seq

    def run(self, layout: BatchLayout, **inputs):
        """The stage's output for layout's rows: final hidden states on the last stage, else (hidden, residual)."""
        n = len(layout.q_lens)
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        for name, value in inputs.items():
            self.inputs[name][:n].copy_(value)
            if bs > n:
                self.inputs[name][n:bs].zero_()
        self.positions[:n].copy_(layout.positions)
        self.slots[:n].copy_(layout.slot_mapping)
        if bs > n:
            self.positions[n:bs].zero_()
            self.slots[n:bs].fill_(self.backend.scratch_page * self.backend.page_size)
        self._plan(bs, self._padding_layout(bs, layout))
        self.graphs[bs].replay()
        out = self.outputs[bs]
        return tuple(t[:n] for t in out) if isinstance(out, tuple) else out[:n]
