"""The scheduler process: owns requests and the KV pages, forms each step and sends it to every worker."""
from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import zmq

from nanoslg import cluster, ipc, protocol
from nanoslg.config import ResolvedConfig
from nanoslg.errors import InvalidGrammar
from nanoslg.logs import setup_logging
from nanoslg.protocol import (AbortRequest, DebugProfile, DebugReply, DebugSetTargets, DebugStateQuery, DebugSubmit,
                              GrammarCompile, GrammarCompiled, ProfileRequest, ProfileResult, ProtocolError, Shutdown,
                              StepPlan, StepResult, TokenBatch, TokenizedRequest, TokenUpdate, token_ids)
from scheduler_proc.grammar_gate import GrammarGate
from scheduler_proc.scheduler import Scheduler
from scheduler_proc.step_timeline import StepTimeline

log = logging.getLogger("nanoslg.scheduler")

DEBUG_HISTORY = 64  # finished debug requests kept for `nanoslg debug state`


@dataclass(slots=True)
class _PendingProfile:
    identity: bytes  # the debug client to answer
    request: ProfileRequest
    sent: bool = False  # to the workers (once no step is in flight)


class SchedulerProcess:
    def __init__(self, cfg: ResolvedConfig, num_pages: int):
        self.cfg = cfg
        capacity = num_pages * cfg.page_size
        if capacity < cfg.max_model_len:
            raise ValueError(f"the KV cache holds {capacity} tokens ({num_pages} pages), fewer than "
                             f"max_model_len={cfg.max_model_len}: lower --max-model-len or give the cache more room")
        pp = cfg.pipeline_parallel_size
        self.max_in_flight = cfg.max_steps_in_flight
        self.core = Scheduler(num_pages, cfg.page_size, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                              cfg.max_model_len, overlap=cfg.overlap_schedule and pp == 1,
                              micro_batches=self.max_in_flight if pp > 1 else 1,
                              enable_prefix_caching=cfg.enable_prefix_caching, running_target=cfg.running_target,
                              dense_batch_tokens=cfg.dense_batch_tokens)
        ctx = zmq.Context()
        self.inbox = ipc.pull(ctx, cfg.run_dir, ipc.SCHEDULER)
        self.debug = ctx.socket(zmq.ROUTER)
        self.debug.setsockopt(zmq.LINGER, 0)
        self.debug.bind(ipc.address(cfg.run_dir, ipc.DEBUG))
        self.to_tokenizer = ipc.push(ctx, cfg.run_dir, ipc.TOKENIZER)
        # Plans go out once to every worker: an XPUB on ipc for this node's workers, and one on tcp (CURVE) for the
        # other nodes', whose results (from the driver rank) arrive on a tcp PULL beside the ipc inbox.
        self.plan_feeds = [self._plan_feed(ctx, ipc.address(cfg.run_dir, ipc.PLANS))]
        self.remote_inbox, self.refusals = None, []
        if cfg.nnodes > 1:
            secret = cluster.cluster_secret(cfg)
            remote_feed = self._plan_feed(ctx, None)
            self.refusals.append(cluster.serve_securely(remote_feed, cfg, cluster.PLANS, secret))
            self.plan_feeds.append(remote_feed)
            self.remote_inbox = ctx.socket(zmq.PULL)
            self.remote_inbox.setsockopt(zmq.LINGER, 0)
            self.refusals.append(cluster.serve_securely(self.remote_inbox, cfg, cluster.RESULTS, secret))
        self.timeline = StepTimeline()
        self.grammars = GrammarGate(self._publish_plan)
        # Totals since start, for /metrics: time with a step in flight (the workers busy or waiting on a result),
        # the scheduler's own time forming plans and applying results, and the steps run.
        self.busy_s, self.busy_since, self.cpu_s, self.num_steps = 0.0, 0.0, 0.0, 0
        self.outbox: list[TokenUpdate] = []  # for the tokenizer, sent once per loop
        # A DebugProfile waiting for the steps in flight to drain (no new step starts meanwhile), then for the
        # driver's ProfileResult.
        self.profile: Optional[_PendingProfile] = None
        self.debug_ids = itertools.count()
        self.debug_requests: dict[str, dict[str, Any]] = {}  # rid -> prompt_ids, output_ids, finish_reason

    @staticmethod
    def _plan_feed(ctx: zmq.Context[Any], address: Optional[str]) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every worker's subscription arrives, so each can be counted
        sock.setsockopt(zmq.SNDHWM, 0)  # a plan is never dropped for a slow worker
        sock.setsockopt(zmq.LINGER, 0)
        if address is not None:
            sock.bind(address)
        return sock

    def _await_subscribers(self) -> None:
        """Every worker subscribed before the first plan goes out (PUB drops what no subscriber has asked for)."""
        cfg = self.cfg
        local = cfg.ranks_per_node
        expected = [local] + ([cfg.world_size - local] if len(self.plan_feeds) > 1 else [])
        joined = [0] * len(expected)
        deadline = time.monotonic() + cfg.startup_timeout_s
        while joined != expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(joined)} of {cfg.world_size} workers subscribed to the plan feed")
            for i, feed in enumerate(self.plan_feeds):
                while joined[i] < expected[i] and feed.poll(100):
                    if feed.recv()[:1] == b"\x01":
                        joined[i] += 1
            for refusals in self.refusals:
                refusals.drain()

    def _publish_plan(self, plan: StepPlan | ProfileRequest | GrammarCompile) -> None:
        frame = protocol.encode(plan)
        for feed in self.plan_feeds:
            feed.send(frame, copy=False)
        if isinstance(plan, StepPlan):
            self.timeline.planned(plan.step_id)

    def run(self, ready: Callable[[dict[str, Any]], None]) -> None:
        self._await_subscribers()
        ready({"num_pages": self.core.blocks.num_pages})
        poller = zmq.Poller()
        inboxes = [self.inbox] + ([self.remote_inbox] if self.remote_inbox is not None else [])
        for sock in inboxes + [self.debug] + [r.monitor for r in self.refusals]:
            poller.register(sock, zmq.POLLIN)
        while True:
            # Every change the scheduler reacts to arrives on a socket, and each pass below schedules until it can
            # not, so blocking here never delays a step.
            events = dict(poller.poll(100))
            for inbox in inboxes:
                if inbox in events:
                    while self._handle_inbox(inbox):
                        pass
            if self.debug in events:
                self._handle_debug()
            for refusals in self.refusals:
                if refusals.monitor in events:
                    refusals.drain()
            if self.profile is not None:
                self._start_profile()
            while self.profile is None and len(self.core.steps_in_flight) < self.max_in_flight:
                started = time.perf_counter()
                plan = self.core.schedule()
                self.cpu_s += time.perf_counter() - started
                if self.core.unreported:
                    self._publish(self.core.unreported)
                    self.core.unreported = []
                if plan is None:
                    break
                if len(self.core.steps_in_flight) == 1:
                    self.busy_since = started
                self.num_steps += 1
                self._publish_plan(plan)
            # Tokens go to the tokenizer only after the next plan is out: the workers must not wait on that.
            if self.outbox:
                ipc.send(self.to_tokenizer, TokenBatch(self.outbox))
                self.outbox = []

    def _handle_inbox(self, inbox: zmq.Socket[Any]) -> bool:
        try:
            msg = ipc.recv(inbox, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except ProtocolError as e:
            log.warning("dropped a bad message: %s", e)
            return True
        if isinstance(msg, StepResult):
            self.timeline.result(msg.step_id)
            started = time.perf_counter()
            self._publish(self.core.on_result(msg))
            self.cpu_s += time.perf_counter() - started
            if not self.core.steps_in_flight:
                self.busy_s += started - self.busy_since
        elif isinstance(msg, ProfileResult):
            if self.profile is not None and self.profile.sent:
                self._debug_reply(self.profile.identity, {"kind": msg.kind, "timings": msg.timings,
                                                          "error": msg.error})
                self.profile = None
        elif isinstance(msg, TokenizedRequest):
            if self.grammars.offer(msg):
                self._add(msg)
        elif isinstance(msg, GrammarCompiled):
            held, error = self.grammars.on_compiled(msg)
            for req in held:
                if error is None:
                    self._add(req)
                else:
                    rejection = InvalidGrammar(error)
                    self._publish([TokenUpdate(req.rid, token_ids(), "rejected", None, str(rejection),
                                               error_code=rejection.code)])
        elif isinstance(msg, AbortRequest):
            if not self.grammars.abort(msg.rid):
                self.core.abort(msg.rid)
        elif isinstance(msg, Shutdown):
            raise ipc.ShutdownRequested(msg.reason)
        else:
            log.warning("unexpected %s on the scheduler inbox", type(msg).__name__)
        return True

    def _add(self, req: TokenizedRequest) -> None:
        error = self.core.add(req)
        if error:
            self._publish([error])

    def _publish(self, updates: list[TokenUpdate]) -> None:
        for_tokenizer = []
        for u in updates:
            record = self.debug_requests.get(u.rid)
            if record is None:
                for_tokenizer.append(u)
                continue
            record["output_ids"].extend(u.token_ids)
            record["finish_reason"] = u.finish_reason
            record["error"] = u.error
        self.outbox.extend(for_tokenizer)

    def _handle_debug(self) -> None:
        identity, frame = self.debug.recv_multipart()
        reply: dict[str, Any]
        try:
            msg = protocol.decode(frame)
        except ProtocolError as e:
            reply = {"error": str(e)}
        else:
            if isinstance(msg, DebugSubmit):
                reply = self._debug_submit(msg)
            elif isinstance(msg, DebugStateQuery):
                busy = self.busy_s + (time.perf_counter() - self.busy_since if self.core.steps_in_flight else 0.0)
                cfg = self.cfg
                reply = self.core.state() | {"debug_requests": self.debug_requests, "engine_busy_s": busy,
                                             "grammar_waiting": self.grammars.num_waiting,
                                             "scheduler_cpu_s": self.cpu_s, "num_steps": self.num_steps,
                                             "max_num_seqs": cfg.max_num_seqs,
                                             "max_num_batched_tokens": cfg.max_num_batched_tokens,
                                             "nano_batches": cfg.nano_batches, "nano_overlap": cfg.nano_overlap,
                                             "tuned_config": cfg.tuned_config_path or None,
                                             "device_name": cfg.device_name}
            elif isinstance(msg, DebugSetTargets):
                self.core.set_targets(msg.running_target, msg.dense_batch_tokens)
                reply = {"running_target": self.core.targets.target,
                         "dense_batch_tokens": self.core.targets.dense_batch_tokens}
            elif isinstance(msg, DebugProfile):
                if self.profile is not None:
                    reply = {"error": "a profile is already running"}
                else:
                    self.profile = _PendingProfile(identity, ProfileRequest(msg.kind, msg.shapes))
                    return  # answered when the driver's result comes back
            else:
                reply = {"error": f"unexpected {type(msg).__name__} on the debug socket"}
        self._debug_reply(identity, reply)

    def _debug_reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        self.debug.send_multipart([identity, protocol.encode(DebugReply(reply))])

    def _start_profile(self) -> None:
        """Send the waiting ProfileRequest once no step is in flight: the workers run it between steps."""
        if self.profile is not None and not self.profile.sent and not self.core.steps_in_flight:
            self._publish_plan(self.profile.request)
            self.profile.sent = True

    def _debug_submit(self, msg: DebugSubmit) -> dict[str, Any]:
        rid = f"debug-{next(self.debug_ids)}"
        req = TokenizedRequest(rid, msg.prompt_ids, msg.params, list(msg.params.stop_token_ids))
        error = self.core.add(req) if self.grammars.offer(req) else None
        if error:
            return {"error": error.error}
        self.debug_requests[rid] = {"prompt_ids": list(msg.prompt_ids), "output_ids": [], "finish_reason": None,
                                    "error": None}
        while len(self.debug_requests) > DEBUG_HISTORY:
            self.debug_requests.pop(next(iter(self.debug_requests)))
        return {"rid": rid}


def main() -> None:
    cfg = ResolvedConfig.from_arg(sys.argv[1])
    setup_logging(cfg.log_level, cfg.log_format)
    num_pages = int(sys.argv[2])

    def body(ready: Callable[[dict[str, Any]], None]) -> None:
        SchedulerProcess(cfg, num_pages).run(ready)

    ipc.run_child(ipc.SCHEDULER, cfg.run_dir, body)


if __name__ == "__main__":
    main()
