"""Sampling behaviour through the whole engine on a tiny random model."""
import math

import pytest

from conftest import random_prompts
from nanoslg import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(tiny_model_dir("qwen2"), max_model_len=256) as engine:
        yield engine


def _tokens(outs):
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    prompts = random_prompts(6, seed=10)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = _tokens(llm.generate([prompts[0]], seeded))[0]
    again = _tokens(llm.generate([prompts[0]], seeded))[0]
    # the same request among others, which sample without a seed
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    in_batch = _tokens(llm.generate(prompts, [seeded] + [others] * 5))[0]
    assert alone == again == in_batch
    different = _tokens(llm.generate([prompts[0]], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95,
                                                                   seed=4321, ignore_eos=True)))[0]
    assert different != alone


def test_temperature_changes_output_and_top_k_1_is_greedy(llm):
    prompt = random_prompts(1, seed=11)[0]
    greedy = _tokens(llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))[0]
    top1 = _tokens(llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.5, top_k=1,
                                                          ignore_eos=True)))[0]
    assert top1 == greedy
    hot = _tokens(llm.generate([prompt] * 4, SamplingParams(max_tokens=16, temperature=5.0, ignore_eos=True)))
    assert any(h != greedy for h in hot)
    assert len({tuple(h) for h in hot}) > 1  # unseeded requests draw independently


def test_top_p_and_min_p_restrict_choices_to_the_likely_token(llm):
    prompt = random_prompts(1, seed=12)[0]
    greedy = _tokens(llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))[0]
    # A tiny nucleus, or min_p=1, leaves only the most likely token: sampling collapses to greedy.
    for params in (SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=1.0, min_p=1.0, ignore_eos=True)):
        assert _tokens(llm.generate([prompt] * 3, params)) == [greedy] * 3


def test_logprobs_of_greedy_tokens(llm):
    prompt = random_prompts(1, seed=13)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3
        assert top[0][0] == tok and math.isclose(top[0][1], lp, abs_tol=1e-5)  # greedy picks the top-1
        assert lp <= 0 and top[0][1] >= top[1][1] >= top[2][1]
    assert llm.generate([prompt], SamplingParams(max_tokens=2))[0].logprobs is None


def test_max_tokens_stop_token_ids_and_eos(llm):
    prompt = random_prompts(1, seed=14)[0]
    free = _tokens(llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)))[0]
    assert len(free) == 20
    stop_at = free[5]
    first = free.index(stop_at)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at],
                                                ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:first + 1]
    # EOS comes from the model's config (eos_token_id=2 in the tiny models), never a hard-coded id.
    if 2 in free:
        out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == 2


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
])
def test_bad_sampling_values_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_greedy_rows_take_the_argmax_of_model_dtype_logits_unconverted():
    """The engine hands the sampler bf16 logits: an all-greedy step takes their argmax as they are (the float32
    copy cannot change it, ties included), any other row gets them converted first."""
    import torch

    from gpu_workers.sampler import RowParams, Sampler

    logits = torch.randn(4, 50).to(torch.bfloat16)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie: the first index wins either way
    sampler = Sampler(torch.device("cpu"), 0)
    greedy = [RowParams(SamplingParams(temperature=0))] * 4
    got = sampler(logits, greedy, [0] * 4)
    assert got.tokens.tolist() == logits.float().argmax(-1).tolist() and got.tokens[1] == 7
    with_logprobs = greedy[:3] + [RowParams(SamplingParams(temperature=0, logprobs=2))]
    got = sampler(logits, with_logprobs, [0] * 4)
    assert got.tokens.tolist() == logits.float().argmax(-1).tolist() and got.top_vals.dtype == torch.float32
    sampled = sampler(logits, greedy[:3] + [RowParams(SamplingParams(temperature=1.0))], [0] * 4)
    assert sampled.tokens[:3].tolist() == logits[:3].float().argmax(-1).tolist()
