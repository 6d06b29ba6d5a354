"""Starts the engine's processes in a private run directory, waits for each one's READY, and stops them all.

Order: workers and the tokenizer start together; the scheduler starts last, sized by the smallest KV pool any worker
reported. A child that fails, exits or stays silent past the timeout is named in the error.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import zmq

from nanoslg import ipc
from nanoslg.config import EngineConfig
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


class Launcher:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.children: dict = {}  # name -> Popen
        self.info: dict = {}  # name -> what its READY reported
        cfg.run_dir = tempfile.mkdtemp(prefix="nanoslg-")  # mode 0700: only this user reaches the sockets
        self._ctx = zmq.Context.instance()
        self._inbox = ipc.pull(self._ctx, cfg.run_dir, ipc.LAUNCHER)
        atexit.register(self.shutdown)

    def start(self) -> None:
        try:
            cfg = self.cfg
            workers = [f"worker{r}" for r in range(cfg.world_size)]
            for rank, name in enumerate(workers):
                self._spawn(name, "gpu_workers.worker_proc", str(rank))
            self._spawn(ipc.TOKENIZER, "tokenizer_proc.main")
            self._await_ready(workers + [ipc.TOKENIZER])
            num_pages = min(self.info[w]["num_pages"] for w in workers)
            self._spawn(ipc.SCHEDULER, "scheduler_proc.main", str(num_pages))
            self._await_ready([ipc.SCHEDULER])
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, name: str, module: str, *args: str) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.children[name] = subprocess.Popen([sys.executable, "-m", module, self.cfg.to_arg(), *args], env=env,
                                               stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _await_ready(self, names: list) -> None:
        pending = set(names)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while pending:
            if self._inbox.poll(200):
                try:
                    msg = ipc.recv(self._inbox)
                except ProtocolError as e:
                    raise EngineStartupError(f"garbled startup message: {e}") from None
                if isinstance(msg, Failed):
                    raise EngineStartupError(f"{msg.name} failed to start: {msg.error}")
                if isinstance(msg, Ready):
                    self.info[msg.name] = msg.info
                    pending.discard(msg.name)
                continue
            for name in pending:
                code = self.children[name].poll()
                if code is not None:
                    # A child that failed cleanly sent FAILED (with the reason) just before exiting: read it first.
                    if self._inbox.poll(1000):
                        break
                    raise EngineStartupError(f"{name} exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                raise EngineStartupError(f"{', '.join(sorted(pending))} not ready after "
                                         f"{self.cfg.startup_timeout_s:.0f} s")

    def dead_children(self) -> list:
        return [name for name, p in self.children.items() if p.poll() is not None]

    @property
    def pids(self) -> dict:
        return {name: p.pid for name, p in self.children.items()}

    def shutdown(self, timeout: float = 10.0) -> None:
        for p in self.children.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.children.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.children.clear()
        if not self._inbox.closed:
            self._inbox.close(linger=0)
        if self.cfg.run_dir and os.path.isdir(self.cfg.run_dir):
            shutil.rmtree(self.cfg.run_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)
