"""How the HTTP server stops. SIGTERM or a first SIGINT drains: new requests get 503, running ones have up to the
shutdown timeout to finish, the rest end with an error event, then uvicorn closes and the engine's processes stop.
A second signal stops at once. An engine that cannot be restarted stops the server too, with a non-zero exit.

With several API-server processes the first one passes each signal on to the others as SIGTERM (they ignore
SIGINT, which Ctrl-C sends the whole group), waits for their drain, and stops them when it stops."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Optional

import uvicorn

from nanoslg.server.async_engine import AsyncEngine, EngineUnavailable

if TYPE_CHECKING:
    from nanoslg.server.api_servers import ApiServerPool

log = logging.getLogger("nanoslg.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float,
                 peers: Optional["ApiServerPool"] = None, follower: bool = False):
        super().__init__(config)
        self.engine, self.shutdown_timeout_s = engine, shutdown_timeout_s
        self.peers, self.follower = peers, follower
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._draining = False
        engine.on_fatal = self._stop_now

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            if self.peers is not None:
                self.peers.start()
                await self.peers.wait_ready()
            await super().serve(sockets)
        finally:
            self.engine.stop()  # before the loop closes: it would wait for an engine still being restarted
            if self.peers is not None:
                self.peers.stop_publishing()
                await asyncio.to_thread(self.peers.close)

    def handle_exit(self, sig: int, frame) -> None:
        # Replaces uvicorn's handler, which would re-raise the signal after shutdown (the exit status would be
        # "killed by SIGTERM" instead of 0 after a clean drain).
        if self.follower and sig == signal.SIGINT:
            return
        if self._loop is None:  # before the server started: nothing to drain
            self.should_exit = True
            return
        if self.peers is not None:  # their first signal drains, their second stops them, as here
            self.peers.signal_all(signal.SIGTERM)
        if self._draining:
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._stop_now)
            return
        self._draining = True
        log.warning("%s: draining (up to %.0f s)", signal.Signals(sig).name, self.shutdown_timeout_s)
        loop = self._loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self.engine.drain(self.shutdown_timeout_s)
        if self.peers is not None:  # the engine serves their requests: it stops after they drained
            await self.peers.wait_exit(self.shutdown_timeout_s + 10)
        self.should_exit = True

    def _stop_now(self) -> None:
        self.engine.fail_all(EngineUnavailable("the server is stopping; the request was aborted", "shutdown"))
        self.should_exit = True
        self.force_exit = self._draining  # a second signal: do not wait for open connections either
