"""One engine run that exercises everything a batching or parallel layout can get wrong, checked against Hugging Face
fp32 greedy tokens: more sequences than the KV pool holds (chunked prefill, micro-batches in flight, preemption and
recompute), requests arriving while others decode, prefix-cache hits, and aborts of requests whose steps are in
flight. test_parallel runs it for every layout, test_nano_batch with the batch split into nano-batches."""
import threading
import time

from conftest import UNBOUNDED, random_prompts
from nanoslg import LLM, SamplingParams
from nanoslg.entrypoints.debug import DebugClient
from nanoslg.protocol import GenerateRequest, token_ids

# 28 pages of 4 tokens cannot hold 8 sequences running to max_model_len without max_tokens (preemption); 16
# tokens per step split every prompt into chunks and keep up to pp+1 micro-batches in flight.
ENGINE = dict(max_model_len=100, page_size=4, num_kv_pages=28, max_num_batched_tokens=16)


class InFlightWatcher:
    """Polls the scheduler's debug state from a thread and records the most micro-batches seen in flight."""

    def __init__(self, run_dir: str):
        self.most, self._stop = 0, threading.Event()
        self._client = DebugClient(run_dir)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(self._client.state()["micro_batches"]))
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        self._client.close()
        return self.most


def _collect(llm, rids: set, seen: dict = None, deadline_s: float = 120) -> dict:
    """rid -> (tokens, finish reason) for every rid in rids, reading the engine's deltas until all finished; seen:
    tokens already read."""
    out = {rid: ((seen or {}).get(rid, []), None) for rid in rids}
    deadline = time.monotonic() + deadline_s
    while any(out[r][1] is None for r in rids):
        assert time.monotonic() < deadline, "requests did not finish"
        for d in llm.engine.poll_deltas(50):
            if d.rid in out:
                assert d.error is None, d.error
                out[d.rid] = (out[d.rid][0] + list(d.token_ids), d.finish_reason)
    return out


def _wait_idle(debug: DebugClient) -> dict:
    deadline = time.monotonic() + 30
    while True:
        state = debug.state()
        if (state["running"], state["waiting"], state["kv_pages_used"], state["steps_in_flight"]) == (0, 0, 0, 0):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def run_scenario(folder: str, hf_reference, hf_to_max_len, **engine_args) -> None:
    batch = random_prompts(8, seed=3, lengths=[20, 15, 22, 18, 25, 16, 21, 19])
    first, late = random_prompts(3, seed=4), random_prompts(3, seed=5)
    # three prompts sharing the first two pages (8 tokens) of one that ran before them: prefix-cache hits
    stem = random_prompts(1, seed=7, lengths=[12])[0]
    shared = [stem[:8] + p for p in random_prompts(3, seed=8, lengths=[5, 9, 3])]
    # small enough that all four fit the pool at once (the admission plans with their max_tokens)
    doomed = random_prompts(4, seed=6, lengths=[4, 5, 6, 7])
    params = SamplingParams(**UNBOUNDED)
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(folder, **{**ENGINE, **engine_args}) as llm, DebugClient(llm.config.run_dir) as debug:
        in_flight_limit = llm.config.max_steps_in_flight
        watcher = InFlightWatcher(llm.config.run_dir)
        # 1. more sequences than the KV pool holds: chunked prefill, micro-batches, preemption and recompute
        got = [o.token_ids for o in llm.generate(batch, params)]
        most_in_flight = watcher.stop()
        preemptions = debug.state()["total_preemptions"]
        # 2. requests arriving while others decode
        for i, p in enumerate(first):
            llm.engine.submit(GenerateRequest(f"first-{i}", long, prompt_ids=token_ids(p)))
        seen = {}
        while sum(len(t) for t in seen.values()) < 3 * 6:
            for d in llm.engine.poll_deltas(50):
                seen[d.rid] = seen.get(d.rid, []) + list(d.token_ids)
        assert all(len(t) < 40 for t in seen.values()), "late requests must join mid-decode"
        for i, p in enumerate(late):
            llm.engine.submit(GenerateRequest(f"late-{i}", long, prompt_ids=token_ids(p)))
        joined = _collect(llm, {f"late-{i}" for i in range(3)} | {f"first-{i}" for i in range(3)}, seen)
        # 3. prefix hits: the stem's pages are cached once it ran
        hits_before = debug.state()["prefix_cache_hits"]
        cached = [o.token_ids for o in llm.generate([stem] + shared, short)]
        hits = debug.state()["prefix_cache_hits"] - hits_before
        # 4. aborts while the requests' steps are in flight: the survivors' tokens stand, every page comes back
        for i, p in enumerate(doomed):
            llm.engine.submit(GenerateRequest(f"doomed-{i}", short, prompt_ids=token_ids(p)))
        started = {}
        while len(started) < 4:
            for d in llm.engine.poll_deltas(20):
                started[d.rid] = started.get(d.rid, []) + list(d.token_ids)
        llm.engine.abort("doomed-1")
        llm.engine.abort("doomed-3")
        survivors = _collect(llm, {"doomed-0", "doomed-2"}, started)
        idle = _wait_idle(debug)
    assert got == hf_to_max_len(folder, batch, ENGINE["max_model_len"])
    assert preemptions > 0
    assert most_in_flight == in_flight_limit, (most_in_flight, in_flight_limit)
    assert [joined[f"first-{i}"][0] for i in range(3)] + [joined[f"late-{i}"][0] for i in range(3)] == \
        hf_reference(folder, first + late, 40)
    assert hits >= 3 * 8, hits
    assert cached == hf_reference(folder, [stem] + shared, 16)
    ref = hf_reference(folder, doomed, 16)
    assert [survivors["doomed-0"][0], survivors["doomed-2"][0]] == [ref[0], ref[2]]
    assert idle["kv_pages_free"] == idle["kv_pages_total"]
