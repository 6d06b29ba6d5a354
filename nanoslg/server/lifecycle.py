"""How the HTTP server stops. SIGTERM or a first SIGINT drains: new requests get 503, running ones have up to the
shutdown timeout to finish, the rest end with an error event, then uvicorn closes and the engine's processes stop.
A second signal stops at once. An engine that cannot be restarted stops the server too, with a non-zero exit."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Optional

import uvicorn

from nanoslg.server.async_engine import AsyncEngine, EngineUnavailable

log = logging.getLogger("nanoslg.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine, self.shutdown_timeout_s = engine, shutdown_timeout_s
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._draining = False
        engine.on_fatal = self._stop_now

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets)
        finally:
            self.engine.stop()  # before the loop closes: it would wait for an engine still being restarted

    def handle_exit(self, sig: int, frame) -> None:
        # Replaces uvicorn's handler, which would re-raise the signal after shutdown (the exit status would be
        # "killed by SIGTERM" instead of 0 after a clean drain).
        if self._loop is None:  # before the server started: nothing to drain
            self.should_exit = True
            return
        if self._draining:
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._stop_now)
            return
        self._draining = True
        log.warning("%s: draining (up to %.0f s)", signal.Signals(sig).name, self.shutdown_timeout_s)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self.engine.drain(self.shutdown_timeout_s)
        self.should_exit = True

    def _stop_now(self) -> None:
        self.engine.fail_all(EngineUnavailable("the server is stopping; the request was aborted", "shutdown"))
        self.should_exit = True
        self.force_exit = self._draining  # a second signal: do not wait for open connections either
