"""Turns a StepPlan into one forward pass (and, on the driver rank, sampled tokens)."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from gpu_workers.attention.base import AttentionBackend, BatchLayout
from gpu_workers.attention.context import forward_context
from gpu_workers.attention.sdpa import SdpaBackend
from gpu_workers.models.llama import LlamaForCausalLM, iter_required
from gpu_workers.parallel import parallel_state
from gpu_workers.sampler import RowParams, Sampler
from gpu_workers.weight_loader import init_dummy, load_checkpoint
from nanoslg.config import EngineConfig
from nanoslg.protocol import StepPlan, StepResult, token_ids

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
        self.num_pages = self._count_kv_pages()
        local_heads = self.model.layers[0].self_attn.num_heads if len(self.model.layers) else spec.num_heads
        local_kv = self.model.layers[0].self_attn.num_kv_heads if len(self.model.layers) else spec.num_kv_heads
        self.backend: AttentionBackend = SdpaBackend(len(self.model.layers), self.num_pages, cfg.page_size,
                                                     local_heads, local_kv, spec.head_dim, self.dtype, self.device)
        log.info("worker ready: %s %s, %d KV pages of %d tokens, attention backend %s", self.device, self.dtype,
                 self.num_pages, cfg.page_size, self.backend.name)
        self.sampler = Sampler(self.device, cfg.seed)
        self.rows: dict = {}  # rid -> RowParams, kept while the scheduler may still schedule the request

    def _count_kv_pages(self) -> int:
        cfg, spec = self.cfg, self.cfg.model_spec
        if cfg.num_kv_pages:
            return cfg.num_kv_pages
        tp = parallel_state().tp_size
        page_bytes = AttentionBackend.bytes_per_page(len(self.model.layers), cfg.page_size,
                                                     max(1, spec.num_kv_heads // tp), spec.head_dim, self.dtype,
                                                     self.device)
        if self.device.type == "cpu":
            budget = cfg.kv_cache_memory_gb * (1 << 30)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - cfg.gpu_memory_utilization) + 2 * (1 << 30)  # activations, allocator slack
            budget = free - reserve
        # No point holding more pages than every sequence at full length could use.
        ceiling = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.page_size) + 1
        pages = min(int(budget // page_bytes), ceiling)
        if pages < 1:
            raise RuntimeError(f"no memory left for the KV cache (one page needs {page_bytes} bytes)")
        return pages

    def _layout(self, plan: StepPlan) -> tuple:
        ps = self.cfg.page_size
        seqs = plan.seqs
        q_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=len(seqs))
        max_pages = max(len(s.page_table) for s in seqs)
        tables = np.zeros((len(seqs), max_pages), dtype=np.int64)
        for b, s in enumerate(seqs):
            tables[b, :len(s.page_table)] = np.frombuffer(s.page_table, dtype=np.int32)
        input_ids = np.concatenate([np.frombuffer(s.token_ids, dtype=np.int32) for s in seqs])
        seq_of_token = np.repeat(np.arange(len(seqs)), q_lens)
        cu = np.concatenate([[0], np.cumsum(q_lens)])
        positions = starts[seq_of_token] + (np.arange(len(input_ids)) - cu[seq_of_token])
        slots = tables[seq_of_token, positions // ps] * ps + positions % ps
        dev = self.device
        layout = BatchLayout(q_lens=torch.from_numpy(q_lens).int(), start_pos=torch.from_numpy(starts).int(),
                             page_tables=torch.from_numpy(tables).int(),
                             positions=torch.from_numpy(positions).to(dev),
                             slot_mapping=torch.from_numpy(slots).to(dev))
        return torch.from_numpy(input_ids.astype(np.int64)).to(dev), layout, cu

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Optional[StepResult]:
        for rid in plan.released:
            self.rows.pop(rid, None)
        for s in plan.seqs:
            if s.params is not None:
                self.rows[s.rid] = RowParams.from_dict(s.params)
            self.rows[s.rid].record_input(s.start_pos, s.token_ids)
        if not plan.seqs:
            return StepResult(plan.step_id, [], token_ids())
        input_ids, layout, cu = self._layout(plan)
        with forward_context(self.backend):
            self.backend.plan(layout)
            hidden = self.model(layout.positions, input_ids=input_ids)
        sampling = [b for b, s in enumerate(plan.seqs) if s.sample]
        if not sampling:
            return StepResult(plan.step_id, [], token_ids())
        last = torch.tensor([int(cu[b + 1]) - 1 for b in sampling], device=self.device)
        logits = self.model.compute_logits(hidden[last])
        seqs = [plan.seqs[b] for b in sampling]
        positions = [s.start_pos + len(s.token_ids) for s in seqs]
        tokens, logprobs = self.sampler(logits, [self.rows[s.rid] for s in seqs], positions)
        return StepResult(plan.step_id, [s.rid for s in seqs], token_ids(tokens), logprobs)
