"""The same streaming load against one API-server process and against two, in one test, on a tokenizer-less tiny
model: many concurrent SSE streams read by benchmarks/api_load.py's raw-socket client (it parses little, so it
costs little CPU).

One process that falls behind sends fewer, larger events: what already waits for a stream goes out as one event.
So the ratio of events per second says how much of the per-token streaming two processes keep up with; tokens
per second are printed too (on a 2-core machine the CPU engine, not the API server, bounds them)."""
import os
import sys

from server_utils import ROOT, Server

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from api_load import stream_load  # noqa: E402

STREAMS, TOKENS, TOP_LOGPROBS, RUNS = 256, 64, 20, 3


def test_two_api_processes_stream_more_events_per_second_than_one(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NANOSLG_CPU_THREADS", "1")  # the worker leaves the second core to the API servers
    model = tiny_model_dir("llama")
    rates = {}
    for count in ("1", "2"):
        with Server(model, "--max-model-len", "256", "--api-server-count", count) as srv:
            stream_load(srv.port, STREAMS, TOKENS, TOP_LOGPROBS)  # warm-up: first steps, imports, connections
            # Two cores are shared by the client, the worker, the scheduler, the tokenizer and the API processes, so
            # one run's events/s swings with the OS's scheduling (0.9k to 2.7k for one process): the best of three
            # is what the API processes can do.
            rates[count] = max((stream_load(srv.port, STREAMS, TOKENS, TOP_LOGPROBS) for _ in range(RUNS)),
                               key=lambda rate: rate[0])
    (ev1, tok1, n1), (ev2, tok2, n2) = rates["1"], rates["2"]
    print(f"\n1 API process: {ev1:.0f} events/s, {tok1:.0f} tok/s; 2: {ev2:.0f} events/s, {tok2:.0f} tok/s; "
          f"events ratio {ev2 / ev1:.2f}, tokens ratio {tok2 / tok1:.2f}")
    assert n1 == n2 == STREAMS * TOKENS  # every token of every stream arrived, either way
    assert ev2 / ev1 > 1.2
