"""Tensor, pipeline and hybrid parallelism on CPU (gloo): greedy tokens identical to Hugging Face fp32 for every layout
and model family, with several micro-batches in flight at once, preemption, requests arriving mid-decode and aborts;
unsupported layouts refused at startup; each rank reading only its part of the weights."""
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import random_prompts
from nanoslg import LLM, SamplingParams
from nanoslg.entrypoints.debug import DebugClient
from nanoslg.model_spec import ConfigError
from nanoslg.protocol import GenerateRequest, token_ids
from tiny_models import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
# The tiny models have 3 layers, 4 query heads and 2 KV heads.
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "tp4": dict(tensor_parallel_size=4),  # 2 KV heads on 4 ranks: each KV head replicated on two
    "pp2": dict(pipeline_parallel_size=2),  # an odd layer count: stages of 2 and 1 layers
    "pp3": dict(pipeline_parallel_size=3),
    "tp2pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
}
# 28 pages of 4 tokens cannot hold 8 sequences of ~50 tokens (preemption); 16 tokens per step split every prompt
# into chunks and keep up to pp+1 micro-batches in flight.
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


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_layout_gives_transformers_tokens(arch, layout, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    batch = random_prompts(8, seed=3, lengths=[30, 25, 40, 20, 35, 28, 22, 38])
    first, late = random_prompts(3, seed=4), random_prompts(3, seed=5)
    doomed = random_prompts(4, seed=6, lengths=[10, 12, 14, 16])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True).to_dict()
    with LLM(folder, **ENGINE, **LAYOUTS[layout]) as llm, DebugClient(llm.config.run_dir) as debug:
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
        # 3. aborts while the requests' steps are in flight: the survivors' tokens stand, every page comes back
        for i, p in enumerate(doomed):
            llm.engine.submit(GenerateRequest(f"doomed-{i}", long, prompt_ids=token_ids(p)))
        started = {}
        while len(started) < 4:
            for d in llm.engine.poll_deltas(20):
                started[d.rid] = started.get(d.rid, []) + list(d.token_ids)
        llm.engine.abort("doomed-1")
        llm.engine.abort("doomed-3")
        survivors = _collect(llm, {"doomed-0", "doomed-2"}, started)
        idle = _wait_idle(debug)
    assert got == hf_reference(folder, batch, 12)
    assert preemptions > 0
    assert most_in_flight == in_flight_limit, (most_in_flight, in_flight_limit)
    assert [joined[f"first-{i}"][0] for i in range(3)] + [joined[f"late-{i}"][0] for i in range(3)] == \
        hf_reference(folder, first + late, 40)
    ref = hf_reference(folder, doomed, 40)
    assert [survivors["doomed-0"][0], survivors["doomed-2"][0]] == [ref[0], ref[2]]
    assert idle["kv_pages_free"] == idle["kv_pages_total"]


def test_debug_state_shows_each_micro_batch(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), max_model_len=512, pipeline_parallel_size=2) as llm:
        for i, p in enumerate(random_prompts(6, seed=7)):
            llm.engine.submit(GenerateRequest(f"r{i}", SamplingParams(max_tokens=300, ignore_eos=True).to_dict(),
                                              prompt_ids=token_ids(p)))
        while not llm.engine.poll_deltas(50):
            pass
        out = subprocess.run([sys.executable, "-m", "nanoslg", "debug", "--run-dir", llm.config.run_dir, "state"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ,
                                                                                      "PYTHONPATH": ROOT})
    state = json.loads(out.stdout)
    batches = state["micro_batches"]
    assert 1 <= len(batches) <= 3 and all(b["num_seqs"] >= 1 and b["num_tokens"] >= 1 for b in batches)
    # the six requests are spread over the micro-batches, none in two at once
    assert sum(b["num_seqs"] for b in batches) <= 6


@pytest.mark.parametrize("layout, overrides, message", [
    (dict(tensor_parallel_size=3), {}, "4 attention heads do not split over tensor_parallel_size=3"),
    (dict(pipeline_parallel_size=4), {}, "3 layers cannot fill 4 pipeline stages"),
    (dict(tensor_parallel_size=2), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
     "3 KV heads can neither be split over nor replicated onto tensor_parallel_size=2"),
    (dict(tensor_parallel_size=4), dict(intermediate_size=130), "intermediate size 130 does not split"),
    (dict(tensor_parallel_size=2, nnodes=3), {}, "2 workers do not split evenly over 3 nodes"),
    (dict(pipeline_parallel_size=2, nnodes=2), {}, "needs --dist-init-addr HOST:PORT"),
])
def test_unsupported_layouts_are_refused_at_startup(tmp_path, layout, overrides, message):
    folder = make_tiny_model("llama", str(tmp_path / "m"), **overrides)
    with pytest.raises(ConfigError, match=message):
        LLM(folder, **layout)


def test_cli_names_the_bad_layout(tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "nanoslg", "generate", tiny_model_dir("llama"), "-tp", "3", "-p", "1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2 and "do not split over tensor_parallel_size=3" in out.stderr


def test_each_rank_reads_only_its_part_of_the_weights(tiny_model_dir):
    from safetensors import safe_open

    folder = tiny_model_dir("llama")
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        total = 4 * sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # fp32
    for layout in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        with LLM(folder, max_model_len=64, **layout) as llm:
            read = [llm.engine.info[f"worker{r}"]["weight_bytes_read"] for r in range(2)]
        # Every byte is read by exactly one rank, but for the small norm weights every TP rank needs: no rank reads
        # a whole tensor to keep a slice of it. (Stage 0 holds 2 of 3 layers and the embedding: 60 %.)
        assert total <= sum(read) <= 1.02 * total and max(read) <= 0.61 * total, (layout, read, total)


def test_kv_pages_are_sized_per_rank_and_the_scheduler_takes_the_fewest(tiny_model_dir):
    # 3 layers over 2 stages: stage 0 holds 2 layers' KV per page, stage 1 one layer's, in the same budget
    with LLM(tiny_model_dir("llama"), max_model_len=64, pipeline_parallel_size=2, kv_cache_memory_gb=0.002) as llm:
        info = llm.engine.info
    pages = [info["worker0"]["num_pages"], info["worker1"]["num_pages"]]
    assert abs(pages[1] - 2 * pages[0]) <= 1 and info["scheduler"]["num_pages"] == min(pages)
