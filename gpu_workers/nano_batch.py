"""Nano-batching, NanoFlow's operation-level parallelism: a step's batch split into nano-batches whose operations of
different kinds run side by side on the GPU.

Each decoder layer is a list of operations tagged by class: GEMMs (compute), attention with its KV writes (memory),
all-reduces (network) and the small rest (norms, counted with compute). The runner issues them operation by
operation, nano-batch by nano-batch; an operation whose class overlaps runs on that class's own CUDA stream, with
events for the dependencies inside its nano-batch, so nano-batch k's all-reduce (or attention) runs beside nano-batch
k+1's GEMMs. With one nano-batch, or on CPU, everything runs in order on the current stream: the same code path,
which is how the split is tested against Hugging Face on CPU.

Memory on side streams: an operation that runs there allocates nothing (the attention writes into an output made
beforehand, the all-reduce works in place), since the caching allocator serves a side stream's allocations outside a
CUDA graph's pool; and every tensor it touches is held until the compute stream has waited for it, so no block is
handed out again while a side stream still reads it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch

GEMM, ATTENTION, COLLECTIVE, OTHER = "gemm", "attention", "collective", "other"
OP_CLASSES = (GEMM, ATTENTION, COLLECTIVE, OTHER)
# The stream an overlapping operation class runs on (the overlap names of --nano-overlap).
STREAM_OF = {ATTENTION: "memory", COLLECTIVE: "network"}
_T = TypeVar("_T")


@dataclass(slots=True, eq=False)
class NanoState:
    """One nano-batch's tensors between operations."""

    positions: torch.Tensor
    plan: object  # its attention plan
    hidden: torch.Tensor
    residual: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    hidden_fp8: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # a norm's output quantized for the next GEMM
    buffer: Optional[torch.Tensor] = None  # a collective's output, made on the main stream (sequence parallelism)
    num_tokens: int = 0  # its real tokens (sequence parallelism pads the rows to a multiple of TP)
    event: Optional[torch.cuda.Event] = None  # completion of its last side-stream operation, not yet waited for
    keep: list[torch.Tensor] = field(default_factory=list)  # what that operation touches, held until the wait

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.positions, self.hidden, self.residual, self.q, self.k, self.v, self.buffer,
                            *(self.hidden_fp8 or ())) if t is not None]


Op = Callable[[NanoState], None]  # one operation of a layer over a nano-batch's state


def split_rows(q_lens: list[int], n: int) -> list[tuple[int, int]]:
    """min(n, rows) contiguous row ranges [(start, end)], each row whole, each cut at the row boundary nearest an
    even share of the tokens."""
    rows = len(q_lens)
    n = max(1, min(n, rows))
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    cuts = [0]
    for k in range(1, n):
        target = k * cu[-1] / n
        # leave at least one row for this part and for each part still to come
        cuts.append(min(range(cuts[-1] + 1, rows - (n - k) + 1), key=lambda i: abs(cu[i] - target)))
    cuts.append(rows)
    return list(zip(cuts, cuts[1:]))


class OpTimer:
    """Device time per operation class over one step (host time on CPU), for the run's breakdown."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # (class, start, end)
        self.ms = {c: 0.0 for c in OP_CLASSES}

    def time(self, kind: str, fn: Callable[..., _T], *args: Any) -> _T:
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn(*args)
            self.ms[kind] += 1000 * (time.perf_counter() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.pending.append((kind, start, end))
        return out

    def result(self) -> dict[str, float]:
        """Per class ms; waits for the step's events (call after the step finished)."""
        for kind, start, end in self.pending:
            end.synchronize()
            self.ms[kind] += start.elapsed_time(end)
        self.pending = []
        return dict(self.ms)


class OpRunner:
    """Issues a stage's layers over its nano-batches. overlap: the classes that get their own stream ("memory",
    "network"); only on CUDA, with more than one nano-batch and an attention backend that allocates nothing."""

    def __init__(self, device: torch.device, overlap: frozenset[str]):
        self.streams = {name: torch.cuda.Stream(device) for name in sorted(overlap)} \
            if device.type == "cuda" else {}
        self.timer: Optional[OpTimer] = None
        # called between layers while a step is being launched: the worker reports the previous step there as soon
        # as the device is done with it, rather than after the whole launch
        self.between_layers: Optional[Callable[[], None]] = None

    def run(self, layers: Iterable[Any], states: list[NanoState], sequence_parallel: bool = False) -> None:
        overlapping = len(states) > 1 and bool(self.streams)
        for layer in layers:
            for kind, op in (layer.sp_ops if sequence_parallel else layer.ops):
                for s in states:
                    stream = self.streams.get(STREAM_OF.get(kind, "")) if overlapping else None
                    if stream is None:
                        self._join(s)
                        self._call(kind, op, s)
                    else:
                        self._on_side_stream(stream, kind, op, s)
            if self.between_layers is not None:
                self.between_layers()
        for s in states:
            self._join(s)

    def _call(self, kind: str, op: Op, s: NanoState) -> None:
        if self.timer is None:
            op(s)
        else:
            self.timer.time(kind, op, s)

    def _on_side_stream(self, stream: torch.cuda.Stream, kind: str, op: Op, s: NanoState) -> None:
        ready = s.event
        if ready is None:  # its previous operation ran on the current stream
            ready = torch.cuda.Event()
            ready.record()
        stream.wait_event(ready)
        s.keep.extend(s.tensors())
        with torch.cuda.stream(stream):
            self._call(kind, op, s)
            s.event = torch.cuda.Event()
            s.event.record(stream)

    @staticmethod
    def _join(s: NanoState) -> None:
        """The current stream waits for s's side-stream work; what it touched may then be reused."""
        if s.event is not None:
            torch.cuda.current_stream().wait_event(s.event)
            s.event, s.keep = None, []
