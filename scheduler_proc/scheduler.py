"""Batch formation: continuous batching with chunked prefill, NanoFlow's dense global batch (global_batch.py) and
preemption by recompute as the last resort. Pure logic with no sockets, so tests drive it directly or through the
process against a stand-in worker.

Each step takes every running decode first, then prefill chunks of running requests (oldest first) up to the dense
budget, then admits waiting requests (first come, first served) while the running set is below its target and the
KV pool can hold what they are predicted to use. A request that is part of an in-flight step is skipped until that
step's result arrives, and its pages are never freed meanwhile (an abort is deferred), so several steps may be in
flight over disjoint requests: the micro-batches of pipeline parallelism. With one stage, overlap scheduling also
chains a request's next decode on the token its in-flight step will sample.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Optional

from nanoslg.errors import ContextLengthExceeded, EmptyPrompt, Rejection
from nanoslg.protocol import RowSetup, SeqChunk, StepPlan, StepResult, TokenizedRequest, TokenUpdate, token_ids
from scheduler_proc.block_manager import BlockManager
from scheduler_proc.global_batch import BatchTargets, LengthStats, PoolForecast
from scheduler_proc.request import Request, Status
from scheduler_proc.step_stats import InFlightStep, StepStats

# (request, start, end, pending): compute the request's tokens [start, end), the last `pending` of them sampled by a
# step still in flight
Chunk = tuple[Request, int, int, int]


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, overlap: bool = False, micro_batches: int = 1,
                 enable_prefix_caching: bool = False, running_target: Optional[int] = None,
                 dense_batch_tokens: Optional[int] = None):
        self.blocks = BlockManager(num_pages, page_size, enable_prefix_caching)
        self.targets = BatchTargets(max_num_seqs, max_num_batched_tokens, running_target, dense_batch_tokens,
                                    page_size)
        self.lengths = LengthStats()
        self.max_model_len = max_model_len
        self.overlap = overlap  # plan a decode while the step that samples its input token is still running
        # Plans kept in flight over disjoint requests (pipeline stages): requests are spread evenly over them.
        self.micro_batches = micro_batches
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first: preemption takes from the end
        self.steps_in_flight: dict[int, InFlightStep] = {}
        self.to_release: list[str] = []  # finished rids whose worker-side state can go
        self.draining: set[Request] = set()  # finished requests whose pages wait for their in-flight steps
        self.unreported: list[TokenUpdate] = []  # updates decided while scheduling (not from a step result)
        self.step_ids = itertools.count()
        self.total_preemptions = 0
        self.stats = StepStats()
        self.last_step: dict[str, int] = {}

    def set_targets(self, running_target: Optional[int], dense_batch_tokens: Optional[int]) -> None:
        """Change R and D on a live engine (nanoslg tune validates its candidates this way)."""
        self.targets.running_target, self.targets.dense_batch_tokens = running_target, dense_batch_tokens

    # ------------------------------------------------------------------ intake
    def add(self, req: TokenizedRequest) -> Optional[TokenUpdate]:
        """Queue a request; returns an error update instead when it can never be served."""
        n = len(req.prompt_ids)
        error: Optional[Rejection] = None
        if req.rid in self.requests:
            error = Rejection(f"request id {req.rid!r} is already in use")
        elif n == 0:
            error = EmptyPrompt()
        elif n >= self.max_model_len:
            error = ContextLengthExceeded(n, self.max_model_len)
        elif self.blocks.pages_for(n + 1) > self.blocks.num_pages:
            error = Rejection(f"the prompt needs more KV pages than the cache holds ({self.blocks.num_pages})")
        if error:
            return TokenUpdate(req.rid, token_ids(), "rejected", None, str(error), error_code=error.code)
        max_tokens = req.params.max_tokens
        r = Request(req.rid, list(req.prompt_ids), req.params, frozenset(req.stop_token_ids),
                    int(max_tokens or self.max_model_len), max_tokens_given=bool(max_tokens))
        self.requests[r.rid] = r
        self.waiting.append(r)
        self.lengths.arrived(r)
        return None

    def abort(self, rid: str) -> None:
        r = self.requests.get(rid)
        if r is not None and r.status is not Status.FINISHED:
            self._finish(r, "abort")

    # ------------------------------------------------------------------ step formation
    def _can_chain(self, r: Request) -> bool:
        """Whether r can get its next decode now, consuming the token its one in-flight step will sample."""
        # With one step in flight and every known token computed, that step ends at the last known token, so it
        # samples; a chained step would have pushed num_computed past num_tokens.
        return (self.overlap and r.in_flight == 1 and r.num_computed == r.num_tokens
                and len(r.output_ids) + 1 < r.max_tokens and r.num_tokens + 1 < self.max_model_len)

    def _seq_cap(self) -> int:
        """Sequences this plan may take. With several micro-batches, a fair share of the requests ready to run, so
        every stage of the pipeline gets work even when few requests are running."""
        cap = self.targets.max_num_seqs
        if self.micro_batches == 1:
            return cap
        free = max(1, self.micro_batches - len(self.steps_in_flight))
        ready = sum(1 for r in self.running if not r.in_flight) + len(self.waiting)
        return max(1, min(cap, -(-ready // free)))

    @property
    def pool_tokens(self) -> int:
        return self.blocks.num_pages * self.blocks.page_size

    def schedule(self) -> Optional[StepPlan]:
        dense = self.targets.dense_tokens(self.lengths, self.pool_tokens)
        # Prefill is paced only when the running set will fill up (if every waiting request fits now, holding
        # them back would only end the last of them later) and something decodes (a cold start takes the whole D).
        paced = len(self.running) + len(self.waiting) > \
            self.targets.capacity(self.lengths, self.pool_tokens, self.micro_batches) and \
            any(r.num_tokens - r.num_computed <= 1 for r in self.running)
        step = _StepDraft(self._seq_cap(), self.targets.max_num_batched_tokens, dense,
                          self.targets.prefill_tokens(self.lengths, dense) if paced else dense)
        self._schedule_running(step)
        self._admit(step)
        if not step.chunks and not self.to_release:
            return None
        return self._make_plan(step.chunks)

    def _schedule_running(self, step: "_StepDraft") -> None:
        """Every running decode first (decodes never wait behind prefill), then unfinished prompts, oldest first,
        within the dense budget."""
        for decodes in (True, False):
            for r in list(self.running):
                if step.full or r.status is not Status.RUNNING or r in step.scheduled:
                    continue
                if r.in_flight:
                    # Never preempt under an in-flight step: it still writes these pages.
                    if decodes and self._can_chain(r) and step.room(True) > 0 and \
                            (not step.blocked or self._fits(r, r.num_computed + 1)) and \
                            self.blocks.grow(r, r.num_computed + 1):
                        step.add(r, r.num_computed, r.num_computed + 1, 1, decode=True)
                    continue
                left = r.num_tokens - r.num_computed
                if (left == 1) != decodes:
                    continue
                room = step.room(decodes)
                if room <= 0:
                    continue
                end = r.num_computed + min(left, room)
                if not self._make_room(r, end, step.scheduled):
                    step.blocked = True
                    continue
                step.add(r, r.num_computed, end, 0, decode=decodes)

    def _admit(self, step: "_StepDraft") -> None:
        """Waiting requests, first come first served, while the running set is below its target, the step has
        budget and the pool can hold what the running requests and this one are predicted to use."""
        target = self.targets.target * self.micro_batches
        filling = None  # prefix-cache keys of the pages this step computes, once a waiting request needs them
        forecast = None  # the most pages the running requests are predicted to hold at once
        while self.waiting and not step.blocked and not step.full and step.room(False) > 0 and \
                len(self.running) < target:
            r = self.waiting[0]
            self.blocks.reuse_cached_prefix(r)
            if self.blocks.enable_prefix_caching:
                filling = filling if filling is not None else \
                    {k for c in step.chunks for k in self.blocks.filled_keys(*c)}
                if self.blocks.next_page_in(r, filling):
                    # Cache-aware admission: this step already computes r's next page for another request, so r
                    # starts one step later and reads it from the cache. It waits no longer than the sharer takes
                    # to compute the shared prefix, and those behind it keep their order.
                    self.blocks.drop_pages(r)
                    return
            if forecast is None:
                # pages the running requests hold, each once: the used ones less those of finished requests
                # whose steps are still in flight (a page shared with a running request counts as theirs)
                running_pages = self.blocks.num_used - sum(len(d.pages) for d in self.draining)
                forecast = PoolForecast(self.running, self.lengths, self.max_model_len, self.blocks.page_size,
                                        self.blocks.num_free, running_pages)
            if self.running and not forecast.fits(r):
                self.blocks.drop_pages(r)  # the pool cannot hold it at its predicted size: admit less
                return
            end = min(r.num_tokens, r.num_computed + step.room(False))
            if not self.blocks.grow(r, end):
                self.blocks.drop_pages(r)  # a waiting request holds no pages: they stay cached for it and others
                if self.blocks.num_used == 0:
                    # Nothing else holds pages (not even a finished request draining an in-flight step), so this
                    # request can never fit: fail it rather than spin.
                    self.waiting.popleft()
                    self._finish(r, "rejected")
                    self.unreported.append(TokenUpdate(r.rid, token_ids(), "rejected", None,
                                                       "the request needs more KV pages than the cache holds"))
                    continue
                return
            self.waiting.popleft()
            if not r.num_preemptions:
                self.blocks.count_lookup(r)
                r.first_scheduled = time.monotonic()
            r.status = Status.RUNNING
            self.running.append(r)
            forecast.add(r)
            step.add(r, r.num_computed, end, 0, decode=False)
            if filling is not None:
                filling.update(self.blocks.filled_keys(r, r.num_computed, end, 0))

    def _make_plan(self, chunks: list[Chunk]) -> StepPlan:
        seqs, members = [], []
        for r, start, end, pending in chunks:
            sample = pending > 0 or end == r.num_tokens
            seqs.append(SeqChunk(r.rid, token_ids(r.token_slice(start, end - pending)), start, token_ids(r.pages),
                                 sample, None if r.params_sent else self._row_setup(r, start), pending))
            r.params_sent = True
            r.num_computed = end
            self.blocks.register_full_pages(r, min(end, r.num_tokens))
            r.in_flight += 1
            members.append(r.rid)
        step_id = next(self.step_ids)
        shape = self.stats.shape(chunks)
        self.steps_in_flight[step_id] = InFlightStep(members, shape.num_tokens, shape)
        plan = StepPlan(step_id, seqs, self.to_release)
        self.to_release = []
        if chunks:
            self.last_step = {"step_id": step_id, "num_seqs": len(chunks), "num_decode": shape.num_decode,
                              "num_prefill": len(chunks) - shape.num_decode, "num_tokens": shape.num_tokens}
        return plan

    @staticmethod
    def _row_setup(r: Request, start: int) -> RowSetup:
        setup = RowSetup(r.params, len(r.prompt_ids))
        if r.params.structured_outputs:  # a grammar ends on what ends the request (EOS unless ignored)
            setup.stop_token_ids = sorted(r.stop_token_ids)
        if start and r.params.has_penalties:
            # Penalties count every token seen; those of a cached prefix reach the worker only through here.
            setup.prefix_ids = token_ids(r.prompt_ids[:start])
        return setup

    def _make_room(self, r: Request, end: int, scheduled: set[Request]) -> bool:
        """Give r pages for its tokens up to `end`, preempting the newest requests admitted after it that are
        neither in flight nor already in this step. False when r cannot run in this step: it waits, pages kept, for
        newer requests whose steps are in flight to come back (preempting itself instead would hand its pages to
        lower priorities, and two requests could take turns undoing each other's work forever); if nothing newer
        exists, r is the lowest priority and is itself preempted."""
        while not self.blocks.grow(r, end):
            newer = self.running[self.running.index(r) + 1:]
            victim = next((v for v in reversed(newer) if not v.in_flight and v not in scheduled), None)
            if victim is None:
                if not newer:
                    self._preempt(r)
                return False
            self._preempt(victim)
        return True

    def _fits(self, r: Request, num_tokens: int) -> bool:
        return self.blocks.pages_for(num_tokens) <= len(r.pages)

    def _preempt(self, r: Request) -> None:
        """Free r's pages and queue it first in line; it recomputes prompt + output so far when resumed."""
        self.running.remove(r)
        self.blocks.drop_pages(r)
        r.status = Status.WAITING
        r.num_preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(r)

    # ------------------------------------------------------------------ results
    def on_result(self, result: StepResult) -> list[TokenUpdate]:
        """Apply a step's sampled tokens; returns TokenUpdates for the requests that advanced or ended."""
        step = self.steps_in_flight.pop(result.step_id, None)
        members = step.rids if step is not None else []
        if step is not None and result.error is None:
            self.stats.record(step.shape, result.gpu_ms, result.op_ms)
        for rid in members:
            r = self.requests.get(rid)
            if r is not None:
                r.in_flight -= 1
        updates = []
        if result.error is not None:
            for rid in members:
                r = self.requests.get(rid)
                if r is not None and r.status is not Status.FINISHED:
                    self.blocks.forget(r.pages)  # what the failed step was to write there is not in the cache
                    self._finish(r, "error")
                    updates.append(TokenUpdate(rid, token_ids(), "error", None, result.error))
        else:
            for rid, error, reason, code in result.row_errors or ():  # first: their tokens this step are void
                r = self.requests.get(rid)
                if r is not None and r.status is not Status.FINISHED:
                    self._finish(r, reason)
                    updates.append(TokenUpdate(rid, token_ids(), reason, None, error, error_code=code))
            logprobs = result.logprobs or [None] * len(result.rids)
            grammar_ended = set(result.grammar_ended or ())
            for rid, tok, lp in zip(result.rids, result.token_ids, logprobs):
                r = self.requests.get(rid)
                if r is None or r.status is Status.FINISHED:
                    continue  # finished (or aborted) while this step ran: its token is void
                r.output_ids.append(tok)
                reason = None
                if tok in r.stop_token_ids or rid in grammar_ended:  # a complete structured output stops too
                    reason = "stop"
                elif len(r.output_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
                    reason = "length"
                if reason:
                    self._finish(r, reason)
                update = TokenUpdate(rid, token_ids([tok]), reason, None if lp is None else [lp],
                                     num_cached_tokens=r.num_cached_tokens)
                if len(r.output_ids) == 1:
                    update.queue_time = r.first_scheduled - r.arrival
                    update.prefill_time = time.monotonic() - r.first_scheduled
                updates.append(update)
        for rid in members:
            r = self.requests.get(rid)
            if r is not None and r.status is Status.FINISHED and not r.in_flight:
                self._release(r)
        return updates

    def _finish(self, r: Request, reason: str) -> None:
        """End r now; its pages go back once no in-flight step uses them."""
        if r.status is Status.RUNNING:
            self.running.remove(r)
        elif r.status is Status.WAITING and r in self.waiting:
            self.waiting.remove(r)
        r.status, r.finish_reason = Status.FINISHED, reason
        if reason in ("stop", "length"):
            self.lengths.finished(len(r.output_ids))
        if not r.in_flight:
            self._release(r)
        else:
            self.draining.add(r)

    def _release(self, r: Request) -> None:
        self.draining.discard(r)
        self.blocks.drop_pages(r)
        del self.requests[r.rid]
        if r.params_sent:
            self.to_release.append(r.rid)

    # ------------------------------------------------------------------ introspection
    def state(self) -> dict[str, Any]:
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "preempted": sum(1 for r in self.waiting if r.num_preemptions),
            "total_preemptions": self.total_preemptions,
            "kv_pages_used": self.blocks.num_used,
            "kv_pages_free": self.blocks.num_free,
            "kv_pages_total": self.blocks.num_pages,
            "kv_pages_cached": self.blocks.num_cached,  # pages holding a cached prefix, held or evictable
            "kv_pages_evictable": len(self.blocks.evictable),
            "prefix_cache_queries": self.blocks.query_tokens,  # prompt tokens looked up / found, since start
            "prefix_cache_hits": self.blocks.hit_tokens,
            "steps_in_flight": len(self.steps_in_flight),
            # one entry per plan in flight: with pipeline parallelism, the micro-batch each stage is working on
            "micro_batches": [{"step_id": i, "num_seqs": len(s.rids), "num_tokens": s.num_tokens}
                              for i, s in self.steps_in_flight.items()],
            "last_step": dict(self.last_step),
            "running_target": self.targets.target * self.micro_batches,
            "dense_batch_tokens": self.targets.dense_tokens(self.lengths, self.pool_tokens),
            "step_stats": self.stats.totals(),
        }


class _StepDraft:
    """The step being formed: its chunks (request, start, end, pending) and the budget they leave. Decodes may use
    up to max_num_batched_tokens; prefill chunks fill the step up to the dense budget, and take at most the
    prefill share of it while requests are decoding (the pace at which requests finish and are replaced; faster, a
    cold start fills the running set in fewer steps than an output takes, and those requests finish together)."""

    __slots__ = ("chunks", "scheduled", "blocked", "used", "prefill_used", "max_seqs", "cap", "dense", "prefill")

    def __init__(self, max_seqs: int, cap: int, dense: int, prefill: int):
        self.chunks: list[Chunk] = []
        self.scheduled: set[Request] = set()
        self.blocked = False  # an older request waits for pages: newer ones take none before it
        self.used = self.prefill_used = 0
        self.max_seqs, self.cap, self.dense = max_seqs, cap, min(dense, cap)
        self.prefill = min(prefill, self.dense)

    @property
    def full(self) -> bool:
        return len(self.chunks) >= self.max_seqs

    def room(self, decode: bool) -> int:
        if decode:
            return self.cap - self.used
        return min(self.dense - self.used, self.prefill - self.prefill_used)

    def add(self, r: Request, start: int, end: int, pending: int, decode: bool) -> None:
        self.chunks.append((r, start, end, pending))
        self.scheduled.add(r)
        self.used += end - start
        if not decode:
            self.prefill_used += end - start
