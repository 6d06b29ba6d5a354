"""ZeroMQ plumbing shared by every process: socket addresses in the run directory, typed send/recv, and the
child-side half of the startup handshake (READY or FAILED to the launcher, exit when the parent dies)."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from typing import Any, Callable, TypeVar

import zmq

from nanoslg import protocol

log = logging.getLogger("nanoslg")
# a context's socket type: blocking, or asyncio's where the API server passes its asyncio context (pull, push)
_Sock = TypeVar("_Sock", bound="zmq.Socket[Any]")

# One inbox (PULL) per process; everyone else PUSHes to it. Workers instead subscribe to the scheduler's plan feed.
LAUNCHER = "launcher"
TOKENIZER = "tokenizer"
SCHEDULER = "scheduler"
CLIENT = "client"  # the API server or the offline LLM: receives OutputBatch
DEBUG = "debug"  # the scheduler's ROUTER for `nanoslg debug`
PLANS = "plans"  # the scheduler's XPUB: every worker subscribes to the step plans


def worker_name(rank: int) -> str:
    return f"worker{rank}"


def address(run_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(run_dir, name)}.sock"


def pull(ctx: zmq.Context[_Sock], run_dir: str, name: str) -> _Sock:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address(run_dir, name))
    return sock


def push(ctx: zmq.Context[_Sock], run_dir: str, name: str) -> _Sock:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address(run_dir, name))
    return sock


def send(sock: zmq.Socket[bytes], msg, flags: int = 0) -> None:
    sock.send(protocol.encode(msg), flags, copy=False)


def recv(sock: zmq.Socket[bytes], flags: int = 0):
    return protocol.decode(sock.recv(flags, copy=True))


class ShutdownRequested(BaseException):
    """SIGTERM or a shutdown message: a BaseException, so that no `except Exception` (a worker's failed-step
    handler, say) takes it for an error and carries on."""


def _on_sigterm(signum, frame):
    # An exception raised inside a __del__ or a callback is printed and ignored, and the process would live on:
    # whatever happens to this one, the process is gone a few seconds later.
    timer = threading.Timer(5.0, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    raise ShutdownRequested(signal.Signals(signum).name)


def _watch_parent(parent_pid: int) -> None:
    # Polling getppid catches a parent killed by SIGKILL, which no signal handler in the parent can report.
    while True:
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.5)


def run_child(name: str, run_dir: str, body: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:
    """Run a child process's body(ready) with the lifecycle every child shares. body calls ready(info) once it can
    serve; an exception before that reaches the launcher as FAILED with its message."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the launcher coordinates
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    ctx = zmq.Context()
    to_launcher = push(ctx, run_dir, LAUNCHER)
    announced = False

    def ready(info: dict[str, Any]) -> None:
        nonlocal announced
        send(to_launcher, protocol.Ready(name, info))
        announced = True

    code = 0
    try:
        body(ready)
    except ShutdownRequested:
        pass
    except Exception as e:
        code = 1
        if not announced:
            send(to_launcher, protocol.Failed(name, f"{type(e).__name__}: {e}"))
        log.error("%s failed:\n%s", name, traceback.format_exc())
    finally:
        # Linger only applies while the context terminates; os._exit alone would kill ZeroMQ's I/O thread with
        # FAILED still queued, and the launcher would see a bare exit code instead of the reason.
        ctx.destroy(linger=2000)
    os._exit(code)
