"""`bench serve --client-processes N`: the requests of one run sent from N client processes, so that the client is
never what limits a fast server; each process takes every Nth request at its own arrival time and reports the CPU
time it used, so a saturated client is seen (and warned about) instead of being taken for the server."""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import time
from typing import Any, Awaitable, Callable

SATURATED = 0.9  # a client process busy this fraction of the run may have delayed what it measured
MIN_RUN_S = 2.0  # shorter runs are mostly the client's own setup: no warning


def new_client(headers: dict[str, str], limit: int | None):
    """An httpx client with no connection-pool cap beyond ours: httpx's default of 100 would silently queue requests
    and inflate TTFT."""
    import httpx

    pool = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0), limits=pool)


async def send_share(client, url: str, payloads: list[dict[str, Any]], offsets: list[float], results: list[Any],
                     limit: int | None, chat: bool, t0: float, send: Callable[..., Awaitable[None]]) -> float:
    """Send payloads[i] at t0 + offsets[i] (send(client, url, payload, chat, result, t0) fills results[i]); returns
    the CPU seconds this process used meanwhile."""
    sem = asyncio.Semaphore(limit) if limit else None

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
        async with (sem or contextlib.nullcontext()):
            await send(client, url, payloads[i], chat, results[i], t0)

    cpu = time.process_time()
    await asyncio.gather(*(one(i) for i in range(len(payloads))))
    return time.process_time() - cpu


async def _client_share(job: dict[str, Any], barrier) -> float:
    async with new_client(job["headers"], job["limit"]) as client:
        # imports, the event loop and a first connection before the start: not on the first request's TTFT
        with contextlib.suppress(Exception):
            await client.get(job["url"].rsplit("/v1/", 1)[0] + "/v1/models")
        barrier.wait(120)  # every process ready: they start together (nothing else runs on this loop yet)
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
        return await send_share(client, job["url"], job["payloads"], job["offsets"], job["results"], job["limit"],
                                job["chat"], t0, job["send"])


def _client_process(k: int, job: dict[str, Any], barrier, out) -> None:
    with contextlib.suppress(BaseException):
        cpu = asyncio.run(_client_share(job, barrier))
        out.put((k, job["results"], cpu))
        return
    out.put((k, None, 0.0))


def send_from_processes(n: int, url: str, payloads: list[dict[str, Any]], offsets: list[float], results: list[Any],
                        headers: dict[str, str], limit: int | None, chat: bool,
                        send: Callable[..., Awaitable[None]]) -> tuple[float, list[float]]:
    """Send every payload from n processes (request i from process i % n, each with its share of the concurrency
    limit, which must be at least n); fills results in place; returns (duration s, CPU seconds of each process)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no event loop or sockets inherited
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = []
    for k in range(n):
        share = range(k, len(payloads), n)
        job = {"url": url, "payloads": [payloads[i] for i in share], "offsets": [offsets[i] for i in share],
               "results": [results[i] for i in share], "headers": headers, "chat": chat, "send": send,
               "limit": limit // n + (k < limit % n) if limit else None}  # shares that add up to it
        procs.append(ctx.Process(target=_client_process, args=(k, job, barrier, out), daemon=True))
        procs[-1].start()
    barrier.wait(120)  # a client process that cannot start breaks the barrier instead of hanging the run
    t0 = time.perf_counter()
    cpu = [0.0] * n
    for _ in range(n):
        while True:
            try:
                k, part, cpu[k] = out.get(timeout=1.0)
                break
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"client process {dead[0]} exited with code {procs[dead[0]].exitcode}") \
                        from None
        if part is None:
            raise RuntimeError(f"client process {k} failed")
        for j, i in enumerate(range(k, len(payloads), n)):
            results[i] = part[j]
    duration = time.perf_counter() - t0
    for p in procs:
        p.join()
    return duration, cpu


def client_report(cpu: list[float], duration: float) -> tuple[list[float], str]:
    """(busy fraction of each client process, a warning line or "")."""
    busy = [c / duration if duration > 0 else 0.0 for c in cpu]
    if max(busy, default=0.0) < SATURATED or duration < MIN_RUN_S:
        return busy, ""
    return busy, (f"warning: a client process was busy {max(busy):.0%} of the run: the client, not the server, may "
                  f"have limited these numbers (raise --client-processes)")
