"""A worker process: one per device. The same loop serves every parallel layout: receive a plan, run this rank's
part of the forward pass, and (on the driver rank) report the sampled tokens. TP and PP differ only in the process
groups and layer range the model runner was built with."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import zmq

from gpu_workers import cpu_features
from gpu_workers.step_profiler import StepProfiler
from nanoslg import cluster, ipc
from nanoslg.config import ResolvedConfig
from nanoslg.logs import setup_logging
from nanoslg.protocol import (GrammarCompile, GrammarCompiled, ProfileRequest, ProfileResult, ProtocolError, StepPlan,
                              StepResult, token_ids)

log = logging.getLogger("nanoslg.worker")


def _dist_init_method(cfg: ResolvedConfig) -> str:
    if cfg.nnodes > 1:
        host, port = cfg.dist_host_port
        return f"tcp://{host}:{port}"
    return f"file://{os.path.join(cfg.run_dir, 'dist-init')}"


def _connect(ctx: zmq.Context[zmq.Socket[bytes]], cfg: ResolvedConfig, kind: int, offset: int,
             name: str) -> zmq.Socket[bytes]:
    """A socket to the scheduler: ipc on node 0, CURVE over tcp from the other nodes."""
    sock = ctx.socket(kind)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.RCVHWM, 0)  # a plan is never dropped
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    else:
        sock.setsockopt(zmq.LINGER, 1000)
    if cfg.node_rank == 0:
        sock.connect(ipc.address(cfg.run_dir, name))
    else:
        cluster.connect_securely(sock, cfg, offset, cluster.cluster_secret(cfg))
    return sock


def cpu_threads(cores: int, ranks_per_node: int, override: str = "") -> int:
    """torch intra-op threads for each CPU rank of a node with `cores` usable cores. `override`
    ($NANOSLG_CPU_THREADS), a positive integer, wins. Otherwise one core is left to the API server, tokenizer and
    scheduler unless that takes more than a quarter of a rank's threads (so from 4 cores on with one rank, from 8
    with two).

    Measured on 2 cores (SmolLM2-135M bf16, 16 prompts of 128+128 tokens, output tok/s): 2 threads ~256, 1 thread
    140-170; those processes used ~4% of a core. torch's threads meet at a barrier in every op, so a core taken from
    any one of them stalls them all: a competing process busy 25% of the time cost 2 threads 25% (1 thread: 0%),
    and one busy all the time cut 2 threads to 10 tok/s (1 thread: 82). On 2 or 3 cores a spare core costs too
    much steady throughput; from 4 on it costs at most a quarter and keeps a busy front end (a long prompt being
    tokenized, many streams being served) from stalling every step."""
    share = max(1, cores // ranks_per_node)
    with_spare = max(1, (cores - 1) // ranks_per_node)
    threads = with_spare if 4 * with_spare >= 3 * share else share
    override = override.strip()
    if override.isdigit() and int(override) > 0:
        return int(override)
    if override:
        log.warning("ignoring NANOSLG_CPU_THREADS=%r: not a positive integer; using %d", override, threads)
    return threads


def _size_threads(cfg: ResolvedConfig, device) -> None:
    """torch's intra-op threads: a GPU worker only launches kernels and needs few; the CPU ranks of one node share
    its cores. Left at torch's default (every core each), workers spin on each other's cores and slow the host path
    that feeds the GPU."""
    import torch

    if device.type == "cuda":
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, min(4, cores // (cfg.ranks_per_node + 2))))
        return
    torch.set_num_threads(cpu_threads(cpu_features.usable_cores(), cfg.ranks_per_node,
                                      os.environ.get("NANOSLG_CPU_THREADS", "")))


def reports_between_layers(device_type: str, override: Optional[str] = None) -> bool:
    """Whether a step's tokens may be reported from inside the next step's launch: on a GPU, where the launch only
    queues work and the scheduler can form the step after next meanwhile; not on the CPU, where the launch is the
    step's computation and the scheduler would take cores from it. NANOSLG_REPORT_BETWEEN_LAYERS=0/1 decides
    instead (A/B runs; the CPU tests of the path)."""
    value = os.environ.get("NANOSLG_REPORT_BETWEEN_LAYERS", "") if override is None else override
    if value not in ("", "0", "1"):
        log.warning("ignoring NANOSLG_REPORT_BETWEEN_LAYERS=%r: not 0 or 1", value)
    return value == "1" if value in ("0", "1") else device_type == "cuda"


def serve(cfg: ResolvedConfig, rank: int, ready) -> None:
    from gpu_workers.device_choice import resolve_device
    from gpu_workers.model_runner import ModelRunner
    from gpu_workers.parallel import init_parallel

    device = resolve_device(cfg, rank - cfg.local_ranks.start)
    _size_threads(cfg, device)
    ps = init_parallel(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, rank, _dist_init_method(cfg),
                       "nccl" if device.type == "cuda" else "gloo", device, cfg.startup_timeout_s)
    runner = ModelRunner(cfg, device)
    ctx = zmq.Context()
    plans = _connect(ctx, cfg, zmq.SUB, cluster.PLANS, ipc.PLANS)
    to_scheduler = _connect(ctx, cfg, zmq.PUSH, cluster.RESULTS, ipc.SCHEDULER) if ps.is_driver else None
    if ps.is_driver:
        assert runner.grammars is not None  # the driver is on the last stage, which samples
        runner.grammars.on_compiled = _GrammarReplies(
            lambda: _connect(ctx, cfg, zmq.PUSH, cluster.RESULTS, ipc.SCHEDULER)).send
    ready({"num_pages": runner.num_pages, "device": str(runner.device), "dtype": str(runner.dtype),
           "attention_backend": runner.backend.name, "layers": [runner.model.layer_range.start,
                                                                runner.model.layer_range.stop],
           "weight_bytes_read": runner.weight_bytes_read, "weights": runner.weights_dtype,
           "kv_cache": runner.kv_dtype, "fp8_compute": runner.fp8_compute,
           "fp8_decode": getattr(runner.backend, "fp8_decode", None)})  # which kernel decodes an FP8 cache
    # One step stays launched while the next plan is received and launched behind it on the device; the older step's
    # tokens are reported as soon as the device is done with it: while waiting for a plan, between the layers of
    # the next step's eager launch (not a CUDA graph's replay), or at the latest after that launch. With overlap
    # scheduling the GPU never idles between steps, and the scheduler forms the step after next while this rank is
    # still launching the next one.
    profiler = StepProfiler(rank)
    reports = _Reports(runner, to_scheduler, profiler)
    early = reports.report_between_layers if reports_between_layers(device.type) else None
    while True:
        while reports.launched is not None and not plans.poll(1):
            reports.report_if_done()
        try:
            msg = ipc.recv(plans)
        except ProtocolError as e:
            log.warning("dropped a bad message: %s", e)
            continue
        if isinstance(msg, GrammarCompile):
            if runner.grammars is not None:
                runner.grammars.prepare(msg.key, msg.spec)
            continue
        if isinstance(msg, ProfileRequest):
            reports.report()
            _profile(runner, msg, to_scheduler)
            continue
        if not isinstance(msg, StepPlan):
            log.warning("unexpected %s on the plan feed", type(msg).__name__)
            continue
        if runner.needs_sync_before(msg):
            reports.report()
        profiler.on_plan(msg.step_id)
        launched = _guarded(cfg, msg.step_id, lambda: runner.launch(msg, between_layers=early))
        reports.raise_error()
        profiler.launched()
        reports.report()
        if not isinstance(launched, StepResult):
            # a step with grammar rows samples now, its matchers advanced by the tokens just reported
            launched = _guarded(cfg, msg.step_id, lambda: runner.complete(launched)) or launched
        reports.launched = launched


class _Reports:
    """The launched step whose tokens are not reported yet."""

    def __init__(self, runner, to_scheduler, profiler: StepProfiler):
        self.runner, self.to_scheduler, self.profiler = runner, to_scheduler, profiler
        self.launched: Any = None  # a Launched, or the StepResult of a launch that failed
        self.error: Optional[BaseException] = None  # from a report made inside a launch: raised after it

    def report(self) -> None:
        """Wait for the launched step, if any, and report it."""
        if self.launched is not None:
            _report(self.runner, self.launched, self.to_scheduler, self.profiler)
            self.launched = None

    def report_if_done(self) -> None:
        if self.launched is not None and self.runner.is_done(self.launched):
            self.report()

    def report_between_layers(self) -> None:
        """report_if_done from inside the next step's launch. What goes wrong here (the result cannot be sent, the
        device fails) is not that step's fault: it is kept and raised by raise_error() once the launch returns,
        outside the step's guard, and the step it concerns stays unreported."""
        if self.error is None:
            try:
                self.report_if_done()
            except BaseException as e:
                self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _guarded(cfg: ResolvedConfig, step_id: int, fn: Callable[[], Any]) -> Any:
    """fn's result, or the StepResult that fails the step's requests when it raises (on one rank only)."""
    try:
        return fn()
    except Exception as e:
        if cfg.world_size > 1:
            # The other ranks ran (or wait in) this step's collectives: carrying on would desynchronise them.
            # Dying makes the launcher fail the engine with this rank's name instead of hanging it.
            raise
        log.error("step %d failed:\n%s", step_id, traceback.format_exc())  # fails its requests only
        return StepResult(step_id, [], token_ids(), None, f"{type(e).__name__}: {e}")


