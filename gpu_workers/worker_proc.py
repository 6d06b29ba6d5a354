"""A worker process: one per device. The same loop serves every parallel layout: receive a plan, run this rank's
part of the forward pass, and (on the driver rank) report the sampled tokens."""
from __future__ import annotations

import logging
import os
import sys
import traceback

import zmq

from nanoslg import ipc
from nanoslg.config import EngineConfig
from gpu_workers.step_profiler import StepProfiler
from nanoslg.protocol import ProtocolError, Shutdown, StepPlan, StepResult, token_ids

log = logging.getLogger("nanoslg.worker")


def serve(cfg: EngineConfig, rank: int, ready) -> None:
    from gpu_workers.model_runner import ModelRunner
    from gpu_workers.parallel import init_parallel, parallel_state

    backend = "nccl" if cfg.device != "cpu" and _has_cuda() else "gloo"
    init_parallel(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, rank,
                  f"file://{os.path.join(cfg.run_dir, 'dist-init')}", backend)
    runner = ModelRunner(cfg, local_rank=rank)
    ctx = zmq.Context()
    inbox = ipc.pull(ctx, cfg.run_dir, ipc.worker_inbox(rank))
    to_scheduler = ipc.push(ctx, cfg.run_dir, ipc.SCHEDULER) if parallel_state().is_driver else None
    ready({"num_pages": runner.num_pages, "device": str(runner.device), "dtype": str(runner.dtype),
           "attention_backend": runner.backend.name})
    # One step stays launched while the next plan is received and launched behind it on the device; only then
    # does the worker wait for the older step's tokens. With overlap scheduling the GPU never idles between steps.
    profiler = StepProfiler()
    in_flight = None
    while True:
        # Report the launched step as soon as the device is done with it, unless the next plan arrives first: then
        # launch that one before waiting, so the device always has the next step queued.
        while in_flight is not None and not inbox.poll(1):
            if runner.is_done(in_flight):
                _report(runner, in_flight, to_scheduler)
                in_flight = None
        try:
            msg = ipc.recv(inbox)
        except ProtocolError as e:
            log.warning("dropped a bad message: %s", e)
            continue
        if isinstance(msg, Shutdown):
            return
        if not isinstance(msg, StepPlan):
            log.warning("unexpected %s on a worker inbox", type(msg).__name__)
            continue
        if in_flight is not None and runner.needs_sync_before(msg):
            _report(runner, in_flight, to_scheduler)
            in_flight = None
        profiler.on_step()
        try:
            launched = runner.launch(msg)
        except Exception as e:  # one failed step fails its requests, not the engine
            log.error("step %d failed:\n%s", msg.step_id, traceback.format_exc())
            launched = StepResult(msg.step_id, [], token_ids(), None, f"{type(e).__name__}: {e}")
        if in_flight is not None:
            _report(runner, in_flight, to_scheduler)
        in_flight = launched


def _report(runner, launched, to_scheduler) -> None:
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    cfg = EngineConfig.from_arg(sys.argv[1])
    rank = int(sys.argv[2])
    ipc.setup_logging(cfg.log_level)
    ipc.run_child(f"worker{rank}", cfg.run_dir, lambda ready: serve(cfg, rank, ready))


if __name__ == "__main__":
    main()
