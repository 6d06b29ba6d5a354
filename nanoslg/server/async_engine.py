"""The engine as an asyncio API-server process sees it: one task reads every OutputBatch the tokenizer sends this
process and routes each delta straight to the queue of the HTTP request it belongs to; requests released unfinished
(client gone, error) are aborted, freeing their pages.

In the process that owns the engine (SupervisedEngine) a supervisor task watches the engine's processes. When one
dies it fails every running request, stops the rest and starts the engine again with the same configuration, in
the background; more than `max_restarts` deaths within `restart_window_s` (or any death with restarts off) end the
server instead, so a supervisor sees a crash loop."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any, Callable, Optional

import zmq
import zmq.asyncio

from nanoslg import ipc, protocol
from nanoslg.config import EngineConfig, ResolvedConfig
from nanoslg.engine_client import EngineClient
from nanoslg.protocol import AbortRequest, DebugReply, DebugStateQuery, GenerateRequest, OutputBatch, OutputDelta
from nanoslg.server.queue_counts import QueueCounts

log = logging.getLogger("nanoslg.server")

RUNNING, RESTARTING, DRAINING, STOPPED = "running", "restarting", "draining", "stopped"


class EngineUnavailable(RuntimeError):
    """The engine cannot take (or finish) a request. reason labels the aborts metric; retry_after (seconds) goes to
    the client as Retry-After when a retry can succeed."""

    def __init__(self, message: str, reason: str = "engine_unavailable", retry_after: Optional[int] = None):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


# A generation's queue: (choice index, the choice's next delta or the failure that ends it)
DeltaQueue = asyncio.Queue[tuple[int, OutputDelta | EngineUnavailable]]


class TooManyChoices(ValueError):
    """One request asks for more completions (prompts x n) than the server's queue limits hold: a 400."""


