"""Turns a StepPlan into this rank's part of one forward pass: the first pipeline stage embeds the plan's tokens, the
others receive the previous stage's activations; every stage runs its layers (TP ranks all-reduce inside them);
the last stage samples, the others send their activations on. The layout only changes which of these apply."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, cast

import torch

from gpu_workers import step_profiler
from gpu_workers.attention.base import AttentionBackend
from gpu_workers.attention.context import forward_context
from gpu_workers.attention.flashinfer_backend import FlashInferBackend, flashinfer_usable
from gpu_workers.attention.sdpa import SdpaBackend
from gpu_workers.batch_layout import StepBatch, TokenSlots, build_batch
from gpu_workers.cuda_graphs import DecodeGraphs
from gpu_workers.device_choice import resolve_device, resolve_dtype
from gpu_workers.grammar import GrammarBook
from gpu_workers.layers import fused_ops
from gpu_workers.layers.linear_methods import process_weights
from gpu_workers.models.llama import DecoderLayer, LlamaForCausalLM, iter_required
from gpu_workers.nano_batch import GEMM, OTHER, OpRunner, OpTimer
from gpu_workers import piecewise_graphs
from gpu_workers.piecewise_graphs import PiecewiseGraphs
from gpu_workers.parallel import StageLink, parallel_state
from gpu_workers.sequence_parallel import shard_rows
from gpu_workers.sampler import RowParams, Sampled, Sampler
from gpu_workers.step_profiler import StepSpan
from gpu_workers.upload import upload
from gpu_workers.weight_loader import init_dummy, load_checkpoint
from nanoslg.config import ResolvedConfig
from nanoslg.errors import InvalidGrammar
from nanoslg.protocol import RowSetup, SeqChunk, StepPlan, StepResult, token_ids
from nanoslg.sampling_params import SamplingParams

log = logging.getLogger("nanoslg.worker")

DEAD_END = InvalidGrammar("no token of the model's vocabulary can continue the output here (the grammar asks for "
                          "characters its tokenizer cannot write)")
class ModelRunner:
    def __init__(self, cfg: ResolvedConfig, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.ps = parallel_state()
        spec = cfg.model_spec
        self.device = device or resolve_device(cfg, 0)
        self.dtype = resolve_dtype(cfg, self.device)
        torch.manual_seed(cfg.seed)
        quant = cfg.quant_scheme
        if quant is not None and cfg.load_format == "dummy":  # random values: made in the model's dtype, quantized
            quant = dataclasses.replace(quant, source="online", weight_scales="channel", static_input_scales=False)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(spec, self.dtype, max(cfg.max_model_len, spec.max_position_embeddings),
                                          quant)
        self.model.eval()
        self.weight_bytes_read = 0
        if cfg.load_format == "dummy":
            init_dummy(self.model, cfg.seed)
        else:
            targets = self.model.checkpoint_targets()
            self.weight_bytes_read = load_checkpoint(targets, set(iter_required(targets, spec)), cfg.model)
        # how the FP8 weights run: "FP8 GEMMs", or dequantized to the model's dtype (and why)
        self.fp8_compute = process_weights(self.model, self.dtype, self.device)
        self.weights_dtype = "fp8" if quant is not None else str(self.dtype).removeprefix("torch.")
        if quant is not None:
            log.info("%s; %s", quant.describe(), self.fp8_compute)
        self.stage_link = StageLink(spec.hidden_size, self.dtype, self.device) if self.ps.pp_size > 1 else None
        self.backend_cls = self._choose_backend()
        fused_ops.enable_for(self.device, wanted=self.backend_cls.uses_fused_ops)
        # constrained decoding where tokens are sampled; the worker loop gives the driver its on_compiled
        self.grammars = GrammarBook(cfg, spec.vocab_size, self.device) if self.ps.is_last_stage else None
        self.sampler = Sampler(self.device, cfg.seed, self.grammars)
        self.row_errors: list[list[Any]] = []  # [rid, error, reason, code] of requests failed alone, reported next
        self.rows: dict[str, RowParams] = {}  # kept while the scheduler may still schedule the request
        self.token_slots = TokenSlots(self.device)
        self.graphs = None
        self.nano_batches = cfg.nano_batches
        self.sequence_parallel = cfg.sequence_parallel and self.ps.tp_size > 1
        self.op_runner = self.make_op_runner(cfg.nano_overlap)
        self.kv_dtype = "fp8" if cfg.kv_cache_dtype == "fp8" else \
            str(AttentionBackend.attention_dtype(self.dtype, self.device)).removeprefix("torch.")
        self.piecewise: Optional[PiecewiseGraphs] = None
        self.num_pages = self._count_kv_pages()  # on a GPU, after the piecewise graphs took their memory
        self.backend = self._make_backend(self.num_pages)
        if self.piecewise is None and self._piecewise_tokens():
            self.piecewise = PiecewiseGraphs(self.model, self._piecewise_tokens(), self.ps.is_first_stage,
                                             capture=piecewise_graphs.mode() != "eager")
        log.info("worker %d (tp %d/%d, pp %d/%d, layers %d-%d): %s, weights %s, %d torch threads, %d %s KV pages "
                 "of %d tokens, attention backend %s (%s), fused ops %s", self.ps.rank, self.ps.tp_rank,
                 self.ps.tp_size, self.ps.pp_rank, self.ps.pp_size, self.model.layer_range.start,
                 self.model.layer_range.stop - 1, self.device, self.weights_dtype, torch.get_num_threads(),
                 self.num_pages, self.kv_dtype, cfg.page_size,
                 self.backend.name, self.backend_reason, "on" if fused_ops.enabled() else "off")
        if self._captures_graphs():
            self.graphs = DecodeGraphs(self.model, self.backend, self.op_runner,
                                       min(cfg.cuda_graph_max_batch, cfg.max_num_seqs), cfg.max_model_len,
                                       cfg.page_size, self.ps.is_first_stage, self.nano_batches)

    def _captures_graphs(self) -> bool:
        return self.device.type == "cuda" and self.backend_cls.supports_cuda_graphs and not self.cfg.enforce_eager

    def _piecewise_tokens(self) -> int:
        """The largest step the piecewise graphs take (0: none): one nano-batch steps, where CUDA graphs are
        captured (NANOSLG_PIECEWISE_GRAPHS=eager: padded and cut like them, uncaptured, on any device)."""
        how = piecewise_graphs.mode()
        if how == "0" or self.nano_batches != 1 or not (how == "eager" or self._captures_graphs()):
            return 0
        return max(0, min(self.cfg.cuda_graph_max_tokens, self.cfg.max_num_batched_tokens))

    def make_op_runner(self, overlap: str) -> OpRunner:
        """The runner for nano-batches whose operations of the overlap classes ("network", "memory", joined by
        +) run on their own streams; side streams only where the attention backend allocates nothing."""
        classes = frozenset(c for c in overlap.split("+") if c in ("network", "memory"))
        if not self.backend_cls.runs_on_side_streams:
            classes = frozenset()
        return OpRunner(self.device, classes)

    def _choose_backend(self) -> type[AttentionBackend]:
        choice = self.cfg.attention_backend
        usable, reason = flashinfer_usable(self.device)
        if choice == "flashinfer" and not usable:
            raise RuntimeError(f"--attention-backend flashinfer cannot run: {reason}")
        if choice == "sdpa" or not usable:
            self.backend_reason = "asked for" if choice == "sdpa" else f"flashinfer unusable: {reason}"
            return SdpaBackend
        self.backend_reason = reason
        return FlashInferBackend

    def _page_bytes(self) -> int:
        attn = cast(DecoderLayer, self.model.layers[0]).self_attn  # nn.ModuleList's items are typed Module
        return AttentionBackend.bytes_per_page(len(self.model.layers), self.cfg.page_size, attn.num_kv_heads,
                                               self.cfg.model_spec.head_dim, self.dtype, self.device,
                                               self.cfg.kv_cache_dtype == "fp8")

    def _make_backend(self, num_pages: int) -> AttentionBackend:
        attn = cast(DecoderLayer, self.model.layers[0]).self_attn
        return self.backend_cls(len(self.model.layers), num_pages, self.cfg.page_size, attn.num_heads,
                                attn.num_kv_heads, self.cfg.model_spec.head_dim, self.dtype, self.device,
                                self.cfg.kv_cache_dtype == "fp8")

    def _count_kv_pages(self) -> int:
        """KV pages this rank can hold: each rank sizes from its own layers and heads; the scheduler takes the
        smallest count over all ranks."""
        cfg = self.cfg
        if cfg.num_kv_pages:
            return cfg.num_kv_pages
        page_bytes = self._page_bytes()
        if self.device.type == "cpu":
            budget = cfg.kv_cache_memory_gb * (1 << 30)
        else:
            budget = self._profile_free_memory()
        # No point holding more pages than every sequence at full length could use, in every micro-batch.
        ceiling = cfg.max_steps_in_flight * cfg.max_num_seqs * -(-cfg.max_model_len // cfg.page_size) + 1
        pages = min(int(budget // page_bytes), ceiling)
        if pages < 1:
            raise RuntimeError(f"no memory left for the KV cache (one page needs {page_bytes} bytes)")
        return pages

    def _profile_free_memory(self) -> float:
        """Bytes the KV cache may take: the GPU's share (gpu_memory_utilization) minus the peak of a forward pass at
        the largest step the scheduler can form (max_num_batched_tokens prefill tokens, logits for max_num_seqs).
        The pass is stage-local: other stages' activations are stood in for, nothing is sent or received. The
        piecewise graphs are captured here (self.piecewise), after the pass and before the KV cache, and their pool
        is taken from the budget."""
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
        self.backend = self._make_backend(probe_pages)
        plan = StepPlan(-1, [SeqChunk(f"probe{i}", token_ids([1] * n), 0, token_ids(p), True,
                                      RowSetup(SamplingParams(temperature=1.0, top_p=0.9), n))
                             for i, (n, p) in enumerate(zip(lens, pages))])
        self.execute(plan, stage_local=True)
        self.launch(StepPlan(-1, [], [s.rid for s in plan.seqs]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del self.backend
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info(self.device)[1]
        kv_bytes = self._page_bytes() * probe_pages
        # the probe's own KV pages are not activations; the piecewise graphs' pool is captured now and measured,
        # decode graphs and fragmentation get 1 GiB of headroom
        pool = 0
        if self._piecewise_tokens() and piecewise_graphs.mode() != "eager":
            before = torch.cuda.memory_reserved(self.device)
            self.piecewise = PiecewiseGraphs(self.model, self._piecewise_tokens(), self.ps.is_first_stage)
            torch.cuda.empty_cache()
            pool = torch.cuda.memory_reserved(self.device) - before
        budget = total * cfg.gpu_memory_utilization - (peak - kv_bytes) - pool - (1 << 30)
        log.info("memory profile: peak %.1f GiB at %d tokens, piecewise graphs %.2f GiB, KV budget %.1f GiB",
                 peak / 2 ** 30, tokens, pool / 2 ** 30, budget / 2 ** 30)
        return budget

    def batch(self, plan: StepPlan) -> StepBatch:
        return build_batch(plan, self.cfg.page_size, self.token_slots, self.device, self.nano_batches)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, stage_local: bool = False,
               between_layers: Optional[Callable[[], None]] = None) -> "Launched":
        """Queue this rank's part of the plan on the device without waiting for it. stage_local: stand in for
        the activations of other stages instead of exchanging them (memory profiling). between_layers: called
        after each layer of an eager forward pass, after each attention of a piecewise-graph step. A step with
        constrained rows leaves its sampling to complete(), which runs once the previous step's tokens advanced
        the matchers."""
        for rid in plan.released:
            self.rows.pop(rid, None)
            self.token_slots.free(rid)
            if self.grammars is not None:
                self.grammars.release(rid)
        for s in plan.seqs:
            if s.setup is not None:
                self.rows[s.rid] = RowParams.from_setup(s.setup)
                if self.grammars is not None and s.setup.params.structured_outputs:
                    self._add_matcher(self.grammars, s.rid, s.setup.params.structured_outputs, s.setup.stop_token_ids)
            self.rows[s.rid].record_input(s.start_pos, s.token_ids, s.pending)
        if not plan.seqs:
            return Launched(plan.step_id, [], None)
        every = self.cfg.op_timing_every
        timer = OpTimer(self.device.type == "cuda") if every and plan.step_id % every == 0 else None
        span = StepSpan(self.device)
        batch = self.batch(plan)
        step_profiler.mark("batch")
        self.op_runner.timer, self.op_runner.between_layers = timer, between_layers
        try:
            hidden = self._forward(batch, stage_local, timer)
            sampling = [b for b, s in enumerate(batch.seqs) if s.sample]
            if hidden is None or not sampling:  # not the last stage, or no sequence reached its end
                span.end()
                return Launched(plan.step_id, [], None, span, timer)
            step_profiler.mark("forward")
            seqs = [batch.seqs[b] for b in sampling]
            last = upload([int(batch.cu[b + 1]) - 1 for b in sampling], self.device)
            logits = self._timed(timer, GEMM, self.model.compute_logits, hidden[last], False)
        finally:
            self.op_runner.timer = self.op_runner.between_layers = None
        step_profiler.mark("logits")
        launched = Launched(plan.step_id, [s.rid for s in seqs], None, span, timer, (logits, seqs))
        if self.sampler.constrains(launched.rids):
            span.pause()  # the device may wait for the grammar's bitmask: not the step's own time
        else:
            self.complete(launched)
            step_profiler.mark("sampled")
        return launched

    def _add_matcher(self, grammars: GrammarBook, rid: str, spec: dict[str, Any], stop_token_ids: list[int]) -> None:
        try:
            grammars.add(rid, spec, stop_token_ids)
        except Exception as e:  # the request fails alone (its grammar compiled on the driver: should not happen)
            self.row_errors.append([rid, f"structured output: {e}", "error", None])

    @torch.inference_mode()
    def complete(self, launched: "Launched") -> None:
        """Sample a launched step whose logits wait (no-op otherwise), applying the grammar bitmasks."""
        if launched.logits is None:
            return
        logits, seqs = launched.logits
        launched.logits = None
        rows = [self.rows[s.rid] for s in seqs]
        positions = [s.start_pos + len(s.token_ids) + s.pending for s in seqs]
        mask = self.sampler.grammar_mask(launched.rids)
        for i in mask.dead_ends if mask is not None else ():
            # no token of the vocabulary continues the output (e.g. a character the tokenizer cannot write): the
            # request is refused rather than sampled outside its grammar
            self.row_errors.append([seqs[i].rid, str(DEAD_END), "rejected", DEAD_END.code])
        assert launched.span is not None  # launch() gives every step with logits its span
        launched.span.resume()
        sampled = self._timed(launched.timer, OTHER, self.sampler, logits, rows, positions, mask)
        # Keep each request's newest token on the device for a decode already planned on top of it.
        slot_ids = upload([self.token_slots.slot(s.rid) for s in seqs], self.device)
        self.token_slots.tokens[slot_ids] = sampled.tokens
        launched.span.end()
        sampled.start_copy()
        launched.sampled = sampled

    @staticmethod
    def _timed(timer: Optional[OpTimer], kind: str, fn, *args):
        return fn(*args) if timer is None else timer.time(kind, fn, *args)

    def _forward(self, batch: StepBatch, stage_local: bool, timer: Optional[OpTimer]) -> Optional[torch.Tensor]:
        """Final hidden states on the last stage, else None (the activations went on to the next stage)."""
        graphed = timer is None and self.graphs is not None and self.graphs.nano_batches == self.nano_batches and \
            self.graphs.can_run(batch.layout)
        piecewise = self.piecewise if timer is None and not graphed and len(batch.parts) == 1 and \
            self.piecewise is not None and self.piecewise.can_run(len(batch.input_ids)) else None
        # sequence parallelism in eager steps only (a graph holds the unsplit layers); every rank decides alike
        sp = self.sequence_parallel and not graphed and piecewise is None
        n = sum(shard_rows(b - a) for a, b in batch.token_bounds) if sp else len(batch.input_ids)
        if self.ps.is_first_stage:
            inputs = {"input_ids": batch.input_ids}
        elif stage_local:
            stand_in = torch.zeros(n, self.cfg.model_spec.hidden_size, dtype=self.dtype, device=self.device)
            inputs = {"hidden": stand_in, "residual": stand_in.clone()}
        else:
            assert self.stage_link is not None  # pp > 1 on any stage but the first
            hidden, residual = self.stage_link.recv(n)
            inputs = {"hidden": hidden, "residual": residual}
        if graphed and self.graphs is not None:  # graphed implies graphs
            out = self.graphs.run(batch.layout, **inputs)
        else:
            with forward_context(self.backend):
                self.backend.begin_planning()
                plans = [self.backend.plan(layout, slot=i) for i, layout in enumerate(batch.part_layouts())]
                self.backend.finish_planning()
                step_profiler.mark("planned")
                if piecewise is not None:
                    out = piecewise.run(batch.layout, plans[0], self.op_runner.between_layers, **inputs)
                else:
                    out = self.model(batch.layout.positions, plans, batch.token_bounds, self.op_runner,
                                     sequence_parallel=sp, **inputs)
        if self.ps.is_last_stage:
            return out
        if not stage_local:
            assert self.stage_link is not None  # pp > 1 on any stage but the last
            self.stage_link.send(*out)
        return None

    def forward(self, batch: StepBatch, timer: Optional[OpTimer] = None) -> None:
        """A whole step's forward pass, the LM head on its sampling rows included, without sampling and without
        touching any request's state (nanoslg tune's step timings)."""
        hidden = self._forward(batch, False, timer)
        rows = [int(batch.cu[b + 1]) - 1 for b, s in enumerate(batch.seqs) if s.sample]
        if hidden is not None and rows:
            self._timed(timer, GEMM, self.model.compute_logits, hidden[upload(rows, self.device)], False)

    @torch.inference_mode()
    def logits(self, plan: StepPlan, every_token: bool = False) -> torch.Tensor:
        """Logits at each sequence's last token, in the plan's order (every_token: at every token of the step, in
        the batch's order), from one forward pass that samples nothing and keeps no request state (the GPU tests'
        teacher forcing, bench quality's perplexity)."""
        batch = self.batch(plan)
        hidden = self._forward(batch, stage_local=True, timer=None)
        assert hidden is not None  # logits come from the last stage
        if every_token:
            return self.model.compute_logits(hidden)
        row = {s.rid: b for b, s in enumerate(batch.seqs)}
        last = upload([int(batch.cu[row[s.rid] + 1]) - 1 for s in plan.seqs], self.device)
        return self.model.compute_logits(hidden[last])

    def finish(self, launched: "Launched") -> StepResult:
        """Wait for a launched step and report its tokens (the step's one host synchronisation), with its device
        time (and, on a timed step, the time of each operation class)."""
        self.complete(launched)
        if launched.sampled is None:
            result = StepResult(launched.step_id, [], token_ids())
        else:
            tokens, logprobs = launched.sampled.to_host()
            for rid, tok in zip(launched.rids, tokens):
                row = self.rows.get(rid)
                if row is not None:
                    row.record_sampled(tok)
            result = StepResult(launched.step_id, launched.rids, token_ids(tokens), logprobs)
            if self.grammars is not None and self.grammars.matchers:
                ended, failed = self.grammars.advance(launched.rids, tokens)
                result.grammar_ended = ended or None
                self.row_errors += [[rid, error, "error", None] for rid, error in failed]
        if self.row_errors:
            result.row_errors, self.row_errors = self.row_errors, []
        if launched.span is not None:
            result.gpu_ms = launched.span.ms()
            if launched.timer is not None:
                op_ms = launched.timer.result()
                # what no operation covers (the embedding, index building, waits inside the step) counts as other
                op_ms[OTHER] += max(0.0, result.gpu_ms - sum(op_ms.values()))
                result.op_ms = op_ms
        return result

    @staticmethod
    def is_done(launched) -> bool:
        """Whether a launched step's results can be read without waiting: its tokens' copy to the host, or (a step
        that sampled nothing: a middle prefill chunk, a stage before the last) the end of its device span."""
        sampled = getattr(launched, "sampled", None)
        if sampled is not None and sampled.copied is not None:
            return bool(sampled.copied.query())
        span = getattr(launched, "span", None)
        return span is None or span.done()

    def needs_sync_before(self, plan: StepPlan) -> bool:
        """Penalties read the request's full token history on the host, which a pending token is not yet in."""
        return any(s.pending and self.rows[s.rid].params.has_penalties for s in plan.seqs if s.rid in self.rows)

    def execute(self, plan: StepPlan, stage_local: bool = False) -> StepResult:
        return self.finish(self.launch(plan, stage_local))


@dataclass(slots=True)
class Launched:
    step_id: int
    rids: list[str]
    sampled: Optional[Sampled]
    span: Optional[StepSpan] = None
    timer: Optional[OpTimer] = None
    logits: Optional[tuple[torch.Tensor, list[SeqChunk]]] = None  # (logits, sampling chunks) until complete()
