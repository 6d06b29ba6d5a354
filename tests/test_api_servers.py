"""`nanoslg serve --api-server-count 2`: both processes serve the one port, /metrics sums them, a killed API
process is restarted (a crash loop ends the server), and each process's requests stay its own."""
import asyncio
import os
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server_utils import Server
from test_server_lifecycle import LONG, alive, complete, health, stream, wait_for

API = "nanoslg.server.api_proc"


def api_pids(server_pid: int) -> list:
    found = []
    for pid in (int(p) for p in open(f"/proc/{server_pid}/task/{server_pid}/children").read().split()):
        try:
            if API in open(f"/proc/{pid}/cmdline").read() and alive(pid):
                found.append(pid)
        except FileNotFoundError:  # it exited since the list was read
            pass
    return found


def metrics(url: str) -> dict:
    """name -> {labels as a sorted tuple: value} of one scrape."""
    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def served_by_one(url: str, stopped: int, n: int) -> list:
    """n completions while process `stopped` is frozen (SIGSTOP): the other process accepts and serves them all."""
    os.kill(stopped, signal.SIGSTOP)
    try:
        return [complete(url, f"prompt {i}") for i in range(n)]
    finally:
        os.kill(stopped, signal.SIGCONT)


def streams_cut_off(url: str, n: int, cut) -> list:
    """The error of each of n streams started at once; cut() runs once all have their first tokens."""
    async def one(client, started):
        try:
            return (await stream(client, url, LONG, started.release))[1]
        except httpx.HTTPError as e:  # the process serving it is gone: the connection drops
            return f"{type(e).__name__}: {e}"

    async def main():
        started = asyncio.Semaphore(0)
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(one(client, started)) for _ in range(n)]
            for _ in range(n):
                await asyncio.wait_for(started.acquire(), 60)
            cut()
            return await asyncio.wait_for(asyncio.gather(*tasks), 90)
    return asyncio.run(main())


def test_both_processes_serve_the_port_and_metrics_count_every_one(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "256", "--api-server-count", "2") as srv:
        wait_for(lambda: len(api_pids(srv.proc.pid)) == 1, 30)
        [follower] = api_pids(srv.proc.pid)
        # each process alone (the other frozen, for less than the 5 s a follower waits for word from the first)
        by_follower = served_by_one(srv.url, srv.proc.pid, 3)
        by_first = served_by_one(srv.url, follower, 2)
        assert by_follower[0] == by_first[0] == complete(srv.url, "prompt 0")  # one engine, greedy
        for _ in range(4):  # whichever process answers the scrape, it counts both processes' requests
            m = metrics(srv.url)
            assert m["nanoslg_requests_total"][(("status", "ok"),)] == 6
            assert m["nanoslg_generation_tokens_total"][()] == 6 * 12
            assert m["nanoslg_time_to_first_token_seconds_count"][()] == 6
            cpu = {dict(k)["process"] for k in m["nanoslg_process_cpu_seconds_total"]}
            assert {"api0", "api1", "tokenizer", "scheduler", "worker0"} <= cpu


def test_a_killed_api_process_is_restarted_and_its_requests_are_aborted(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "1024", "--api-server-count", "2") as srv:
        wait_for(lambda: len(api_pids(srv.proc.pid)) == 1, 30)
        for _death in range(3):
            [follower] = api_pids(srv.proc.pid)
            # streams on the follower only (the first process frozen while they start), then it is killed
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                errors = streams_cut_off(srv.url, 2, lambda: os.kill(follower, signal.SIGKILL))
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            assert all(errors), errors
            wait_for(lambda: len(api_pids(srv.proc.pid)) == 1 and follower not in api_pids(srv.proc.pid), 30)
            # the engine stopped the dead process's requests: their pages come back
            wait_for(lambda: metrics(srv.url)["nanoslg_kv_pages_used"][()] == 0, 30, 0.2)
            assert health(srv.url) == 200 and complete(srv.url, "still here")
        # a 4th death within the window: the server exits non-zero rather than half answering
        os.kill(api_pids(srv.proc.pid)[0], signal.SIGKILL)
        assert srv.proc.wait(60) != 0
