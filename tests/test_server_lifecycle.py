"""An operator's view of `nanoslg serve`: engine processes killed under load (restart, then a crash loop that ends
the server), SIGTERM drain, a second SIGINT, and a bounded waiting queue."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from server_utils import ROOT, Server, free_port

MODULES = {"worker": "gpu_workers.worker_proc", "scheduler": "scheduler_proc.main", "tokenizer": "tokenizer_proc.main"}


def children(pid: int) -> dict:
    """module -> pid of the server's live engine processes."""
    found, pids = {}, []
    try:  # a restarted engine's processes are children of the thread that started them
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(p) for p in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except FileNotFoundError:
        return found
    for child in pids:
        try:
            cmdline = open(f"/proc/{child}/cmdline").read()
        except FileNotFoundError:
            continue
        for name, module in MODULES.items():
            if module in cmdline:
                found[name] = child
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_for(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds until condition() held; fails after timeout."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - start


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


async def stream(client, url: str, body: dict, on_first=lambda: None) -> tuple:
    """(text, error message or None, finish_reason) of one streamed completion; on_first() at its first text."""
    text, error, finish = "", None, None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return "", (await r.aread()).decode(), None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            if chunk["choices"][0]["text"] and not text:
                on_first()
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0].get("finish_reason") or finish
    return text, error, finish


def run_streams(url: str, bodies: list, during=None) -> list:
    """Streams every body at once; calls during() once each stream has its first tokens (so all are running,
    whatever the machine's speed); returns their (text, error, finish)."""
    async def main():
        started, all_started = [0], asyncio.Event()

        def on_first():
            started[0] += 1
            if started[0] == len(bodies):
                all_started.set()

        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(stream(client, url, b, on_first)) for b in bodies]
            if during is not None:
                await asyncio.wait_for(all_started.wait(), 60)
                await asyncio.to_thread(during)
            return await asyncio.wait_for(asyncio.gather(*tasks), 90)
    return asyncio.run(main())


def complete(url: str, prompt: str, retry_503_s: float = 0.0) -> str:
    """A greedy completion; retry_503_s: for that long, a 503 (with its Retry-After) is retried, as a client does."""
    deadline = time.monotonic() + retry_503_s
    while True:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                       "ignore_eos": True}, timeout=60)
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        assert r.headers["Retry-After"].isdigit()
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


