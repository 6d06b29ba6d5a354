"""The same streaming load against one API-server process and against two, in one test, on a tokenizer-less tiny
model: many concurrent SSE streams read by a raw-socket client (it parses nothing, so it costs little CPU).

One process that falls behind sends fewer, larger events: what already waits for a stream goes out as one event.
So the ratio of events per second says how much of the per-token streaming two processes keep up with; tokens
per second are printed too (on a 2-core machine the CPU engine, not the API server, bounds them)."""
import asyncio
import json
import time

from server_utils import Server

STREAMS, TOKENS, TOP_LOGPROBS = 256, 64, 20


async def _stream(port: int, body: bytes, counts: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    data = bytearray()
    while not data.endswith(b"0\r\n\r\n"):  # the chunked body's end
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        data += chunk
    writer.close()
    counts[0] += data.count(b"\r\ndata: {")  # every chunk starts on a line of its own
    for line in data.split(b"\r\n"):
        if line.startswith(b"data: {"):
            counts[1] += len(json.loads(line[6:])["choices"][0]["token_ids"])


def _load(port: int) -> tuple:
    """(SSE events/s, tokens/s, tokens) of STREAMS concurrent streams of TOKENS tokens."""
    body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
                       "logprobs": TOP_LOGPROBS, "return_token_ids": True}).encode()

    async def main():
        counts = [0, 0]
        start = time.perf_counter()
        await asyncio.gather(*(_stream(port, body, counts) for _ in range(STREAMS)))
        return counts, time.perf_counter() - start

    (events, tokens), took = asyncio.run(main())
    return events / took, tokens / took, tokens


def test_two_api_processes_stream_more_events_per_second_than_one(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NANOSLG_CPU_THREADS", "1")  # the worker leaves the second core to the API servers
    model = tiny_model_dir("llama")
    rates = {}
    for count in ("1", "2"):
        with Server(model, "--max-model-len", "256", "--api-server-count", count) as srv:
            _load(srv.port)  # warm-up: first steps, imports, connections
            rates[count] = _load(srv.port)
    (ev1, tok1, n1), (ev2, tok2, n2) = rates["1"], rates["2"]
    print(f"\n1 API process: {ev1:.0f} events/s, {tok1:.0f} tok/s; 2: {ev2:.0f} events/s, {tok2:.0f} tok/s; "
          f"events ratio {ev2 / ev1:.2f}, tokens ratio {tok2 / tok1:.2f}")
    assert n1 == n2 == STREAMS * TOKENS  # every token of every stream arrived, either way
    assert ev2 / ev1 > 1.2
