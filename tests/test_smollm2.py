"""The real default model, pulled from PyPI and converted from GGUF (cached across runs)."""
import pytest
import torch

from nanoslg import LLM, SamplingParams

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    # float32 so the comparison with transformers is exact rather than within bf16 rounding
    with LLM(smollm2_dir, dtype="float32", max_model_len=2048) as engine:
        yield engine


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert out.error is None and "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by the chat template's EOS, <|im_end|>, from generation_config


def test_greedy_tokens_equal_transformers(llm, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref
        assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_stop_strings_end_the_text(llm):
    free = llm.generate(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = free.text[free.text.index(" was") + 4:][:9]  # spans several tokens
    cut = llm.generate(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0, stop=[stop, "zzz"]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text.split(stop)[0]
    assert len(cut.token_ids) < len(free.token_ids)  # generation stopped, not just the text
    kept = llm.generate(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0, stop=[stop],
                                                   include_stop_str_in_output=True))[0]
    assert kept.text == cut.text + stop