LONG = {"prompt": "tell me a long story", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
# The same life with one API-server process and with two (the second follows the first's engine)
API_SERVERS = pytest.mark.parametrize("api_servers", ["1", "2"], ids=["1api", "2api"])


@API_SERVERS
def test_engine_heals_after_each_process_dies_then_a_crash_loop_ends_the_server(tiny_chat_model, api_servers):
    with Server(tiny_chat_model, "--max-model-len", "1024", "--api-server-count", api_servers) as srv:
        reference = complete(srv.url, "The capital of France")
        aborted = 0  # in-flight requests the engine deaths ended
        for victim in ("worker", "scheduler", "tokenizer"):
            before = children(srv.proc.pid)
            assert set(before) == set(MODULES), before
            killed = {}

            def kill():
                os.kill(before[victim], signal.SIGKILL)
                killed["at"] = time.monotonic()
                killed["to_503"] = wait_for(lambda: health(srv.url) == 503, 2.0)
                killed["metrics"] = httpx.get(f"{srv.url}/metrics", timeout=10).status_code  # while restarting

            results = run_streams(srv.url, [LONG] * 4, during=kill)
            # every in-flight stream ended with an error event naming what died; none hung
            for _text, error, finish in results:
                assert error is not None and victim in error and finish is None, (victim, error, finish)
            assert killed["to_503"] < 2.0 and killed["metrics"] == 200
            r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"}, timeout=10)
            aborted += len(results)
            if r.status_code == 503:  # still restarting: told when to come back
                assert r.headers["Retry-After"].isdigit() and r.json()["error"]["type"] == "service_unavailable"
                # a follower may admit it in the moment before it hears of the death: then it is one more abort
                aborted += "while the request was running" in r.json()["error"]["message"]
            wait_for(lambda: health(srv.url) == 200, 120, 0.2)
            # /health answered by one API process; the other may hear of the new engine a moment later (a 503 then)
            assert complete(srv.url, "The capital of France", retry_503_s=10.0) == reference
            assert not any(alive(p) for p in before.values()), f"orphans after the {victim} died"
            after = children(srv.proc.pid)
            assert set(after) == set(MODULES) and not set(after.values()) & set(before.values())
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert "nanoslg_engine_restarts_total 3.0" in metrics
        assert f'nanoslg_request_aborts_total{{reason="engine_died"}} {aborted:.1f}' in metrics, \
            [line for line in metrics.splitlines() if "aborts_total" in line]
        # A 4th death within the window: the server gives up, exits non-zero and leaves no process behind.
        last = children(srv.proc.pid)
        os.kill(last["worker"], signal.SIGKILL)
        assert srv.proc.wait(60) != 0
        assert not any(alive(p) for p in last.values())


@API_SERVERS
def test_no_restart_exits_at_the_first_death(tiny_chat_model, api_servers):
    with Server(tiny_chat_model, "--max-model-len", "256", "--no-restart", "--api-server-count", api_servers) as srv:
        procs = children(srv.proc.pid)
        os.kill(procs["scheduler"], signal.SIGKILL)
        assert srv.proc.wait(30) == 1
        assert not any(alive(p) for p in procs.values())


def test_sigterm_during_a_restart_stops_the_engine_being_started(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "256") as srv:
        first = children(srv.proc.pid)
        os.kill(first["worker"], signal.SIGKILL)
        wait_for(lambda: {"worker", "tokenizer"} <= set(children(srv.proc.pid))
                 and children(srv.proc.pid)["worker"] != first["worker"], 30, 0.02)
        starting = children(srv.proc.pid)
        os.kill(starting["worker"], signal.SIGSTOP)  # the new engine is still starting when SIGTERM comes
        assert health(srv.url) == 503
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        os.kill(starting["worker"], signal.SIGCONT)  # a slow start: it must be stopped, not waited for
        assert srv.proc.wait(30) == 0 and time.monotonic() - start < 10
        assert not any(alive(p) for p in {**first, **starting}.values())


@API_SERVERS
def test_sigterm_drains_running_streams_then_exits_0(tiny_chat_model, api_servers):
    with Server(tiny_chat_model, "--max-model-len", "1024", "--shutdown-timeout", "25", "--api-server-count",
                api_servers) as srv:
        procs = children(srv.proc.pid)
        body = {**LONG, "max_tokens": 300}  # a few seconds for 8 streams: still running at the signal
        refused = {}

        def term():
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused["health"] = health(srv.url)
            try:
                refused["new"] = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"}, timeout=5)
            except httpx.HTTPError as e:  # the listener may already be closed
                refused["new"] = e

        start = time.monotonic()
        results = run_streams(srv.url, [body] * 8, during=term)
        assert all(error is None and finish == "length" and text for text, error, finish in results)
        new = refused["new"]
        assert isinstance(new, httpx.HTTPError) or new.status_code == 503, new
        assert refused["health"] in (0, 503)
        assert srv.proc.wait(30) == 0 and time.monotonic() - start < 30
        assert not any(alive(p) for p in procs.values())


@pytest.mark.parametrize("signals, shutdown_timeout, error", [
    ([signal.SIGTERM], "1", "shutting down"),  # the drain times out: the rest are aborted
    ([signal.SIGINT, signal.SIGINT], "60", "stopping"),  # a second signal stops at once, long before the timeout
], ids=["drain-timeout", "second-sigint"])
@API_SERVERS
def test_unfinished_streams_end_with_an_error_event(tiny_chat_model, signals, shutdown_timeout, error, api_servers):
    with Server(tiny_chat_model, "--max-model-len", "2048", "--shutdown-timeout", shutdown_timeout,
                "--api-server-count", api_servers) as srv:
        procs = children(srv.proc.pid)
        body = {**LONG, "max_tokens": 2000}

        def send_signals():
            for i, sig in enumerate(signals):
                time.sleep(0.5 * (i > 0))
                srv.proc.send_signal(sig)

        start = time.monotonic()
        results = run_streams(srv.url, [body] * 4, during=send_signals)
        assert all(err is not None and error in err for _, err, _ in results), results
        assert srv.proc.wait(30) == 0 and time.monotonic() - start < 15
        assert not any(alive(p) for p in procs.values())


@API_SERVERS
def test_overload_beyond_the_waiting_bound_gets_503_at_once(tiny_chat_model, api_servers):
    # with two processes the bound holds for both together (nanoslg/server/queue_counts.py)
    with Server(tiny_chat_model, "--max-model-len", "512", "--max-waiting-requests", "4",
                "--max-num-seqs", "1", "--api-server-count", api_servers) as srv:
        body = {"prompt": "count", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

        async def one(client):
            start = time.monotonic()
            r = await client.post(f"{srv.url}/v1/completions", json=body)
            return r, time.monotonic() - start

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[one(client) for _ in range(16)])

        results = asyncio.run(main())
        admitted = [r for r, _ in results if r.status_code == 200]
        refused = [(r, t) for r, t in results if r.status_code != 200]
        assert 4 <= len(admitted) <= 5 and len(refused) == 16 - len(admitted)  # at most one already running
        texts = {r.json()["choices"][0]["text"] for r in admitted}
        assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 40 for r in admitted)
        for r, took in refused:
            assert r.status_code == 503 and r.headers["Retry-After"] == "1" and took < 2.0
            assert "overloaded" in r.json()["error"]["message"]


def test_offline_llm_raises_a_clear_error_when_a_process_dies(tiny_model_dir):
    from nanoslg import LLM, SamplingParams
    from nanoslg.engine_client import EngineDeadError

    with LLM(tiny_model_dir("llama"), max_model_len=256) as llm:
        worker = llm.engine.launcher.pids["worker0"]
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="worker0 was killed by SIGKILL"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=50, ignore_eos=True))


def test_json_logs_one_object_per_line_with_the_request_id(tiny_chat_model, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "nanoslg", "serve", tiny_chat_model, "--port", str(port),
                                 "--max-model-len", "256", "--log-format", "json", "--log-level", "info"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stderr=log_file)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: health(url) == 200, 120, 0.3)
            complete(url, "hello")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]  # JSON only
    assert {"time", "level", "logger", "pid", "message"} <= set(entries[0])
    done = [e for e in entries if "prompt +" in e["message"]]
    assert len(done) == 1 and len(done[0]["request_id"]) == 32 and "ok" in done[0]["message"]
    assert len({e["pid"] for e in entries}) >= 2  # the engine's processes log as json too (the worker's startup)
