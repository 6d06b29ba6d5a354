"""This process's place in the TP x PP layout, and the collectives the layers call.

rank = pp_rank * tp_size + tp_rank. With world size 1 no process group is created and every collective is a no-op,
so the same model code runs unchanged on one CPU and on many GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True)
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    tp_group: object = None

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
        """The rank that samples and reports results: TP rank 0 of the last pipeline stage."""
        return self.is_last_stage and self.tp_rank == 0


_state = ParallelState()


def parallel_state() -> ParallelState:
    return _state


def init_parallel(tp_size: int, pp_size: int, rank: int, init_method: str, backend: str) -> ParallelState:
    global _state
    _state = ParallelState(tp_size=tp_size, pp_size=pp_size, rank=rank)
    world = tp_size * pp_size
    if world > 1:
        dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank)
        for pp in range(pp_size):
            ranks = list(range(pp * tp_size, (pp + 1) * tp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                _state.tp_group = group
    return _state


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size == 1:
        return x
    dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=-1)


def shutdown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
