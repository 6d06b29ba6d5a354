"""Greedy tokens must equal Hugging Face transformers (fp32) exactly, however the engine batches the work."""
import time

import pytest

from conftest import UNBOUNDED, random_prompts
from nanoslg import LLM, SamplingParams
from nanoslg.entrypoints.debug import DebugClient
from nanoslg.protocol import GenerateRequest, token_ids

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _generate(folder, prompts, params=GREEDY, **engine_args):
    with LLM(folder, **engine_args) as llm:
        outs = llm.generate(prompts, params)
        with DebugClient(llm.config.run_dir) as debug:
            state = debug.state()
    assert all(o.error is None and o.finish_reason == "length" for o in outs)
    return [o.token_ids for o in outs], state


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_mixed_lengths(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    prompts = random_prompts(10, seed=1)
    got, state = _generate(folder, prompts, max_model_len=256)
    assert got == hf_reference(folder, prompts, 12)
    assert state["kv_pages_used"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    prompts = random_prompts(8, seed=2, lengths=[70, 45, 5, 33, 90, 12, 64, 8])
    # 16 tokens per step: every prompt above 16 tokens is split over several steps, mixed with decodes.
    got, state = _generate(folder, prompts, max_model_len=256, max_num_batched_tokens=16)
    assert got == hf_reference(folder, prompts, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption(arch, tiny_model_dir, hf_to_max_len):
    folder = tiny_model_dir(arch)
    prompts = random_prompts(8, seed=3, lengths=[30, 25, 40, 20, 35, 28, 22, 38])
    # 28 pages of 4 tokens cannot hold 8 sequences running to 52 tokens, and without max_tokens the admission
    # cannot see that coming: the newest get preempted and recomputed.
    got, state = _generate(folder, prompts, SamplingParams(**UNBOUNDED), max_model_len=52, page_size=4,
                           num_kv_pages=28)
    assert state["total_preemptions"] > 0
    assert state["kv_pages_used"] == 0
    assert got == hf_to_max_len(folder, prompts, 52)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_predicted_memory_admission_never_preempts(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    prompts = random_prompts(8, seed=3, lengths=[30, 25, 40, 20, 35, 28, 22, 38])
    # The same pool, but every request says how long it runs: the admission holds back what would not fit.
    got, state = _generate(folder, prompts, max_model_len=100, page_size=4, num_kv_pages=28)
    assert state["total_preemptions"] == 0
    assert state["kv_pages_used"] == 0
    assert got == hf_reference(folder, prompts, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_requests_arriving_while_others_decode(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    first, late = random_prompts(4, seed=4), random_prompts(4, seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    with LLM(folder, max_model_len=256) as llm:
        for i, p in enumerate(first):
            llm.engine.submit(GenerateRequest(f"first-{i}", params, prompt_ids=token_ids(p)))
        submitted_late = False
        deadline = time.monotonic() + 60
        while len([o for o in outputs.values() if o[1]]) < 8 and time.monotonic() < deadline:
            for d in llm.engine.poll_deltas(50):
                toks, done = outputs.get(d.rid, ([], False))
                outputs[d.rid] = (toks + list(d.token_ids), d.finish_reason is not None)
            decoded = sum(len(t) for rid, (t, _) in outputs.items() if rid.startswith("first"))
            if not submitted_late and decoded >= 8:
                assert not any(done for _, done in outputs.values()), "late requests must join mid-decode"
                for i, p in enumerate(late):
                    llm.engine.submit(GenerateRequest(f"late-{i}", params, prompt_ids=token_ids(p)))
                submitted_late = True
    ref = hf_reference(folder, first + late, 24)
    got = [outputs[f"first-{i}"][0] for i in range(4)] + [outputs[f"late-{i}"][0] for i in range(4)]
    assert got == ref
