"""gpu_workers/batch_layout.build_batch against a row-by-row reading of the plan: input ids (with the pending tokens
filled from the device's token slots), positions, KV slots and page tables, decode rows first."""
import random

import torch

from gpu_workers.batch_layout import TokenSlots, build_batch
from nanoslg.protocol import SeqChunk, StepPlan, token_ids


def test_build_batch_lays_out_every_row_as_the_plan_says():
    rng = random.Random(4)
    page = 16
    seqs, free_pages = [], iter(rng.sample(range(5000), 5000))
    for i in range(60):
        kind = rng.choice(["decode", "pending", "prefill", "chunk"])
        start = rng.randrange(0, 300)
        ids = {"decode": 1, "pending": 0, "prefill": rng.randrange(2, 40), "chunk": rng.randrange(1, 40)}[kind]
        pending = 1 if kind in ("pending", "chunk") and rng.random() < 0.7 else 0
        pages = [next(free_pages) for _ in range(-(-(start + ids + pending) // page))]
        seqs.append(SeqChunk(f"r{i}", token_ids(rng.randrange(3, 900) for _ in range(ids)), start, token_ids(pages),
                             True, None, pending))
    slots = TokenSlots(torch.device("cpu"))
    for s in seqs:
        if s.pending:
            slots.tokens[slots.slot(s.rid)] = 10_000 + int(s.rid[1:])  # what the step before sampled
    batch = build_batch(StepPlan(7, seqs, []), page, slots, torch.device("cpu"))
    ordered = [s for s in seqs if len(s.token_ids) + s.pending == 1] + \
        [s for s in seqs if len(s.token_ids) + s.pending != 1]
    assert [s.rid for s in batch.seqs] == [s.rid for s in ordered]
    ids, positions, kv_slots = [], [], []
    for s in ordered:
        ids += list(s.token_ids) + ([10_000 + int(s.rid[1:])] if s.pending else [])
        for p in range(s.start_pos, s.start_pos + len(s.token_ids) + s.pending):
            positions.append(p)
            kv_slots.append(s.page_table[p // page] * page + p % page)
    assert batch.input_ids.tolist() == ids
    assert batch.layout.positions.tolist() == positions
    assert batch.layout.slot_mapping.tolist() == kv_slots
    assert batch.layout.q_lens.tolist() == [len(s.token_ids) + s.pending for s in ordered]
    assert batch.layout.start_pos.tolist() == [s.start_pos for s in ordered]
    width = max(len(s.page_table) for s in seqs)
    assert batch.layout.page_tables.tolist() == [list(s.page_table) + [0] * (width - len(s.page_table))
                                                 for s in ordered]
    assert batch.cu.tolist()[-1] == len(ids)
