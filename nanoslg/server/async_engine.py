"""The engine as the asyncio server sees it: one task reads every OutputBatch from tokenizer_proc and routes each
delta to its request's queue; a request that stops being consumed (client gone) is aborted, freeing its pages."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Optional

import zmq
import zmq.asyncio

from nanoslg import ipc, protocol
from nanoslg.config import EngineConfig
from nanoslg.engine_client import EngineClient
from nanoslg.protocol import AbortRequest, DebugReply, DebugStateQuery, GenerateRequest, OutputBatch, OutputDelta

log = logging.getLogger("nanoslg.server")


class EngineUnavailable(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, cfg: EngineConfig, max_queued_requests: int):
        self.ctx = zmq.asyncio.Context()
        self.client = EngineClient(cfg, self.ctx)  # blocks until every process is READY
        self.cfg = self.client.cfg
        self.max_queued_requests = max_queued_requests
        self.queues: dict = {}
        self._reader: Optional[asyncio.Task] = None
        self._debug = self.ctx.socket(zmq.DEALER)
        self._debug.setsockopt(zmq.LINGER, 0)
        self._debug.connect(ipc.address(self.cfg.run_dir, ipc.DEBUG))
        self._debug_lock: Optional[asyncio.Lock] = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._route_outputs())
        self._debug_lock = asyncio.Lock()

    async def _route_outputs(self) -> None:
        while True:
            frame = await self.client.inbox.recv()
            try:
                msg = protocol.decode(frame)
            except protocol.ProtocolError as e:
                log.warning("dropped a bad frame from the tokenizer: %s", e)
                continue
            if isinstance(msg, OutputBatch):
                for d in msg.deltas:
                    q = self.queues.get(d.rid)
                    if q is not None:
                        q.put_nowait(d)

    @property
    def healthy(self) -> bool:
        return (not self.client.closed and self._reader is not None and not self._reader.done()
                and not self.client.launcher.dead_children())

    @property
    def num_active(self) -> int:
        return len(self.queues)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """Yields the request's deltas until one carries a finish_reason. Leaving early aborts the request."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        if len(self.queues) >= self.max_queued_requests:
            raise EngineUnavailable(f"the server has {len(self.queues)} requests in progress, its limit; retry later")
        if req.rid in self.queues:
            raise ValueError(f"request id {req.rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[req.rid] = queue
        finished = False
        try:
            await self.client.to_tokenizer.send(protocol.encode(req))
            while True:
                try:
                    delta = await asyncio.wait_for(queue.get(), timeout=5.0)
                except asyncio.TimeoutError:
                    if not self.healthy:
                        raise EngineUnavailable("the engine stopped while the request was running") from None
                    continue
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            del self.queues[req.rid]
            if not finished:
                self.client.to_tokenizer.send(protocol.encode(AbortRequest(req.rid)))

    async def scheduler_state(self) -> dict:
        """KV and queue figures from the scheduler's debug socket (for /metrics)."""
        async with self._debug_lock:
            await self._debug.send(protocol.encode(DebugStateQuery()))
            if not await self._debug.poll(2000):
                raise EngineUnavailable("the scheduler did not answer")
            reply = protocol.decode(await self._debug.recv())
        return reply.state if isinstance(reply, DebugReply) else {}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._debug.close(linger=0)
        self.client.close()
