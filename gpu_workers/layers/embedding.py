"""Vocabulary-parallel embedding and LM head: each TP rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.layers.linear_methods import copy_checked
from gpu_workers.parallel import parallel_state, tp_all_gather_last_dim, tp_all_reduce


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        tp = parallel_state().tp_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp)
        self.vocab_start = parallel_state().tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden, dtype=dtype), requires_grad=False)
        setattr(self.weight, "weight_loader", self.load_weight)  # noqa: B010 (nn.Parameter does not declare it)

    def load_weight(self, param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not match vocab {self.vocab_size} "
                             f"x hidden {param.shape[1]}")
        rows = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        if rows:
            copy_checked(param.data[:rows], loaded.narrow(0, self.vocab_start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if parallel_state().tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocabulary slice, gathered to the full vocabulary."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        logits = tp_all_gather_last_dim(logits)
        return logits[..., :self.vocab_size]
