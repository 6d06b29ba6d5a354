"""Soak: 2000 streamed requests at concurrency 64, 30 % of the clients dropping mid-stream at random points. Every
surviving stream must carry the text its seed gives alone, the engine must end idle with every KV page back, and no
process may keep growing."""
import asyncio
import json
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_utils import Server
from test_server_lifecycle import children

NUM_REQUESTS, CONCURRENCY, DROP_RATE = 2000, 64, 0.3
VARIANTS = 48  # distinct (prompt, seed, length) requests, each sent many times


def variant(i: int) -> dict:
    rng = random.Random(i)
    return {"prompt": f"Soak request {i}: tell me about {rng.choice(['cats', 'ships', 'rain', 'maps'])}",
            "max_tokens": rng.randrange(8, 33), "temperature": 1.0, "seed": 1000 + i, "ignore_eos": True}


async def stream(client, url: str, body: dict, drop_after) -> str | None:
    """The streamed text, or None when this client hung up after drop_after chunks."""
    text, chunks = "", 0
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return None  # leaving the block closes the connection mid-stream
    return text


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def engine_gauges(url: str) -> dict:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    wanted = ("nanoslg_kv_pages_used", "nanoslg_num_requests_running", "nanoslg_num_requests_waiting")
    return {f.name: f.samples[0].value for f in families if f.name in wanted}


@pytest.mark.slow
def test_soak_2000_streams_with_dropping_clients(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "256") as srv:
        url = srv.url
        expected = {}
        for i in range(VARIANTS):  # each alone first: the reference text of its seed
            r = httpx.post(f"{url}/v1/completions", json=variant(i), timeout=60)
            expected[i] = r.json()["choices"][0]["text"]
        pids = {"api": srv.proc.pid, **children(srv.proc.pid)}
        rng = random.Random(7)
        plan = []  # (variant, chunks before hanging up or None)
        for _ in range(NUM_REQUESTS):
            v = rng.randrange(VARIANTS)
            drop = rng.randrange(1, variant(v)["max_tokens"]) if rng.random() < DROP_RATE else None
            plan.append((v, drop))
        rss_at_200 = {}

        async def main():
            limit = asyncio.Semaphore(CONCURRENCY)
            done = 0

            async def one(client, v, drop):
                nonlocal done
                async with limit:
                    text = await stream(client, url, variant(v), drop)
                done += 1
                if done == 200:
                    rss_at_200.update({name: rss_kb(pid) for name, pid in pids.items()})
                return text

            limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.gather(*(one(client, v, drop) for v, drop in plan))

        start = time.monotonic()
        texts = asyncio.run(asyncio.wait_for(main(), 900))
        elapsed = time.monotonic() - start
        survivors = [(v, t) for (v, drop), t in zip(plan, texts) if drop is None]
        assert len(survivors) > 0.6 * NUM_REQUESTS
        wrong = [v for v, t in survivors if t != expected[v]]
        assert not wrong, f"{len(wrong)} of {len(survivors)} streams differ from their seed's text"
        deadline = time.monotonic() + 30
        while (gauges := engine_gauges(url)) and any(gauges.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert gauges == {"nanoslg_kv_pages_used": 0, "nanoslg_num_requests_running": 0,
                          "nanoslg_num_requests_waiting": 0}, gauges
        grown = {name: rss_kb(pid) / rss_at_200[name] for name, pid in pids.items()}
        print(f"soak: {NUM_REQUESTS} streams in {elapsed:.0f} s; RSS growth since request 200: "
              + ", ".join(f"{k} {v:.3f}x" for k, v in grown.items()))
        assert all(g < 1.10 for g in grown.values()), grown