class _GrammarReplies:
    """GrammarCompiled messages from the compile threads, sent by one thread that owns its own socket (a zmq
    socket must stay with one thread): the worker loop may be blocked on the plan feed meanwhile."""

    def __init__(self, connect: Callable[[], zmq.Socket[bytes]]):
        self.connect = connect
        self.sock: Optional[zmq.Socket[bytes]] = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-replies")

    def send(self, key: str, error: Optional[str]) -> None:
        self.pool.submit(self._send, GrammarCompiled(key, error))

    def _send(self, msg: GrammarCompiled) -> None:
        try:
            if self.sock is None:
                self.sock = self.connect()
            ipc.send(self.sock, msg)
        except Exception:  # its requests would wait forever: this rank cannot serve grammars, so it stops
            log.critical("cannot tell the scheduler a grammar is compiled:\n%s", traceback.format_exc())
            os._exit(1)


def _profile(runner, msg: ProfileRequest, to_scheduler) -> None:
    """Time this rank's operations as asked (nanoslg tune); the driver sends the result."""
    from gpu_workers.op_profiler import run_profile

    try:
        result = ProfileResult(msg.kind, run_profile(runner, msg.kind, msg.shapes))
    except Exception as e:
        if runner.cfg.world_size > 1:
            raise  # the other ranks are inside the same collectives: see the step failure above
        log.error("profile failed:\n%s", traceback.format_exc())
        result = ProfileResult(msg.kind, {}, f"{type(e).__name__}: {e}")
    if to_scheduler is not None:
        ipc.send(to_scheduler, result)


def _report(runner, launched, to_scheduler, profiler) -> None:
    """Wait for a launched step and send its result (from the driver rank only)."""
    if isinstance(launched, StepResult):  # the launch itself failed
        result = launched
    else:
        try:
            result = runner.finish(launched)
        except Exception as e:
            log.error("step %d failed:\n%s", launched.step_id, traceback.format_exc())
            result = StepResult(launched.step_id, [], token_ids(), None, f"{type(e).__name__}: {e}")
    if to_scheduler is not None:
        ipc.send(to_scheduler, result)
    profiler.reported(result.step_id)


def main() -> None:
    cfg = ResolvedConfig.from_arg(sys.argv[1])
    rank = int(sys.argv[2])
    setup_logging(cfg.log_level, cfg.log_format)
    ipc.run_child(ipc.worker_name(rank), cfg.run_dir, lambda ready: serve(cfg, rank, ready))


if __name__ == "__main__":
    main()