class AsyncEngine:
    """One API-server process's side of the engine: its requests' routes, the queue limits, admission, aborts, the
    drain and the scheduler's state for /metrics. Subclasses say how the engine is reached and watched: the process
    that owns it (SupervisedEngine) or another API-server process that follows it (api_proc.FollowerEngine)."""

    def __init__(self, cfg: ResolvedConfig, max_queued_requests: int, max_waiting_requests: Optional[int] = None,
                 client: int = 0, counts: Optional[QueueCounts] = None):
        self.ctx = zmq.asyncio.Context()
        self.counts = counts  # with several API-server processes: the limits hold for their sum
        self.cfg = cfg
        self.client_index = client  # which inbox the tokenizer sends this process's outputs to
        self.max_queued_requests, self.max_waiting_requests = max_queued_requests, max_waiting_requests
        # rid -> (its generation's queue, its choice index), until the rid finishes
        self.routes: dict[str, tuple[DeltaQueue, int]] = {}
        # admitted rids without a first delta yet: tokenizing or waiting to be scheduled
        self.unstarted: set[str] = set()
        self.state = RUNNING
        self.num_restarts = 0
        self.exit_code = 0
        self.known_pids: dict[str, int] = {}  # the server's processes by name as last told, for /metrics
        self.on_fatal: Callable[[], None] = lambda: None  # set by the HTTP server: stop serving
        self.to_tokenizer: Optional[zmq.asyncio.Socket] = None
        self._router: Optional[asyncio.Task[None]] = None
        self._debug: Optional[zmq.asyncio.Socket] = None
        self._debug_lock: Optional[asyncio.Lock] = None

    def _connect_debug(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ipc.address(self.cfg.run_dir, ipc.DEBUG))
        return sock

    def start(self) -> None:
        self._debug_lock = asyncio.Lock()

    def _linked_tokenizer(self) -> zmq.asyncio.Socket:
        assert self.to_tokenizer is not None  # linked to the engine whenever it runs or drains
        return self.to_tokenizer

    @property
    def pids(self) -> dict[str, int]:
        return self.known_pids

    async def ready(self) -> None:
        """Returns once this process can answer requests (or say why not)."""

    def _deaths(self) -> list[str]:
        """What makes this process's link to the engine unusable now (empty while it works)."""
        raise NotImplementedError

    async def _route_outputs(self, inbox: zmq.asyncio.Socket) -> None:
        while True:
            frame = await inbox.recv()
            try:
                msg = protocol.decode(frame)
            except protocol.ProtocolError as e:
                log.warning("dropped a bad frame from the tokenizer: %s", e)
                continue
            if isinstance(msg, OutputBatch):
                for d in msg.deltas:
                    self.unstarted.discard(d.rid)
                    route = self.routes.get(d.rid)
                    if route is not None:
                        if d.finish_reason is not None:
                            del self.routes[d.rid]
                        route[0].put_nowait((route[1], d))
                self._publish_counts()

    def _publish_counts(self) -> None:
        if self.counts is not None:
            self.counts.publish(len(self.routes), len(self.unstarted))

    def _give_up(self, exit_code: int) -> None:
        self.exit_code, self.state = exit_code, STOPPED
        self.on_fatal()

    def stop(self) -> None:
        """The server is going away."""
        self.state = STOPPED

    def fail_all(self, failure: EngineUnavailable) -> None:
        """End every running request with failure (its stream gets an error event); a live engine stops them."""
        routes, self.routes = self.routes, {}
        self.unstarted.clear()
        for rid, (queue, index) in routes.items():
            if self.state in (RUNNING, DRAINING):
                self._linked_tokenizer().send(protocol.encode(AbortRequest(rid)))
            queue.put_nowait((index, failure))
        self._publish_counts()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, let the running ones finish for up to timeout_s, then fail the rest."""
        if self.state == RUNNING:
            self.state = DRAINING
        log.warning("draining: %d requests running, waiting up to %.0f s", len(self.routes), timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.routes and time.monotonic() < deadline and self.state == DRAINING:
            await asyncio.sleep(0.05)
        if self.routes:
            log.warning("aborting %d requests still running at shutdown", len(self.routes))
            self.fail_all(EngineUnavailable("the server is shutting down; the request was aborted", "shutdown"))
            await asyncio.sleep(0.1)  # let their streams send the error event before the server closes them

    # ------------------------------------------------------------------ requests
    @property
    def healthy(self) -> bool:
        return self.state == RUNNING and not self._deaths()

    def check_room(self, num: int) -> None:
        """Refuse num more requests while the engine is down or they would pass the queue limits."""
        if self.state == DRAINING or self.state == STOPPED:
            raise EngineUnavailable("the server is shutting down", "shutdown")
        if not self.healthy:
            raise EngineUnavailable("the engine is restarting, retry shortly" if self.state == RESTARTING else
                                    "the engine is not running", retry_after=5)
        largest = min(self.max_queued_requests, self.max_waiting_requests or self.max_queued_requests)
        if num > largest:  # no retry can succeed: the client's error, not the server's
            raise TooManyChoices(f"the request asks for {num} completions (prompts x n), more than this server "
                                 f"runs at once ({largest})")
        queued, waiting = self.counts.others() if self.counts is not None else (0, 0)
        queued, waiting = queued + len(self.routes), waiting + len(self.unstarted)
        if queued + num > self.max_queued_requests:
            raise EngineUnavailable(f"the server has {queued} requests in progress and this one adds "
                                    f"{num}; its limit is {self.max_queued_requests}, retry later", retry_after=1)
        limit = self.max_waiting_requests
        if limit is not None and waiting + num > limit:
            raise EngineUnavailable(f"the server is overloaded: {waiting} requests wait to start and "
                                    f"this one adds {num} (limit {limit}); retry later", retry_after=1)

    async def admit(self, reqs: list[GenerateRequest], queue: DeltaQueue) -> None:
        """Start reqs (all or none); request i's deltas arrive on queue as (i, delta), or (i, EngineUnavailable)."""
        self.check_room(len(reqs))
        for i, req in enumerate(reqs):
            self.routes[req.rid] = (queue, i)
            self.unstarted.add(req.rid)
        self._publish_counts()
        for req in reqs:
            req.client = self.client_index
            await self._linked_tokenizer().send(protocol.encode(req))

    def release(self, reqs: list[GenerateRequest]) -> None:
        """Abort whichever of reqs have not finished (their client is gone or the request failed)."""
        for req in reqs:
            self.unstarted.discard(req.rid)
            if self.routes.pop(req.rid, None) is not None and self.state in (RUNNING, DRAINING):
                self._linked_tokenizer().send(protocol.encode(AbortRequest(req.rid)))
        self._publish_counts()

    async def scheduler_state(self) -> dict[str, Any]:
        """KV and queue figures from the scheduler's debug socket (for /metrics)."""
        if self.state not in (RUNNING, DRAINING):
            raise EngineUnavailable("the engine is not running")
        assert self._debug_lock is not None  # made by start(), before any request
        async with self._debug_lock:
            if self.state not in (RUNNING, DRAINING):  # it died while this scrape waited for the lock
                raise EngineUnavailable("the engine is not running")
            assert self._debug is not None  # linked to the engine whenever it runs or drains
            try:
                await self._debug.send(protocol.encode(DebugStateQuery()))
                if not await self._debug.poll(2000):
                    # A late reply would otherwise answer the next query: start over on a fresh socket.
                    self._debug.close(linger=0)
                    self._debug = self._connect_debug()
                    raise EngineUnavailable("the scheduler did not answer")
                reply = protocol.decode(await self._debug.recv())
            except zmq.ZMQError as e:
                raise EngineUnavailable(f"the scheduler cannot be asked: {e}") from None
        return reply.state if isinstance(reply, DebugReply) else {}

    def close(self) -> None:
        self.stop()
        if self._router is not None:
            self._router.cancel()
        if self._debug is not None:
            self._debug.close(linger=0)


