"""This process's place in the TP x PP layout, and the communication the model and the worker loop use.

rank = pp_rank * tp_size + tp_rank. TP ranks of one stage share a process group for their all-reduces; stage k's TP
rank t hands its activations to stage k+1's TP rank t with point-to-point send/recv. With world size 1 no process
group is created and every collective is a no-op, so the same model code runs unchanged on one CPU and on many GPUs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("nanoslg.worker")


@dataclass(slots=True)
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    # one two-rank group per pair of neighbouring stages, so a stage's recv from the stage before and its send to the
    # stage after run on different NCCL communicators instead of queueing behind each other on one stream
    recv_group: Optional[dist.ProcessGroup] = None
    send_group: Optional[dist.ProcessGroup] = None
    all_reduce: Optional[SymmMemAllReduce] = None  # a faster all-reduce for small payloads, else None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that reports sampled tokens: TP rank 0 of the last pipeline stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def prev_stage_rank(self) -> int:
        return self.rank - self.tp_size

    @property
    def next_stage_rank(self) -> int:
        return self.rank + self.tp_size


_state = ParallelState()


def parallel_state() -> ParallelState:
    return _state


def init_parallel(tp_size: int, pp_size: int, rank: int, init_method: str, backend: str,
                  device: Optional[torch.device] = None, timeout_s: float = 600.0) -> ParallelState:
    global _state
    _state = ParallelState(tp_size=tp_size, pp_size=pp_size, rank=rank)
    world = tp_size * pp_size
    if world == 1:
        return _state
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" and device is not None else {}
    dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    for pp in range(pp_size):
        ranks = list(range(pp * tp_size, (pp + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if rank in ranks:
            _state.tp_group = group
    for pp in range(pp_size - 1):
        for tp in range(tp_size):
            pair = [pp * tp_size + tp, (pp + 1) * tp_size + tp]
            group = dist.new_group(pair)
            if rank == pair[0]:
                _state.send_group = group
            elif rank == pair[1]:
                _state.recv_group = group
    if backend == "nccl" and tp_size > 1 and os.environ.get("NANOSLG_TP_ALLREDUCE", "auto") != "nccl":
        assert device is not None  # every NCCL rank is given its GPU
        _state.all_reduce = SymmMemAllReduce.create(_state.tp_group, device)
    return _state


class SymmMemAllReduce:
    """A two-shot all-reduce over PyTorch symmetric memory: each rank reduces its share of the payload with direct
    loads from its peers' buffers (NVLink peer access; multicast stays off), then gathers the other shares. Measured
    on 2 x H200 (NV18) in a CUDA graph: 16.8 us for a 256-token Llama-3.1-8B activation (2 MiB) against NCCL's 28.7 us,
    even at 16 MiB, slower than NCCL at 64 MiB (benchmarks/results/2026-11-22-h200x2/comm.log). So payloads up to
    MAX_BYTES take this path and larger ones NCCL."""

    MAX_BYTES = 8 << 20

    def __init__(self, group, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.buffer = symm_mem.empty(self.MAX_BYTES // 2, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(self.buffer, group)
        self.group_name = group.group_name

    @classmethod
    def create(cls, group, device: torch.device) -> Optional["SymmMemAllReduce"]:
        """The all-reduce for group, or None where any of its ranks cannot set it up (all ranks must agree, or the
        ones on this path would wait forever for peers on NCCL's)."""
        try:
            made, error = cls(group, device), None
        except Exception as e:  # no peer access, an old torch
            made, error = None, f"{type(e).__name__}: {e}"
        ok = torch.tensor([0 if made is None else 1], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        if ok.item() == 1:
            return made
        log.warning("symmetric-memory all-reduce unavailable (%s); NCCL does every all-reduce",
                    error or "a peer rank could not set it up")
        return None

    def __call__(self, x: torch.Tensor) -> bool:
        """Reduce x in place and return True, or return False if x does not fit this path."""
        n = x.numel()
        if x.dtype != torch.bfloat16 or n > self.buffer.numel() or n % 2 or not x.is_contiguous():
            return False
        flat, buf = x.view(-1), self.buffer[:n]
        buf.copy_(flat)
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        flat.copy_(buf)
        return True


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size == 1:
        return x
    if _state.all_reduce is None or not _state.all_reduce(x):
        dist.all_reduce(x, group=_state.tp_group)
    return x


# all_gather_into_tensor's new name since torch 2.12; the GPU machines run 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((_state.tp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=_state.tp_group)
    return torch.cat(out.chunk(_state.tp_size), dim=-1)


class StageLink:
    """Activations between pipeline stages: (hidden, residual) travel as one [2, tokens, hidden] tensor from stage
    k's TP rank t to stage k+1's TP rank t, in plan order on both sides, so every send meets its recv."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        # (work, tensor): a send's buffer must outlive the transfer
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []

    def recv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        # On NCCL, wait() makes the current stream wait for the transfer; the host does not block. On gloo it does.
        work = dist.irecv(buf, src=_state.prev_stage_rank, group=_state.recv_group)
        assert work is not None  # None only for a rank outside the group, and this rank is in its recv group
        work.wait()
        return buf[0], buf[1]

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        out = torch.stack((hidden, residual))
        self._sending = [(w, t) for w, t in self._sending if not w.is_completed()]
        work = dist.isend(out, dst=_state.next_stage_rank, group=_state.send_group)
        assert work is not None  # as in recv: this rank is in its send group
        self._sending.append((work, out))

    def drain(self) -> None:
        for work, _ in self._sending:
            work.wait()
        self._sending = []


def shutdown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
