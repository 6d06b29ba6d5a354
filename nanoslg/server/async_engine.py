"""The engine as the asyncio server sees it: one task reads every OutputBatch from tokenizer_proc and routes each
delta straight to the queue of the HTTP request it belongs to; requests released unfinished (client gone, error) are
aborted, freeing their pages; one watcher fails every running request if the engine dies."""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import zmq
import zmq.asyncio

from nanoslg import ipc, protocol
from nanoslg.config import EngineConfig
from nanoslg.engine_client import EngineClient
from nanoslg.protocol import AbortRequest, DebugReply, DebugStateQuery, OutputBatch

log = logging.getLogger("nanoslg.server")


class EngineUnavailable(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, cfg: EngineConfig, max_queued_requests: int):
        self.ctx = zmq.asyncio.Context()
        self.client = EngineClient(cfg, self.ctx)  # blocks until every process is READY
        self.cfg = self.client.cfg
        self.max_queued_requests = max_queued_requests
        self.routes: dict = {}  # rid -> (its generation's queue, its choice index), until the rid finishes
        self._tasks: list = []  # the output router and the health watcher
        self._debug = self._connect_debug()
        self._debug_lock: Optional[asyncio.Lock] = None

    def _connect_debug(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ipc.address(self.cfg.run_dir, ipc.DEBUG))
        return sock

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._route_outputs()), loop.create_task(self._watch_health())]
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
                    route = self.routes.get(d.rid)
                    if route is not None:
                        if d.finish_reason is not None:
                            del self.routes[d.rid]
                        route[0].put_nowait((route[1], d))

    async def _watch_health(self) -> None:
        """Fails every running request once the engine is gone, so no client waits on a queue nobody fills."""
        while self.healthy:
            await asyncio.sleep(0.5)
        failure = EngineUnavailable("the engine stopped while the request was running")
        while True:
            routes, self.routes = self.routes, {}
            for queue, index in routes.values():
                queue.put_nowait((index, failure))
            await asyncio.sleep(0.5)  # requests admitted in between are refused by admit()

    @property
    def healthy(self) -> bool:
        return (not self.client.closed and len(self._tasks) == 2 and not self._tasks[0].done()
                and not self.client.launcher.dead_children())

    def check_room(self, num: int) -> None:
        """Refuse num more requests while the engine is down or they would pass max_queued_requests."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        if len(self.routes) + num > self.max_queued_requests:
            raise EngineUnavailable(f"the server has {len(self.routes)} requests in progress and this one adds "
                                    f"{num}; its limit is {self.max_queued_requests}, retry later")

    async def admit(self, reqs: list, queue: asyncio.Queue) -> None:
        """Start reqs (all or none); request i's deltas arrive on queue as (i, delta), or (i, EngineUnavailable)."""
        self.check_room(len(reqs))
        for i, req in enumerate(reqs):
            self.routes[req.rid] = (queue, i)
        for req in reqs:
            await self.client.to_tokenizer.send(protocol.encode(req))

    def release(self, reqs: list) -> None:
        """Abort whichever of reqs have not finished (their client is gone or the request failed)."""
        for req in reqs:
            if self.routes.pop(req.rid, None) is not None:
                self.client.to_tokenizer.send(protocol.encode(AbortRequest(req.rid)))

    async def scheduler_state(self) -> dict:
        """KV and queue figures from the scheduler's debug socket (for /metrics)."""
        async with self._debug_lock:
            await self._debug.send(protocol.encode(DebugStateQuery()))
            if not await self._debug.poll(2000):
                # A late reply would otherwise answer the next query: start over on a fresh socket.
                self._debug.close(linger=0)
                self._debug = self._connect_debug()
                raise EngineUnavailable("the scheduler did not answer")
            reply = protocol.decode(await self._debug.recv())
        return reply.state if isinstance(reply, DebugReply) else {}

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._debug.close(linger=0)
        self.client.close()