class SupervisedEngine(AsyncEngine):
    """The engine owned by this process: started here, watched by a supervisor task and restarted when one of its
    processes dies."""

    def __init__(self, settings: EngineConfig, max_queued_requests: int, max_waiting_requests: Optional[int] = None,
                 restart: bool = True, max_restarts: int = 3, restart_window_s: float = 300.0,
                 counts: Optional[QueueCounts] = None):
        cfg = settings if isinstance(settings, ResolvedConfig) else settings.resolve()
        super().__init__(cfg, max_queued_requests, max_waiting_requests, counts=counts)
        self._base_cfg = cfg  # what each restart starts from (each engine gets its own run directory)
        self.client = EngineClient(cfg, self.ctx)  # blocks until every process is READY
        self.cfg = self.client.cfg
        # Several nodes cannot be restarted from here: the other nodes' workers leave when node 0's engine stops.
        self.restart = restart and cfg.nnodes == 1
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.restart_times: deque[float] = deque()
        self.last_death = ""
        self.peer_pids: dict[str, int] = {}  # the other API-server processes (ApiServerPool)
        self._starting: Optional[EngineClient[zmq.asyncio.Socket]] = None  # an engine restarting, until it is READY
        self._supervisor: Optional[asyncio.Task[None]] = None
        self.to_tokenizer = self.client.to_tokenizer
        self._debug = self._connect_debug()

    def _use(self, client: EngineClient[zmq.asyncio.Socket]) -> None:
        self.client, self.cfg, self.to_tokenizer = client, client.cfg, client.to_tokenizer
        self._debug = self._connect_debug()
        self._router = asyncio.get_running_loop().create_task(self._route_outputs(client.inbox))

    def start(self) -> None:
        super().start()
        self._router = asyncio.get_running_loop().create_task(self._route_outputs(self.client.inbox))
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    @property
    def pids(self) -> dict[str, int]:
        """Every process of the server by name: the engine's, this one and the other API servers (peer_pids)."""
        return {**self.client.launcher.pids, "api0": os.getpid(), **self.peer_pids}

    def _deaths(self) -> list[str]:
        if self.client.closed:
            return ["the engine is stopped"]
        dead = self.client.launcher.dead_children()
        if not dead and self._router is not None and self._router.done():
            dead = ["the output router stopped"]
        return dead

    async def _supervise(self) -> None:
        try:
            while self.state != STOPPED:
                await asyncio.sleep(0.1)
                if self.state in (RUNNING, DRAINING):
                    dead = self._deaths()
                    if dead:
                        await self._on_death("; ".join(dead))
        except Exception:  # a server that can no longer heal must not linger half alive: it exits
            log.exception("the engine supervisor failed: the server exits")
            self._give_up(1)

    async def _on_death(self, what: str) -> None:
        log.error("engine process died: %s", what)
        self.last_death = what
        draining, running = self.state == DRAINING, len(self.routes)
        self.state = RESTARTING
        self.fail_all(EngineUnavailable(f"the engine stopped while the request was running ({what})",
                                        "engine_died", retry_after=5))
        await self._stop_client()
        now = time.monotonic()
        while self.restart_times and now - self.restart_times[0] > self.restart_window_s:
            self.restart_times.popleft()
        if draining or not self.restart or len(self.restart_times) >= self.max_restarts:
            why = ("restarts are off" if not self.restart else "the server is shutting down" if draining else
                   f"{len(self.restart_times)} restarts within {self.restart_window_s:.0f} s already")
            log.error("not restarting the engine (%s): the server exits", why)
            # a death while draining is still a crash when it cost running requests
            self._give_up(1 if running or not draining else 0)
            return
        self.restart_times.append(now)
        log.warning("restarting the engine (restart %d within %.0f s)", len(self.restart_times),
                    self.restart_window_s)
        try:
            client = EngineClient(self._base_cfg, self.ctx, start=False)
            self._starting = client
            # Started from an executor thread, which lives as long as the server: the children's parent-death
            # signal (launcher.py) follows the thread that spawned them. stop() cancels it.
            await asyncio.to_thread(client.start)
        except Exception as e:
            if self.state != STOPPED:  # else the server stopped meanwhile and cancelled the start
                log.error("the engine did not restart: %s", e)
                self._give_up(1)
            return
        finally:
            self._starting = None
        if self.state == STOPPED:  # the server stopped as the engine became ready
            client.close()
            return
        self._use(client)
        self.num_restarts += 1
        self.state = RUNNING
        log.warning("engine restarted (run dir %s)", self.cfg.run_dir)

    async def _stop_client(self) -> None:
        if self._router is not None:
            self._router.cancel()
        client = self.client
        await asyncio.to_thread(client.launcher.shutdown)  # stops the survivors; may wait for a slow one
        client.close()
        assert self._debug_lock is not None and self._debug is not None  # made by start() and __init__
        async with self._debug_lock:  # after a scrape in progress, which gives up within 2 s
            self._debug.close(linger=0)

    def stop(self) -> None:
        """The server is going away: no more restarts, and an engine still starting gives up (its thread would
        otherwise hold the event loop's exit until the engine is ready)."""
        super().stop()
        if self._starting is not None:
            self._starting.launcher.cancel()

    def close(self) -> None:
        super().close()
        if self._supervisor is not None:
            self._supervisor.cancel()
        self.client.close()
