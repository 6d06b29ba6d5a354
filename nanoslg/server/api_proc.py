"""An API-server process after the first (`nanoslg serve --api-server-count N`): it serves HTTP on the listening
socket the first process opened and inherited to it, with its own inbox for outputs and its own link to the
tokenizer. It does not own the engine: it follows the first process's ServerState (published on every change and
twice a second), which says whether the engine runs and where (a restarted engine has a new run directory)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Optional

import zmq

from nanoslg import ipc, protocol
from nanoslg.config import ResolvedConfig
from nanoslg.logs import setup_logging
from nanoslg.protocol import ClientReset, Ready, ServerState
from nanoslg.server.async_engine import DRAINING, RESTARTING, RUNNING, STOPPED, AsyncEngine, EngineUnavailable
from nanoslg.server.api_servers import SPEC_ENV
from nanoslg.server.queue_counts import QueueCounts

log = logging.getLogger("nanoslg.server")

# No ServerState for this long: the first process is stuck (if it died, the kernel's parent-death signal stops this
# one), so the engine's state is unknown: running requests fail and new ones get 503 until it speaks again.
SILENCE_S = 5.0


class FollowerEngine(AsyncEngine):
    """The engine as another API-server process reaches it: outputs on an inbox of its own (the tokenizer knows it
    from EngineConfig.client_inboxes), requests to the tokenizer of whichever run directory ServerState names."""

    def __init__(self, cfg: ResolvedConfig, max_queued_requests: int, max_waiting_requests: Optional[int],
                 client: int, control_address: str, ready_address: str, counts: Optional[QueueCounts] = None,
                 spawned_while_running: bool = False):
        super().__init__(cfg, max_queued_requests, max_waiting_requests, client, counts)
        self.spawned_while_running = spawned_while_running
        self.state = RESTARTING  # until start() or the first ServerState says where the engine is
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(cfg.client_inboxes[client - 1])
        self.control = self.ctx.socket(zmq.SUB)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.SUBSCRIBE, b"")
        self.control.connect(control_address)
        self.ready_address = ready_address
        self.run_dir = ""  # the run directory this process is linked to
        self._heard = asyncio.Event()
        self._follower: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        super().start()
        if self.spawned_while_running:
            # the engine ran where cfg says when this process was spawned: serve at once, without waiting for a
            # state from the first process (which may be busy); the next state corrects anything that changed
            self._link(self.cfg.run_dir)
            self.state = RUNNING
            self._heard.set()
        loop = asyncio.get_running_loop()
        self._router = loop.create_task(self._route_outputs(self.inbox))
        self._follower = loop.create_task(self._follow())

    async def ready(self) -> None:
        await asyncio.wait_for(self._heard.wait(), 60)
        with self.ctx.socket(zmq.PUSH) as sock:  # the first process starts listening once every process is ready
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(self.ready_address)
            await sock.send(protocol.encode(Ready(f"api{self.client_index}")))

    def _deaths(self) -> list[str]:
        return ["the output router stopped"] if self._router is not None and self._router.done() else []

    async def _follow(self) -> None:
        try:
            while self.state != STOPPED:
                if not await self.control.poll(SILENCE_S * 1000):
                    if self.state in (RUNNING, DRAINING):
                        log.error("API server %d: no word from the first API-server process for %.0f s",
                                  self.client_index, SILENCE_S)
                        self.state = RESTARTING
                        self.fail_all(EngineUnavailable("the server lost track of its engine", "engine_died", 5))
                        self.run_dir = ""  # relink when the state comes back
                    continue
                if self._deaths():
                    raise RuntimeError("the output router stopped")
                msg = protocol.decode(await self.control.recv())
                if isinstance(msg, ServerState):
                    self._apply(msg)
                    self._heard.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # this process can no longer serve: it exits and the first one restarts it
            log.error("API server %d stops: %s", self.client_index, e)
            self.fail_all(EngineUnavailable(f"the API server stopped ({e})", "engine_died", 1))
            self._give_up(1)

    def _apply(self, st: ServerState) -> None:
        self.num_restarts, self.known_pids = st.num_restarts, st.pids
        if self.state == STOPPED:
            return
        if st.state == STOPPED:
            self.state = RESTARTING  # no aborts: the engine is gone
            self.fail_all(EngineUnavailable("the server is stopping; the request was aborted", "shutdown"))
            self._give_up(0)
        elif st.state == RESTARTING:
            if self.state in (RUNNING, DRAINING):
                self.state = RESTARTING
                self.fail_all(EngineUnavailable(f"the engine stopped while the request was running ({st.detail})",
                                                "engine_died", 5))
        elif st.run_dir != self.run_dir:  # a (new) engine runs there
            if self.state in (RUNNING, DRAINING):  # its death went unnoticed between two states
                self.state = RESTARTING
                self.fail_all(EngineUnavailable("the engine restarted while the request was running",
                                                "engine_died", 5))
            self._link(st.run_dir)
            self.state = DRAINING if st.state == DRAINING else RUNNING
        elif self.state == RESTARTING:
            self.state = DRAINING if st.state == DRAINING else RUNNING

    def _link(self, run_dir: str) -> None:
        for sock in (self.to_tokenizer, self._debug):
            if sock is not None:
                sock.close(linger=0)
        self.cfg = dataclasses.replace(self.cfg, run_dir=run_dir)
        self.run_dir = run_dir
        self.to_tokenizer = self.ctx.socket(zmq.PUSH)
        self.to_tokenizer.setsockopt(zmq.LINGER, 1000)
        self.to_tokenizer.connect(ipc.address(run_dir, ipc.TOKENIZER))
        # what a previous life of this process sent there is nobody's now
        self.to_tokenizer.send(protocol.encode(ClientReset(self.client_index)))
        self._debug = self._connect_debug()

    def close(self) -> None:
        super().close()
        if self._follower is not None:
            self._follower.cancel()
        for sock in (self.to_tokenizer, self.inbox, self.control):
            if sock is not None:
                sock.close(linger=0)


def main() -> None:
    import uvicorn

    from nanoslg.server.app import ServerSettings, build_app
    from nanoslg.server.lifecycle import DrainingServer

    spec = json.loads(os.environ.pop(SPEC_ENV))
    cfg = ResolvedConfig.from_dict(spec["engine"])
    setup_logging(cfg.log_level, cfg.log_format)
    index = spec["index"]
    engine = FollowerEngine(cfg, spec["max_queued_requests"], spec["max_waiting_requests"], index,
                            spec["control_address"], spec["ready_address"],
                            QueueCounts(spec["queue_counts"], index), spec["engine_state"] == RUNNING)
    settings = ServerSettings(**spec["settings"])
    config = uvicorn.Config(build_app(engine, settings), log_config=None, log_level=cfg.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    listener = socket.socket(fileno=spec["fd"])
    started = time.monotonic()
    try:
        DrainingServer(config, engine, spec["shutdown_timeout"], follower=True).run(sockets=[listener])
    finally:
        engine.close()
    log.info("API server %d exits after %.0f s", index, time.monotonic() - started)
    sys.exit(engine.exit_code)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the first process forwards it
    main()
