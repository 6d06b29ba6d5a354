"""Nano-batching on CPU: the step's batch split into 2 or 3 nano-batches runs the same code path as on the GPU
(operation by operation, nano-batch by nano-batch; the side streams are CUDA's only) and must give Hugging Face's
greedy tokens in every layout, with chunked prefill, preemption, prefix hits and aborts (tests/scenario.py)."""
import pytest

from conftest import random_prompts
from gpu_workers.nano_batch import split_rows
from nanoslg import LLM, SamplingParams
from nanoslg.entrypoints.debug import DebugClient
from scenario import run_scenario

LAYOUTS = {"single": {}, "tp2": dict(tensor_parallel_size=2), "pp2": dict(pipeline_parallel_size=2),
           "tp2pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2)}
# Every family in TP2xPP2 (test_parallel leaves two of them out of it) and in at least one other layout, and every
# layout with both nano-batch counts, in 10 engine runs rather than 32 (the CPU suite's time on two cores).
CASES = [("llama", "tp2pp2", 3), ("mistral", "tp2pp2", 2), ("qwen2", "tp2pp2", 3), ("qwen3", "tp2pp2", 2),
         ("llama", "single", 2), ("qwen3", "single", 3), ("mistral", "tp2", 3), ("qwen2", "tp2", 2),
         ("qwen3", "pp2", 2), ("llama", "pp2", 3)]


def test_split_rows_keeps_rows_whole_and_balances_tokens():
    assert split_rows([1] * 8, 2) == [(0, 4), (4, 8)]
    assert split_rows([1] * 7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert split_rows([1, 1, 1, 1, 12], 2) == [(0, 4), (4, 5)]  # the prefill row alone: as even as whole rows allow
    assert split_rows([5, 5], 3) == [(0, 1), (1, 2)]  # never more parts than rows
    assert split_rows([3], 2) == [(0, 1)]
    for q_lens in ([2, 9, 1, 1, 30, 4], [1] * 33, [16, 16, 1]):
        for n in (1, 2, 3):
            parts = split_rows(q_lens, n)
            assert parts[0][0] == 0 and parts[-1][1] == len(q_lens) and len(parts) == min(n, len(q_lens))
            assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))


@pytest.mark.parametrize("arch, layout, nano", CASES)
def test_nano_batches_give_transformers_tokens(arch, layout, nano, tiny_model_dir, hf_reference, hf_to_max_len):
    run_scenario(tiny_model_dir(arch), hf_reference, hf_to_max_len, nano_batches=nano, **LAYOUTS[layout])


def test_nano_batched_steps_are_timed_by_operation_class(tiny_model_dir, hf_reference):
    """With op timing on, steps report their time per operation class; the tokens do not change."""
    folder = tiny_model_dir("llama")
    prompts = random_prompts(6, seed=11)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(folder, max_model_len=128, nano_batches=2, op_timing_every=1, tensor_parallel_size=2) as llm, \
            DebugClient(llm.config.run_dir) as debug:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        stats = debug.state()["step_stats"]
        assert debug.state()["nano_batches"] == 2
    assert got == hf_reference(folder, prompts, 8)
    timed = {k: v for k, v in stats["timed"].items() if v["steps"]}
    assert timed and sum(v["steps"] for v in timed.values()) == sum(v["steps"] for v in stats["counts"].values())
    for v in timed.values():
        assert v["gemm_ms"] > 0 and v["attention_ms"] > 0 and v["collective_ms"] > 0 and v["gpu_ms"] > 0


@pytest.mark.parametrize("arch, layout, nano", [("llama", "tp2", 1), ("qwen3", "tp2", 2), ("mistral", "tp2pp2", 1),
                                                ("qwen2", "tp2pp2", 3)])
def test_sequence_parallel_gives_transformers_tokens(arch, layout, nano, tiny_model_dir, hf_reference, hf_to_max_len):
    """Norms and residual adds on each TP rank's half of the tokens, reduce-scatter and all-gather for each
    all-reduce (odd token counts padded), shards passed between pipeline stages."""
    run_scenario(tiny_model_dir(arch), hf_reference, hf_to_max_len, nano_batches=nano, sequence_parallel=True,
                 **LAYOUTS[layout])
