"""The client end of the engine: starts the processes, submits requests to tokenizer_proc and receives deltas.
Used by the offline LLM (blocking) and by the API server (its own event loop reads ``inbox``)."""
from __future__ import annotations

from typing import Any, Generic, Optional, TypeVar, cast, overload

import zmq

from nanoslg import ipc
from nanoslg.config import EngineConfig, ResolvedConfig
from nanoslg.launcher import Launcher
from nanoslg.protocol import AbortRequest, GenerateRequest, OutputBatch, OutputDelta

_Sock = TypeVar("_Sock", bound="zmq.Socket[Any]")  # blocking, or asyncio's for the API server


class EngineDeadError(RuntimeError):
    pass


class EngineClient(Generic[_Sock]):
    """inbox and to_tokenizer are sockets of ctx's kind: the process's blocking context's when none is given."""

    @overload
    def __init__(self: EngineClient[zmq.Socket[bytes]], cfg: EngineConfig, ctx: None = None,
                 start: bool = True) -> None: ...

    @overload
    def __init__(self, cfg: EngineConfig, ctx: zmq.Context[_Sock], start: bool = True) -> None: ...

    def __init__(self, cfg: EngineConfig, ctx: Optional[zmq.Context[_Sock]] = None, start: bool = True) -> None:
        self.launcher = Launcher(cfg if isinstance(cfg, ResolvedConfig) else cfg.resolve())
        self.cfg = self.launcher.cfg  # with its run directory
        # without ctx, _Sock is the blocking socket (the first overload)
        self.ctx: zmq.Context[_Sock] = ctx or cast("zmq.Context[_Sock]", zmq.Context.instance())
        self.closed = True
        # Bound before the tokenizer starts, so no delta is sent to an address nobody holds.
        self.inbox = ipc.pull(self.ctx, self.cfg.run_dir, ipc.CLIENT)
        self.to_tokenizer = ipc.push(self.ctx, self.cfg.run_dir, ipc.TOKENIZER)
        self.closed = False
        if start:
            self.start()

    def start(self) -> None:
        """Start every process and wait until each is READY (launcher.cancel() from another thread stops it)."""
        try:
            self.launcher.start()
        except BaseException:
            self.close()
            raise

    @property
    def info(self) -> dict[str, dict[str, Any]]:
        return self.launcher.info

    def submit(self, req: GenerateRequest) -> None:
        ipc.send(self.to_tokenizer, req)

    def abort(self, rid: str) -> None:
        ipc.send(self.to_tokenizer, AbortRequest(rid))

    def poll_deltas(self, timeout_ms: int) -> list[OutputDelta]:
        """Deltas that arrived within timeout_ms (possibly none). Raises EngineDeadError if a process died."""
        if not self.inbox.poll(timeout_ms):
            dead = self.launcher.dead_children()
            if dead:
                raise EngineDeadError(f"the engine stopped: {'; '.join(dead)}")
            return []
        deltas: list[OutputDelta] = []
        while True:
            try:
                msg = ipc.recv(self.inbox, zmq.NOBLOCK)
            except zmq.Again:
                return deltas
            if isinstance(msg, OutputBatch):
                deltas.extend(msg.deltas)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.launcher.shutdown()
        self.inbox.close(linger=0)
        self.to_tokenizer.close(linger=0)
