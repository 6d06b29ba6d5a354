"""Load on a running `nanoslg serve` from a raw-socket client that parses almost nothing (so the client is not what
it measures), with the CPU each server process used meanwhile (from /metrics):

  python benchmarks/api_load.py --port 8000 streams --streams 256 --tokens 64 --top-logprobs 20
  python benchmarks/api_load.py --port 8000 requests --concurrency 64 --total 3000 --tokens 4

streams: that many concurrent SSE streams of token-id prompts, counting events and tokens (return_token_ids);
requests: short streamed requests, `concurrency` connections each sending one after another."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request

PROMPT = [5, 6, 7, 8]


def _request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(data) + data)


async def _read_stream(reader: asyncio.StreamReader) -> bytes:
    """One response, whole: a chunked SSE stream, or an error with a Content-Length (a 503, say)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), None)
    if length is not None:
        return head + await reader.readexactly(length)
    data = bytearray(head)
    while not data.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _count(data: bytes) -> tuple:
    """(events, token ids) of one response: every SSE event starts on a line of its own."""
    events = tokens = 0
    for line in data.split(b"\r\n"):
        if line.startswith(b"data: {"):
            events += 1
            choices = json.loads(line[6:]).get("choices") or [{}]
            tokens += len(choices[0].get("token_ids") or [])
    return events, tokens


def stream_load(port: int, streams: int, tokens: int, top_logprobs: int = 0) -> tuple:
    """(SSE events/s, tokens/s, tokens received) of `streams` concurrent streams of `tokens` tokens each."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True, "return_token_ids": True}
    if top_logprobs:
        body["logprobs"] = top_logprobs
    raw = _request(body)

    async def one(counts: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        events, toks = _count(await _read_stream(reader))
        writer.close()
        counts[0] += events
        counts[1] += toks

    async def main() -> tuple:
        counts = [0, 0]
        start = time.perf_counter()
        await asyncio.gather(*(one(counts) for _ in range(streams)))
        return counts, time.perf_counter() - start

    (events, toks), took = asyncio.run(main())
    return events / took, toks / took, toks


def request_load(port: int, concurrency: int, total: int, tokens: int) -> tuple:
    """(requests/s, SSE events/s) of `total` short streamed requests over `concurrency` kept-alive connections."""
    raw = _request({"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True})
    left = [total]

    async def connection(counts: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(raw)
            await writer.drain()
            counts[0] += _count(await _read_stream(reader))[0]
            counts[1] += 1
        writer.close()

    async def main() -> tuple:
        counts = [0, 0]
        start = time.perf_counter()
        await asyncio.gather(*(connection(counts) for _ in range(concurrency)))
        return counts, time.perf_counter() - start

    (events, done), took = asyncio.run(main())
    return done / took, events / took


def process_cpu(port: int) -> dict:
    """CPU seconds of each server process, by name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    prefix = 'nanoslg_process_cpu_seconds_total{process="'
    return {line[len(prefix):].partition('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    sub = parser.add_subparsers(dest="load", required=True)
    s = sub.add_parser("streams")
    s.add_argument("--streams", type=int, default=256)
    s.add_argument("--tokens", type=int, default=64)
    s.add_argument("--top-logprobs", type=int, default=0)
    r = sub.add_parser("requests")
    r.add_argument("--concurrency", type=int, default=64)
    r.add_argument("--total", type=int, default=3000)
    r.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()
    before = process_cpu(args.port)
    if args.load == "streams":
        events, toks, n = stream_load(args.port, args.streams, args.tokens, args.top_logprobs)
        print(f"{events:.0f} SSE events/s, {toks:.0f} tokens/s ({n} tokens)")
        per, unit = n, "token"
    else:
        reqs, events = request_load(args.port, args.concurrency, args.total, args.tokens)
        print(f"{reqs:.0f} requests/s, {events:.0f} SSE events/s")
        per, unit = args.total, "request"
    after = process_cpu(args.port)
    print(f"CPU us per {unit}: " + ", ".join(f"{k} {1e6 * (after[k] - before.get(k, 0.0)) / per:.0f}"
                                               for k in sorted(after)))


if __name__ == "__main__":
    main()
