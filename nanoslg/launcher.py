"""Starts the engine's processes in a private run directory, waits for each one's READY, and stops them all.

Node 0 runs the whole engine: its workers and the tokenizer start together, the other nodes' workers join through
the cluster hub, and the scheduler starts last, sized by the smallest KV pool any worker reported. Another node runs
only its own workers (run_worker_node). A child that fails, exits or stays silent past the timeout, or a node that
does, is named in the error.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterable

import zmq

from nanoslg import cluster, ipc
from nanoslg.config import EngineConfig, ResolvedConfig
from nanoslg.nodes import ClusterHub, NodeUplink
from nanoslg.protocol import Failed, ProtocolError, Ready

log = logging.getLogger("nanoslg.launcher")

_PR_SET_PDEATHSIG = 1


class EngineStartupError(RuntimeError):
    pass


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM if the launcher dies, even by SIGKILL.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the child's parent-pid watcher still catches it


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def stop_processes(procs, timeout: float) -> None:
    """SIGTERM to every live one, then SIGKILL to those still alive after timeout seconds."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _worker_names(ranks: Iterable[int]) -> list[str]:
    return [ipc.worker_name(r) for r in ranks]


class Launcher:
    def __init__(self, cfg: ResolvedConfig):
        # this engine's own copy: its run directory is made here (mode 0700: only this user reaches the sockets)
        self.cfg = cfg = dataclasses.replace(cfg, run_dir=tempfile.mkdtemp(prefix="nanoslg-"))
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.info: dict[str, dict[str, Any]] = {}  # name -> what its READY reported (remote workers too)
        self.secret = cluster.cluster_secret(cfg) if cfg.nnodes > 1 else None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.inbox = ipc.pull(self._ctx, cfg.run_dir, ipc.LAUNCHER)
        # a secret exists exactly when there is more than one node
        self.hub = ClusterHub(cfg, self._ctx, self.secret) if self.secret is not None and cfg.node_rank == 0 else None
        self._waited_for_nodes = False
        self._cancelled = threading.Event()
        atexit.register(self.shutdown)

    def start(self) -> None:
        """Node 0: every process of the engine, on this node and (through the hub) on the others."""
        try:
            cfg = self.cfg
            local = _worker_names(cfg.local_ranks)
            self.start_workers()
            self._spawn(ipc.TOKENIZER, "tokenizer_proc.main")
            remote = _worker_names(r for r in range(cfg.world_size) if r not in cfg.local_ranks)
            self._await_ready(local + [ipc.TOKENIZER] + remote)
            num_pages = min(self.info[w]["num_pages"] for w in local + remote)
            self._spawn(ipc.SCHEDULER, "scheduler_proc.main", str(num_pages))
            self._await_ready([ipc.SCHEDULER])
        except BaseException:
            self.shutdown()
            raise

    def start_workers(self) -> None:
        for rank in self.cfg.local_ranks:
            self._spawn(ipc.worker_name(rank), "gpu_workers.worker_proc", str(rank))

    def _spawn(self, name: str, module: str, *args: str) -> None:
        env = dict(os.environ)  # NCCL_NVLS_ENABLE and friends pass on unchanged
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if self.secret is not None:  # the environment, not argv: /proc/PID/cmdline is world-readable
            env[cluster.SECRET_ENV] = self.secret.decode()
        self.children[name] = subprocess.Popen([sys.executable, "-m", module, self.cfg.to_arg(), *args], env=env,
                                               stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def cancel(self) -> None:
        """Make a start() running in another thread give up within 200 ms (it stops what it started itself)."""
        self._cancelled.set()

    def _await_ready(self, names: list[str]) -> None:
        pending = set(names)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while pending:
            if self._cancelled.is_set():
                raise EngineStartupError("the engine's start was cancelled (the server is stopping)")
            if self.hub is not None:
                if self.hub.failure:
                    raise EngineStartupError(self.hub.failure)
                for name in pending & set(self.hub.ready):
                    self.info[name] = self.hub.ready[name]
                    pending.discard(name)
            if self.inbox.poll(200):
                try:
                    msg = ipc.recv(self.inbox)
                except ProtocolError as e:
                    raise EngineStartupError(f"garbled startup message: {e}") from None
                if isinstance(msg, Failed):
                    raise EngineStartupError(f"{msg.name} failed to start: {msg.error}")
                if isinstance(msg, Ready):
                    self.info[msg.name] = msg.info
                    pending.discard(msg.name)
                continue
            for name in pending & set(self.children):
                code = self.children[name].poll()
                if code is not None:
                    # A child that failed cleanly sent FAILED (with the reason) just before exiting: read it first.
                    if self.inbox.poll(1000):
                        break
                    raise EngineStartupError(f"{name} exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                raise EngineStartupError(f"{', '.join(sorted(pending))} not ready after "
                                         f"{self.cfg.startup_timeout_s:.0f} s")

    def dead_children(self) -> list[str]:
        """What has died: this node's children by name and exit code, and any other node's failure."""
        dead = [f"{name} {_exit_status(code)}" for name, p in self.children.items() if (code := p.poll()) is not None]
        if self.hub is not None:
            if dead and not self._waited_for_nodes:
                # A worker here that lost its peer on another node exits at once (its collective fails); that
                # node's report of the cause comes within its watch period: wait for it, once.
                self._waited_for_nodes = True
                self.hub.failed.wait(cluster.HEARTBEAT_S)
            if self.hub.failure:
                dead.insert(0, self.hub.failure)
        return dead

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.children.items()}

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.hub is not None:
            self.hub.stop()  # tells the other nodes to stop their workers
            self.hub = None
        stop_processes(self.children.values(), timeout)
        self.children.clear()
        if not self.inbox.closed:
            self.inbox.close(linger=0)
        if self.cfg.run_dir and os.path.isdir(self.cfg.run_dir):
            shutil.rmtree(self.cfg.run_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)


def run_worker_node(settings: EngineConfig) -> int:
    """Another node (--node-rank > 0): run this node's workers for node 0's engine until node 0 stops them (0) or
    something fails (1)."""
    launcher = Launcher(settings if isinstance(settings, ResolvedConfig) else settings.resolve())
    cfg = launcher.cfg
    ranks = cfg.local_ranks
    print(f"nanoslg: node {cfg.node_rank} runs workers {ranks.start}-{ranks.stop - 1} for the engine at "
          f"{cfg.dist_init_addr}", file=sys.stderr, flush=True)
    assert launcher.secret is not None  # node_rank > 0 means nnodes > 1, which requires a secret
    uplink = NodeUplink(cfg, launcher._ctx, launcher.secret)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher.start_workers()
        return uplink.serve(launcher)
    except KeyboardInterrupt:
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        uplink.close()
        launcher.shutdown()
