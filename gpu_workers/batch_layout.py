"""A plan's sequences as the flat token batch the model runs: input ids, positions, KV slots and page tables."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpu_workers.attention.base import BatchLayout
from gpu_workers.nano_batch import split_rows
from gpu_workers.upload import upload
from nanoslg.protocol import SeqChunk, StepPlan


class TokenSlots:
    """A device buffer with each live request's latest sampled token, indexed by a slot per request."""

    def __init__(self, device: torch.device, capacity: int = 1024):
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.slots: dict[str, int] = {}  # rid -> its slot
        self.free_slots = list(range(capacity - 1, -1, -1))

    def slot(self, rid: str) -> int:
        s = self.slots.get(rid)
        if s is None:
            if not self.free_slots:  # grow: more live requests than slots
                old = len(self.tokens)
                self.tokens = torch.cat([self.tokens, torch.zeros_like(self.tokens)])
                self.free_slots = list(range(2 * old - 1, old - 1, -1))
            s = self.slots[rid] = self.free_slots.pop()
        return s

    def free(self, rid: str) -> None:
        s = self.slots.pop(rid, None)
        if s is not None:
            self.free_slots.append(s)


@dataclass(slots=True)
class StepBatch:
    """A plan's sequences as the flat token batch the model runs, decode rows first (the attention runs them on the
    decode kernel, the rest on the prefill kernel), and its split into nano-batches of whole rows."""

    seqs: list[SeqChunk]  # in batch order
    input_ids: torch.Tensor  # [T] on the device
    layout: BatchLayout
    cu: np.ndarray  # cumulative query lengths, [B + 1]
    parts: list[tuple[int, int]]  # nano-batches: [(first row, end row)]

    @property
    def token_bounds(self) -> list[tuple[int, int]]:
        return [(int(self.cu[a]), int(self.cu[b])) for a, b in self.parts]

    def part_layouts(self) -> list[BatchLayout]:
        return [self.layout.rows(a, b, t0, t1) for (a, b), (t0, t1) in zip(self.parts, self.token_bounds)]


def build_batch(plan: StepPlan, page_size: int, token_slots: TokenSlots, device: torch.device,
                nano_batches: int = 1) -> StepBatch:
    """The plan as a StepBatch. Pending tokens (planned before the step that samples them had finished) are filled
    in from token_slots on the device."""
    ps = page_size
    seqs = sorted(plan.seqs, key=lambda s: len(s.token_ids) + s.pending != 1)  # stable: decodes first
    count = len(seqs)
    # Every sequence's ids and pages joined into one buffer each, then scattered by index arithmetic: a loop over
    # the sequences costs ~5 us each, milliseconds a step at the hundreds of rows an FP8 pool runs.
    num_ids = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=count)
    pending = np.fromiter((s.pending for s in seqs), dtype=np.int64, count=count)
    num_pages = np.fromiter((len(s.page_table) for s in seqs), dtype=np.int64, count=count)
    starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=count)
    q_lens = num_ids + pending
    tables = np.zeros((count, int(num_pages.max())), dtype=np.int64)
    tables[np.repeat(np.arange(count), num_pages), _offsets_within(num_pages)] = \
        np.frombuffer(b"".join(s.page_table for s in seqs), dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    input_ids = np.zeros(int(cu[-1]), dtype=np.int64)
    input_ids[np.repeat(cu[:-1], num_ids) + _offsets_within(num_ids)] = \
        np.frombuffer(b"".join(s.token_ids for s in seqs), dtype=np.int32)
    waits = pending > 0  # one token each, sampled by the step before, still on the device
    pending_at = (cu[:-1] + num_ids)[waits]
    pending_slots = [token_slots.slot(s.rid) for s in seqs if s.pending]
    seq_of_token = np.repeat(np.arange(count), q_lens)
    positions = starts[seq_of_token] + (np.arange(len(input_ids)) - cu[seq_of_token])
    slots = tables[seq_of_token, positions // ps] * ps + positions % ps
    layout = BatchLayout(q_lens=torch.from_numpy(q_lens).int(), start_pos=torch.from_numpy(starts).int(),
                         page_tables=torch.from_numpy(tables).int(), positions=upload(positions, device),
                         slot_mapping=upload(slots, device))
    ids = upload(input_ids, device)
    if pending_slots:  # tokens the previous step sampled, still on the device
        ids[upload(pending_at, device)] = token_slots.tokens[upload(pending_slots, device)]
    return StepBatch(seqs, ids, layout, cu, split_rows(q_lens.tolist(), nano_batches))


def _offsets_within(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in lengths, concatenated."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
