"""Turns a StepPlan into one forward pass (and, on the driver rank, sampled tokens)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from gpu_workers.attention.base import AttentionBackend, BatchLayout
from gpu_workers.attention.context import forward_context
from gpu_workers.attention.flashinfer_backend import FlashInferBackend, flashinfer_usable
from gpu_workers.attention.sdpa import SdpaBackend
from gpu_workers.cuda_graphs import DecodeGraphs
from gpu_workers.layers import fused_ops
from gpu_workers.models.llama import LlamaForCausalLM, iter_required
from gpu_workers.sampler import RowParams, Sampled, Sampler
from gpu_workers.upload import upload
from gpu_workers.weight_loader import init_dummy, load_checkpoint
from nanoslg.config import EngineConfig
from nanoslg.protocol import SeqChunk, StepPlan, StepResult, token_ids

log = logging.getLogger("nanoslg.worker")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: EngineConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_dtype(cfg: EngineConfig) -> torch.dtype:
    name = cfg.model_spec.torch_dtype if cfg.dtype == "auto" else cfg.dtype
    return _DTYPES.get(name, torch.float32)


class ModelRunner:
    def __init__(self, cfg: EngineConfig, local_rank: int = 0):
        self.cfg = cfg
        spec = cfg.model_spec
        self.device = resolve_device(cfg, local_rank)
        self.dtype = resolve_dtype(cfg)
        torch.manual_seed(cfg.seed)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(spec, self.dtype, max_positions=max(cfg.max_model_len,
                                                                              spec.max_position_embeddings))
        self.model.eval()
        if cfg.load_format == "dummy":
            init_dummy(self.model, cfg.seed)
        else:
            targets = self.model.checkpoint_targets()
            load_checkpoint(targets, set(iter_required(targets, spec)), cfg.model, self.device)
        self.backend_cls = self._choose_backend()
        fused_ops.enable_for(self.device, wanted=self.backend_cls is FlashInferBackend)
        self.sampler = Sampler(self.device, cfg.seed)
        self.rows: dict = {}  # rid -> RowParams, kept while the scheduler may still schedule the request
        self.token_slots = TokenSlots(self.device)
        self.num_pages = self._count_kv_pages()
        self.backend = self._make_backend(self.num_pages)
        log.warning("worker: %s %s, %d KV pages of %d tokens, attention backend %s (%s), fused ops %s",
                    self.device, self.dtype, self.num_pages, cfg.page_size, self.backend.name, self.backend_reason,
                    "on" if fused_ops.enabled() else "off")
        self.graphs = None
        if self.device.type == "cuda" and self.backend_cls is FlashInferBackend and not cfg.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.backend, min(cfg.cuda_graph_max_batch, cfg.max_num_seqs),
                                       cfg.max_model_len, cfg.page_size)

    def _choose_backend(self) -> type:
        choice = self.cfg.attention_backend
        usable, reason = flashinfer_usable(self.device)
        if choice == "flashinfer" and not usable:
            raise RuntimeError(f"--attention-backend flashinfer cannot run: {reason}")
        if choice == "sdpa" or not usable:
            self.backend_reason = "asked for" if choice == "sdpa" else f"flashinfer unusable: {reason}"
            return SdpaBackend
        self.backend_reason = reason
        return FlashInferBackend

    def _local_heads(self) -> tuple:
        """(query heads, KV heads) on this rank, as its attention layers hold them."""
        spec = self.cfg.model_spec
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        return (attn.num_heads, attn.num_kv_heads) if attn else (spec.num_heads, spec.num_kv_heads)

    def _page_bytes(self) -> int:
        return AttentionBackend.bytes_per_page(len(self.model.layers), self.cfg.page_size, self._local_heads()[1],
                                               self.cfg.model_spec.head_dim, self.dtype, self.device)

    def _make_backend(self, num_pages: int) -> AttentionBackend:
        heads, kv_heads = self._local_heads()
        return self.backend_cls(len(self.model.layers), num_pages, self.cfg.page_size, heads, kv_heads,
                                self.cfg.model_spec.head_dim, self.dtype, self.device)

    def _count_kv_pages(self) -> int:
        cfg = self.cfg
        if cfg.num_kv_pages:
            return cfg.num_kv_pages
        page_bytes = self._page_bytes()
        if self.device.type == "cpu":
            budget = cfg.kv_cache_memory_gb * (1 << 30)
        else:
            budget = self._profile_free_memory()
        # No point holding more pages than every sequence at full length could use.
        ceiling = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.page_size) + 1
        pages = min(int(budget // page_bytes), ceiling)
        if pages < 1:
            raise RuntimeError(f"no memory left for the KV cache (one page needs {page_bytes} bytes)")
        return pages

    def _profile_free_memory(self) -> float:
        """Bytes the KV cache may take: the GPU's share (gpu_memory_utilization) minus the peak of a forward pass at
        the largest step the scheduler can form (max_num_batched_tokens prefill tokens, logits for max_num_seqs)."""
        cfg = self.cfg
        tokens = cfg.max_num_batched_tokens
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        seqs = min(cfg.max_num_seqs, tokens)
        lens = [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]
        pages = []
        offset = 0
        for n in lens:
            first = offset // cfg.page_size
            pages.append(list(range(first, first + -(-n // cfg.page_size))))
            offset = (first + len(pages[-1])) * cfg.page_size
        probe_pages = max(p[-1] for p in pages) + 1
        probe = self._make_backend(probe_pages)
        plan = StepPlan(-1, [SeqChunk(f"probe{i}", token_ids([1] * n), 0, token_ids(p), True,
                                      {"temperature": 1.0, "top_p": 0.9})
                             for i, (n, p) in enumerate(zip(lens, pages))])
        backend, self.backend = getattr(self, "backend", None), probe
        self.graphs = None
        self.execute(plan)
        self.execute(StepPlan(-1, [], [s.rid for s in plan.seqs]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.backend = backend
        del probe
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info(self.device)[1]
        kv_bytes = self._page_bytes() * probe_pages
        # the probe's own KV pages are not activations; CUDA graphs and fragmentation get 1 GiB of headroom
        budget = total * cfg.gpu_memory_utilization - (peak - kv_bytes) - (1 << 30)
        log.warning("memory profile: peak %.1f GiB at %d tokens, KV budget %.1f GiB", peak / 2 ** 30, tokens,
                    budget / 2 ** 30)
        return budget

    def _layout(self, plan: StepPlan) -> tuple:
        ps = self.cfg.page_size
        seqs = plan.seqs
        q_lens = np.fromiter((len(s.token_ids) + s.pending for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=len(seqs))
        max_pages = max(len(s.page_table) for s in seqs)
        tables = np.zeros((len(seqs), max_pages), dtype=np.int64)
        for b, s in enumerate(seqs):
            tables[b, :len(s.page_table)] = np.frombuffer(s.page_table, dtype=np.int32)
        cu = np.concatenate([[0], np.cumsum(q_lens)])
        input_ids = np.zeros(int(cu[-1]), dtype=np.int64)
        pending_at, pending_slots = [], []
        for b, s in enumerate(seqs):
            n = len(s.token_ids)
            input_ids[cu[b]:cu[b] + n] = np.frombuffer(s.token_ids, dtype=np.int32)
            if s.pending:
                pending_at.append(int(cu[b]) + n)
                pending_slots.append(self.token_slots.slot(s.rid))
        seq_of_token = np.repeat(np.arange(len(seqs)), q_lens)
        positions = starts[seq_of_token] + (np.arange(len(input_ids)) - cu[seq_of_token])
        slots = tables[seq_of_token, positions // ps] * ps + positions % ps
        dev = self.device
        layout = BatchLayout(q_lens=torch.from_numpy(q_lens).int(), start_pos=torch.from_numpy(starts).int(),
                             page_tables=torch.from_numpy(tables).int(), positions=upload(positions, dev),
                             slot_mapping=upload(slots, dev))
        ids = upload(input_ids, dev)
        if pending_at:  # tokens the previous step sampled, still on the device
            ids[upload(pending_at, dev)] = self.token_slots.tokens[upload(pending_slots, dev)]
        return ids, layout, cu

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "Launched":
        """Queue the plan's forward pass and sampling on the device without waiting for them."""
        for rid in plan.released:
            self.rows.pop(rid, None)
            self.token_slots.free(rid)
        for s in plan.seqs:
            if s.params is not None:
                self.rows[s.rid] = RowParams.from_dict(s.params)
            self.rows[s.rid].record_input(s.start_pos, s.token_ids, s.pending)
        sampling = [s for s in plan.seqs if s.sample]
        if not sampling:
            if plan.seqs:
                self._forward(plan)
            return Launched(plan.step_id, [], None)
        hidden, cu = self._forward(plan)
        last = upload([int(cu[b + 1]) - 1 for b, s in enumerate(plan.seqs) if s.sample], self.device)
        logits = self.model.compute_logits(hidden[last])
        positions = [s.start_pos + len(s.token_ids) + s.pending for s in sampling]
        rows = [self.rows[s.rid] for s in sampling]
        sampled = self.sampler(logits, rows, positions)
        # Keep each request's newest token on the device for a decode already planned on top of it.
        slot_ids = upload([self.token_slots.slot(s.rid) for s in sampling], self.device)
        self.token_slots.tokens[slot_ids] = sampled.tokens
        sampled.start_copy()
        return Launched(plan.step_id, [s.rid for s in sampling], sampled)

    def finish(self, launched: "Launched") -> StepResult:
        """Wait for a launched step and report its tokens (the step's one host synchronisation)."""
        if launched.sampled is None:
            return StepResult(launched.step_id, [], token_ids())
        tokens, logprobs = launched.sampled.to_host()
        for rid, tok in zip(launched.rids, tokens):
            row = self.rows.get(rid)
            if row is not None:
                row.record_sampled(tok)
        return StepResult(launched.step_id, launched.rids, token_ids(tokens), logprobs)

    @staticmethod
    def is_done(launched) -> bool:
        """Whether a launched step's results can be read without waiting."""
        sampled = getattr(launched, "sampled", None)
        return sampled is None or sampled.copied is None or sampled.copied.query()

    def needs_sync_before(self, plan: StepPlan) -> bool:
        """Penalties read the request's full token history on the host, which a pending token is not yet in."""
        return any(s.pending and self.rows[s.rid].has_penalties for s in plan.seqs if s.rid in self.rows)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.finish(self.launch(plan))

    def _forward(self, plan: StepPlan) -> tuple:
        input_ids, layout, cu = self._layout(plan)
        if self.graphs is not None and self.graphs.can_run(layout):
            return self.graphs.run(input_ids, layout), cu
        with forward_context(self.backend):
            self.backend.plan(layout)
            return self.model(layout.positions, input_ids=input_ids), cu


@dataclass(slots=True)
class Launched:
    step_id: int
    rids: list
    sampled: Optional[Sampled]


class TokenSlots:
    """A device buffer with each live request's latest sampled token, indexed by a slot per request."""

    def __init__(self, device: torch.device, capacity: int = 1024):
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.slots: dict = {}
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
