"""Bad input, API keys, concurrency, client disconnects and a dead engine, against a real server."""
import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_utils import Server

KEY = "sekret"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "256", "--served-model-name", "tiny", "--max-body-mb", "0.5",
                api_key=KEY) as srv:
        yield srv


def _post(server, path, body=None, raw=None, key=KEY, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is not None:
        return httpx.post(f"{server.url}{path}", content=raw, headers={**h, "content-type": "application/json"},
                          timeout=60)
    return httpx.post(f"{server.url}{path}", json=body, headers=h, timeout=60)


def _assert_error(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


BAD_CASES = [
    ("invalid json", "/v1/chat/completions", None, b"{not json", 400, ["invalid JSON"]),
    ("not an object", "/v1/chat/completions", None, b"[1, 2]", 400, ["object"]),
    ("wrong type", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, None, 400, ["temperature"]),
    ("negative temperature", "/v1/chat/completions", {**GOOD, "temperature": -1}, None, 400, ["temperature"]),
    ("top_p zero", "/v1/chat/completions", {**GOOD, "top_p": 0}, None, 400, ["top_p"]),
    ("top_p above one", "/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, None, 400, ["top_p"]),
    ("max_tokens zero", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, None, 400, ["max_tokens"]),
    ("n zero", "/v1/chat/completions", {**GOOD, "n": 0}, None, 400, ["n"]),
    ("empty messages", "/v1/chat/completions", {**GOOD, "messages": []}, None, 400, ["messages"]),
    ("bad role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, None, 400,
     ["role"]),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, None, 400, ["prompt"]),
    ("empty prompt list", "/v1/completions", {"model": "tiny", "prompt": []}, None, 400, ["prompt"]),
    ("unsupported parameter", "/v1/chat/completions", {**GOOD, "functions": []}, None, 400,
     ["unsupported", "functions"]),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": "word " * 400}, None, 400,
     ["max_model_len"]),
    ("token id out of vocabulary", "/v1/completions", {"model": "tiny", "prompt": [10 ** 7]}, None, 400,
     ["vocabulary"]),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-9"}, None, 404, ["gpt-9"]),
    ("oversized body", "/v1/completions", {"model": "tiny", "prompt": "x" * 600_000}, None, 413, ["exceeds"]),
]


@pytest.mark.parametrize("name, path, body, raw, status, words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, name, path, body, raw, status, words):
    _assert_error(_post(server, path, body, raw), status, *words)
    if body is not None and status == 400:
        _assert_error(_post(server, path, {**body, "stream": True}), status, *words)  # before the stream starts
    ok = _post(server, "/v1/chat/completions", GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("body, code", [
    ({"model": "tiny", "prompt": "word " * 400}, "context_length_exceeded"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "\x16"}, "empty_prompt"),  # SmolLM2's tokenizer has no token for it
], ids=["text", "chat", "no tokens"])
def test_engine_rejections_carry_their_openai_code(server, body, code):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    for stream in (False, True):
        r = _post(server, path, {**body, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_max_tokens_beyond_what_max_model_len_leaves_is_a_400_naming_both(server):
    """OpenAI's and vLLM's rule: prompt + max_tokens must fit in max_model_len (256 here)."""
    cases = [("/v1/completions", {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 300}, 4),
             ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 253}, 4),
             ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 9000}, None),
             ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                       "max_completion_tokens": 256}, None)]
    for path, body, prompt_tokens in cases:
        for stream in (False, True):
            err = _assert_error(_post(server, path, {**body, "stream": stream}), 400, "max_model_len is 256",
                                f"max_tokens is {body.get('max_tokens') or body.get('max_completion_tokens')}")
            assert err["code"] == "context_length_exceeded"
            if prompt_tokens:
                assert f"the prompt has {prompt_tokens} tokens" in err["message"]
                assert f"at most {256 - prompt_tokens} tokens" in err["message"]
    # what fits exactly runs, to max_model_len; so does a request that leaves max_tokens out
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 252,
                                          "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 252
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


def test_api_key(server):
    _assert_error(_post(server, "/v1/chat/completions", GOOD, key=None), 401, "API key")
    _assert_error(_post(server, "/v1/chat/completions", GOOD, key="wrong"), 401)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_unknown_route_is_json(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    _assert_error(r, 404)


async def _stream(client, url, body, stop_after=None):
    """Stream one completion; returns its text, or None if we hung up after stop_after chunks."""
    text, chunks = "", 0
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return None
    return text


def test_64_concurrent_streams_are_correct_and_independent(server):
    prompts = [f"Tell me about number {i} and the colour {c}" for i, c in zip(range(64), ["red", "blue"] * 32)]
    url = f"{server.url}/v1/completions"

    def body(p):
        return {"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0, "stream": True,
                "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[_stream(client, url, body(p)) for p in prompts])

    together = asyncio.run(run())
    alone = [_post(server, "/v1/completions", {**body(p), "stream": False}).json()["choices"][0]["text"]
             for p in prompts[:8]]
    assert together[:8] == alone
    assert all(t for t in together) and len(set(together)) > 1


def _kv_pages_used(server) -> float:
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    return next(f for f in families if f.name == "nanoslg_kv_pages_used").samples[0].value


def test_dropped_streams_free_their_pages(server):
    url = f"{server.url}/v1/completions"

    def body(i):
        return {"model": "tiny", "prompt": f"story {i}", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[_stream(client, url, body(i), stop_after=3 if i % 2 else None)
                                          for i in range(20)])

    results = asyncio.run(run())
    kept = [r for i, r in enumerate(results) if i % 2 == 0]
    assert all(r is not None and len(r) > 0 for r in kept)
    deadline = time.monotonic() + 20
    while _kv_pages_used(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _kv_pages_used(server) == 0


def test_non_streaming_disconnect_aborts(server):
    body = {"model": "tiny", "prompt": "long story", "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=0.3)
    deadline = time.monotonic() + 20
    while _kv_pages_used(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _kv_pages_used(server) == 0


def test_queue_full_and_engine_death_get_503(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "256", "--max-queued-requests", "1") as srv:
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream (the client leaves)
            next(lines)  # it holds the only place: the next request is told to come back
            full = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"})
            _assert_error(full, 503, "limit")
            assert full.headers["Retry-After"] == "1"
        # more choices than the server ever runs at once: no retry can help, so the client's error
        err = _assert_error(httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "n": 2}), 400, "at once")
        assert err["code"] == "too_many_choices"
    with Server(tiny_chat_model, "--max-model-len", "256") as srv:
        # one body of 300 prompts x 16 choices passes the default limits (2048 waiting, 4096 in progress)
        _assert_error(httpx.post(f"{srv.url}/v1/completions", json={"prompt": ["a"] * 300, "n": 16}), 400,
                      "4800 completions")
        children = [int(p) for p in open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read().split()]
        worker = next(p for p in children if "gpu_workers.worker_proc" in open(f"/proc/{p}/cmdline").read())
        # a request already running when the engine dies fails with 503 too (instead of waiting forever)
        os.kill(worker, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 8},
                                  timeout=30)
            time.sleep(1.0)
            os.kill(worker, signal.SIGKILL)
            _assert_error(running.result(), 503, "engine stopped")
        # then the engine heals (test_server_lifecycle covers the restart itself) and answers again
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
