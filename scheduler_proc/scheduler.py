"""Batch formation: continuous batching with chunked prefill, mixed prefill + decode steps and preemption by
recompute. Pure logic with no sockets, so tests drive it directly or through the process against a stand-in worker.

A request that is part of an in-flight step is skipped until that step's result arrives, and its pages are never
freed meanwhile (an abort is deferred), so several steps may be in flight over disjoint requests: the micro-batches
of pipeline parallelism. With one stage, overlap scheduling also chains a request's next decode on the token its
in-flight step will sample.
"""
from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from nanoslg.protocol import SeqChunk, StepPlan, StepResult, TokenizedRequest, TokenUpdate, token_ids
from nanoslg.sampling_params import penalties_requested
from scheduler_proc.block_manager import ROOT_HASH, BlockManager, page_key


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class InFlightStep:
    rids: list
    num_tokens: int


@dataclass(slots=True, eq=False)
class Request:
    rid: str
    prompt_ids: list
    params: dict
    stop_token_ids: frozenset
    max_tokens: int
    output_ids: list = field(default_factory=list)
    pages: list = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache (or being written by an in-flight step)
    status: Status = Status.WAITING
    in_flight: int = 0  # steps in flight that include this request
    params_sent: bool = False
    num_preemptions: int = 0
    finish_reason: Optional[str] = None
    page_keys: list = field(default_factory=list)  # prefix-cache keys of the full pages of the known tokens
    num_registered: int = 0  # leading pages offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float = 0.0  # when it first left the waiting queue

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:  # decode steps: avoid copying the whole prompt
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, overlap: bool = False, micro_batches: int = 1,
                 enable_prefix_caching: bool = False):
        self.blocks = BlockManager(num_pages, page_size, enable_prefix_caching)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.overlap = overlap  # plan a decode while the step that samples its input token is still running
        # Plans kept in flight over disjoint requests (pipeline stages): requests are spread evenly over them.
        self.micro_batches = micro_batches
        self.requests: dict = {}
        self.waiting: deque = deque()
        self.running: list = []  # oldest first: preemption takes from the end
        self.steps_in_flight: dict = {}  # step_id -> InFlightStep
        self.to_release: list = []  # finished rids whose worker-side state can go
        self.unreported: list = []  # updates decided while scheduling (not from a step result)
        self.step_ids = itertools.count()
        self.total_preemptions = 0
        self.last_step: dict = {}

    # ------------------------------------------------------------------ intake
    def add(self, req: TokenizedRequest) -> Optional[TokenUpdate]:
        """Queue a request; returns an error update instead when it can never be served."""
        n = len(req.prompt_ids)
        error = None
        if req.rid in self.requests:
            error = f"request id {req.rid!r} is already in use"
        elif n == 0:
            error = "the prompt is empty"
        elif n >= self.max_model_len:
            error = (f"the prompt has {n} tokens, which leaves no room to generate within max_model_len="
                     f"{self.max_model_len}")
        elif self.blocks.pages_for(n + 1) > self.blocks.num_pages:
            error = f"the prompt needs more KV pages than the cache holds ({self.blocks.num_pages})"
        if error:
            return TokenUpdate(req.rid, token_ids(), "rejected", None, error)
        params = req.params
        r = Request(req.rid, list(req.prompt_ids), params, frozenset(req.stop_token_ids),
                    int(params.get("max_tokens") or self.max_model_len))
        self.requests[r.rid] = r
        self.waiting.append(r)
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
        if self.micro_batches == 1:
            return self.max_num_seqs
        free = max(1, self.micro_batches - len(self.steps_in_flight))
        ready = sum(1 for r in self.running if not r.in_flight) + len(self.waiting)
        return max(1, min(self.max_num_seqs, -(-ready // free)))

    def schedule(self) -> Optional[StepPlan]:
        budget = self.max_num_batched_tokens
        max_seqs = self._seq_cap()
        chunks: list = []  # (request, start, end)
        scheduled: set = set()
        blocked = False  # an older request waits for pages: newer ones take none before it
        for r in list(self.running):
            if len(chunks) >= max_seqs or budget == 0:
                break
            if r.status is not Status.RUNNING:
                continue
            if r.in_flight:
                # Never preempt under an in-flight step: it still writes these pages.
                if self._can_chain(r) and (not blocked or self._fits(r, r.num_computed + 1)) and \
                        self._grow(r, r.num_computed + 1):
                    chunks.append((r, r.num_computed, r.num_computed + 1, 1))
                    scheduled.add(r)
                    budget -= 1
                continue
            end = min(r.num_tokens, r.num_computed + budget)
            if not self._make_room(r, end):
                blocked = True
                continue
            chunks.append((r, r.num_computed, end, 0))
            scheduled.add(r)
            budget -= end - r.num_computed
        filling = None  # prefix-cache keys of the pages this step computes, once a waiting request needs them
        while self.waiting and not blocked and len(chunks) < max_seqs and budget > 0:
            r = self.waiting[0]
            self._reuse_cached_prefix(r)
            if self.blocks.enable_prefix_caching:
                filling = filling if filling is not None else {k for c in chunks for k in self._filled_keys(*c)}
                if self._next_page_in(r, filling):
                    # Cache-aware admission: this step already computes r's next page for another request, so r
                    # starts one step later and reads it from the cache. It waits no longer than the sharer takes
                    # to compute the shared prefix, and those behind it keep their order.
                    self._drop_pages(r)
                    break
            end = min(r.num_tokens, r.num_computed + budget)
            if not self._grow(r, end):
                self._drop_pages(r)  # a waiting request holds no pages: they stay cached for it and others
                if self.blocks.num_used == len(r.pages):
                    # Nothing else holds pages (not even a finished request draining an in-flight step), so this
                    # request can never fit: fail it rather than spin.
                    self.waiting.popleft()
                    self._finish(r, "rejected")
                    self.unreported.append(TokenUpdate(r.rid, token_ids(), "rejected", None,
                                                       "the request needs more KV pages than the cache holds"))
                    continue
                break
            self.waiting.popleft()
            if not r.num_preemptions:
                self.blocks.query_tokens += len(r.prompt_ids)
                self.blocks.hit_tokens += r.num_cached_tokens
                r.first_scheduled = time.monotonic()
            r.status = Status.RUNNING
            self.running.append(r)
            chunks.append((r, r.num_computed, end, 0))
            if filling is not None:
                filling.update(self._filled_keys(r, r.num_computed, end, 0))
            budget -= end - r.num_computed
        if not chunks and not self.to_release:
            return None
        return self._make_plan(chunks)

    def _make_plan(self, chunks: list) -> StepPlan:
        seqs, members = [], []
        for r, start, end, pending in chunks:
            sample = pending > 0 or end == r.num_tokens
            seqs.append(SeqChunk(r.rid, token_ids(r.token_slice(start, end - pending)), start, token_ids(r.pages),
                                 sample, None if r.params_sent else self._worker_params(r, start), pending))
            r.params_sent = True
            r.num_computed = end
            self._register_full_pages(r, min(end, r.num_tokens))
            r.in_flight += 1
            members.append(r.rid)
        step_id = next(self.step_ids)
        self.steps_in_flight[step_id] = InFlightStep(members, sum(e - s for _, s, e, _ in chunks))
        plan = StepPlan(step_id, seqs, self.to_release)
        self.to_release = []
        if chunks:
            num_decode = sum(1 for r, s, e, _ in chunks if e - s == 1 and s >= len(r.prompt_ids))
            self.last_step = {"step_id": step_id, "num_seqs": len(chunks), "num_decode": num_decode,
                              "num_prefill": len(chunks) - num_decode,
                              "num_tokens": sum(e - s for _, s, e, _ in chunks)}
        return plan

    @staticmethod
    def _worker_params(r: Request, start: int) -> dict:
        params = {**r.params, "prompt_len": len(r.prompt_ids)}
        if start and penalties_requested(r.params):
            # Penalties count every token seen; those of a cached prefix reach the worker only through here.
            params["prefix_ids"] = list(r.prompt_ids[:start])
        return params

    # ------------------------------------------------------------------ prefix cache
    def _keys(self, r: Request, num_pages: int) -> list:
        ps = self.blocks.page_size
        while len(r.page_keys) < num_pages:
            i = len(r.page_keys)
            r.page_keys.append(page_key(r.page_keys[-1] if i else ROOT_HASH, r.token_slice(i * ps, (i + 1) * ps)))
        return r.page_keys[:num_pages]

    def _reuse_cached_prefix(self, r: Request) -> None:
        """Start a request that holds no pages on the cached pages of its longest cached prefix."""
        if not self.blocks.enable_prefix_caching or r.pages:
            return
        # At least one token is left to compute: the step that computes it yields the logits to sample from.
        pages = self.blocks.match(self._keys(r, (r.num_tokens - 1) // self.blocks.page_size))
        self.blocks.share(pages)
        r.pages, r.num_registered = pages, len(pages)
        r.num_computed = len(pages) * self.blocks.page_size
        if not r.num_preemptions:
            r.num_cached_tokens = r.num_computed

    def _filled_keys(self, r: Request, start: int, end: int, pending: int) -> list:
        """Keys of the full pages that a chunk of r completes (none for a chained decode: its token is unknown)."""
        ps = self.blocks.page_size
        first, full = start // ps, min(end, r.num_tokens) // ps
        return self._keys(r, full)[first:] if not pending and full > first else []

    def _next_page_in(self, r: Request, keys: set) -> bool:
        """Whether the first page r would compute (a full page of its prompt) has one of keys."""
        i = len(r.pages)
        return i < (r.num_tokens - 1) // self.blocks.page_size and self._keys(r, i + 1)[i] in keys

    def _register_full_pages(self, r: Request, num_known: int) -> None:
        """Offer r's pages that the step being planned fills to the cache: any later plan may read them, since
        every rank runs plans in order."""
        full = num_known // self.blocks.page_size
        if not self.blocks.enable_prefix_caching or full <= r.num_registered:
            return
        for i, key in enumerate(self._keys(r, full)[r.num_registered:], r.num_registered):
            self.blocks.register(r.pages[i], key)
        r.num_registered = full

    def _drop_pages(self, r: Request) -> None:
        self.blocks.release(r.pages[::-1])
        r.pages, r.num_computed, r.num_registered = [], 0, 0

    def _make_room(self, r: Request, end: int) -> bool:
        """Give r pages for its tokens up to `end`, preempting the newest requests admitted after it that are not in
        flight. False when r cannot run in this step: it waits, pages kept, for newer requests whose steps are in
        flight to come back (preempting itself instead would hand its pages to lower priorities, and two requests
        could take turns undoing each other's work forever); if nothing newer exists, r is the lowest priority and
        is itself preempted."""
        while not self._grow(r, end):
            newer = self.running[self.running.index(r) + 1:]
            victim = next((v for v in reversed(newer) if not v.in_flight), None)
            if victim is None:
                if not newer:
                    self._preempt(r)
                return False
            self._preempt(victim)
        return True

    def _fits(self, r: Request, num_tokens: int) -> bool:
        return self.blocks.pages_for(num_tokens) <= len(r.pages)

    def _grow(self, r: Request, num_tokens: int) -> bool:
        need = self.blocks.pages_for(num_tokens) - len(r.pages)
        if need <= 0:
            return True
        pages = self.blocks.allocate(need)
        if pages is None:
            return False
        r.pages.extend(pages)
        return True

    def _preempt(self, r: Request) -> None:
        """Free r's pages and queue it first in line; it recomputes prompt + output so far when resumed."""
        self.running.remove(r)
        self._drop_pages(r)
        r.status = Status.WAITING
        r.num_preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(r)

    # ------------------------------------------------------------------ results
    def on_result(self, result: StepResult) -> list:
        """Apply a step's sampled tokens; returns TokenUpdates for the requests that advanced or ended."""
        step = self.steps_in_flight.pop(result.step_id, None)
        members = step.rids if step is not None else []
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
            logprobs = result.logprobs or [None] * len(result.rids)
            for rid, tok, lp in zip(result.rids, result.token_ids, logprobs):
                r = self.requests.get(rid)
                if r is None or r.status is Status.FINISHED:
                    continue  # finished (or aborted) while this step ran: its token is void
                r.output_ids.append(tok)
                reason = None
                if tok in r.stop_token_ids:
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
        if not r.in_flight:
            self._release(r)

    def _release(self, r: Request) -> None:
        self._drop_pages(r)
        del self.requests[r.rid]
        if r.params_sent:
            self.to_release.append(r.rid)

    # ------------------------------------------------------------------ introspection
    def state(self) -> dict:
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
        }
