"""The API-server processes after the first (`nanoslg serve --api-server-count N`), as the first process runs them:
it opens the listening socket and every process accepts on it (one accept queue: a process that dies loses no
connection waiting there), tells them the engine's state, restarts one that dies and passes the drain on.

The first process owns the engine (SupervisedEngine) and serves HTTP itself; process k > 0 (api_proc.py) receives
its outputs at EngineConfig.client_inboxes[k - 1], in the server directory made here, which outlives engine
restarts. Each process holds its share of the queue limits."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from typing import Any, Optional

import zmq

from nanoslg import protocol
from nanoslg.launcher import _die_with_parent, _exit_status, stop_processes
from nanoslg.protocol import ClientReset, Ready, ServerState
from nanoslg.server.async_engine import DRAINING, RUNNING, STOPPED, SupervisedEngine

log = logging.getLogger("nanoslg.server")

SPEC_ENV = "NANOSLG_API_SERVER_SPEC"  # a process's settings, in its environment (argv is world-readable)
STATE_EVERY_S = 0.5  # besides every change: a process that (re)started hears the state within this


class ApiServerStartupError(RuntimeError):
    """An API-server process after the first did not start."""


def client_inbox(server_dir: str, index: int) -> str:
    return f"ipc://{os.path.join(server_dir, f'client{index}.sock')}"


def default_api_server_count(engine_processes: int) -> int:
    """One API-server process per 4 cores the engine's own processes leave, 1 to 8."""
    cores = len(os.sched_getaffinity(0))
    return max(1, min(8, (cores - engine_processes) // 4))


class ApiServerPool:
    def __init__(self, engine: SupervisedEngine, count: int, server_dir: str, listen_fd: int, spec: dict[str, Any],
                 max_restarts: int = 3, restart_window_s: float = 300.0):
        self.engine, self.count, self.listen_fd = engine, count, listen_fd
        self.spec = spec  # what every process gets besides its index (api_proc.main reads it)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False  # draining or closing: a process that exits is not restarted
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.restart_times: dict[int, deque[float]] = {}  # per process: several dying at once is one cause, not a loop
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.control_address = f"ipc://{os.path.join(server_dir, 'control.sock')}"
        self._control = self._ctx.socket(zmq.PUB)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.bind(self.control_address)
        self.ready_address = f"ipc://{os.path.join(server_dir, 'ready.sock')}"
        self._ready = self._ctx.socket(zmq.PULL)  # each process's Ready, once it knows where the engine is
        self._ready.setsockopt(zmq.LINGER, 0)
        self._ready.bind(self.ready_address)
        self._task: Optional[asyncio.Task[None]] = None
        self._last: Optional[tuple[str, str, int]] = None  # the last state sent: (state, run_dir, restarts)

    def spawn_all(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        spec = {**self.spec, "engine": self.engine.cfg.to_dict(), "index": index, "fd": self.listen_fd,
                "control_address": self.control_address, "ready_address": self.ready_address,
                "engine_state": self.engine.state}
        env = {**os.environ, SPEC_ENV: json.dumps(spec)}
        self.procs[index] = subprocess.Popen([sys.executable, "-m", "nanoslg.server.api_proc"], env=env,
                                             stdin=subprocess.DEVNULL, pass_fds=[self.listen_fd],
                                             preexec_fn=_die_with_parent)
        self.engine.peer_pids = {f"api{k}": p.pid for k, p in self.procs.items()}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every process has said it serves (they learn the engine from the state _run publishes), so a
        client of a server that answers /health never lands on a process still starting."""
        pending = {f"api{k}" for k in self.procs}
        deadline = time.monotonic() + timeout_s
        while True:
            while self._ready.poll(0):  # every Ready already sent, before looking at deaths
                msg = protocol.decode(self._ready.recv())
                if isinstance(msg, Ready):
                    pending.discard(msg.name)
            if not pending:
                return
            if self.engine.state == STOPPED:  # e.g. a process that kept dying at startup used up its restarts
                raise ApiServerStartupError(f"{', '.join(sorted(pending))} did not start; the server stops")
            if time.monotonic() > deadline:
                raise ApiServerStartupError(f"{', '.join(sorted(pending))} did not start within {timeout_s:.0f} s")
            # a process that was ready and died since is restarted by _run: only the unready ones fail the start
            dead = [f"api{k} {_exit_status(code)}" for k, p in self.procs.items()
                    if f"api{k}" in pending and (code := p.poll()) is not None]
            if dead:
                raise ApiServerStartupError(f"an API-server process failed to start: {'; '.join(dead)}")
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        try:
            last_sent = 0.0
            while True:
                await asyncio.sleep(0.1)
                state = self._state()
                key = (state.state, state.run_dir, state.num_restarts)
                if key != self._last or time.monotonic() - last_sent >= STATE_EVERY_S:
                    self._control.send(protocol.encode(state))
                    self._last, last_sent = key, time.monotonic()
                if not self.stopping and self.engine.state != STOPPED:
                    self._restart_dead()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the API-server pool failed: the server exits")
            self.engine._give_up(1)

    def _state(self) -> ServerState:
        e = self.engine
        return ServerState(e.state, e.cfg.run_dir, e.last_death, e.num_restarts, e.pids)

    def _restart_dead(self) -> None:
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            e = self.engine
            if e.state in (RUNNING, DRAINING):  # its requests are nobody's: the engine stops them now
                e._linked_tokenizer().send(protocol.encode(ClientReset(index)))
            if e.counts is not None:
                e.counts.clear(index)
            now = time.monotonic()
            times = self.restart_times.setdefault(index, deque())
            while times and now - times[0] > self.restart_window_s:
                times.popleft()
            if len(times) >= self.max_restarts:
                log.error("API server %d %s, its %d. death within %.0f s: the server exits", index,
                          _exit_status(code), len(times) + 1, self.restart_window_s)
                self.stopping = True
                e._give_up(1)
                return
            times.append(now)
            log.error("API server %d %s: restarting it", index, _exit_status(code))
            self._spawn(index)

    def signal_all(self, sig: int) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def stop_publishing(self) -> None:
        """From the event loop's thread: no more states, no more restarts."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every process (a stopped engine's state first, so each fails what it still runs at once). Any
        thread; a second call finds nothing left to stop."""
        self.stopping = True
        try:
            state = self._state()
            state.state = STOPPED
            self._control.send(protocol.encode(state))
        except zmq.ZMQError:
            pass
        stop_processes(self.procs.values(), timeout_s)
        self._control.close(linger=0)
        self._ready.close(linger=0)
