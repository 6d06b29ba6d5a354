"""Constrained decoding in the engine (offline API, tiny model with SmolLM2's tokenizer): outputs match their
grammar under every sampling option, masking never changes a token the grammar allows (the unconstrained greedy
output, made into a grammar, comes back token for token), constrained and free requests share batches in every
parallel layout, a complete output stops, and a grammar that cannot be built fails its own request only."""
import json

import jsonschema
import pytest

from nanoslg import LLM, SamplingParams
from nanoslg import structured_outputs as so

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "tag": {"enum": ["red", "green", "blue"]}}, "required": ["ok", "n", "tag"]}
PROMPTS = ["Hello", "The capital of France", "Write JSON", "1 2 3"]


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    with LLM(tiny_chat_model, max_model_len=512) as engine:
        yield engine


def _json(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


SAMPLING = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=1.0, seed=1),
    "top_p_top_k_min_p": dict(temperature=0.9, top_p=0.9, top_k=50, min_p=0.05, seed=2),
    "penalties": dict(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3,
                      seed=3),
    "logprobs": dict(temperature=0, logprobs=3),
    "unseeded": dict(temperature=1.2),
}


@pytest.mark.parametrize("options", SAMPLING.values(), ids=SAMPLING.keys())
def test_json_schema_outputs_validate_under_every_sampling_option(llm, options):
    params = SamplingParams(max_tokens=60, structured_outputs={"json": SCHEMA}, **options)
    for out in llm.generate(PROMPTS, params):
        assert out.finish_reason == "stop", out
        _json(out.text)
        if options.get("logprobs"):
            assert len(out.logprobs) == len(out.token_ids)


def _whole_characters(outputs: list) -> list:
    # a text cut inside a character's UTF-8 bytes decodes to U+FFFD, which is not what the model wrote
    return [o for o in outputs if "\ufffd" not in o.text]


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.0, seed=5)], ids=["greedy", "seeded"])
def test_masking_never_changes_an_allowed_token(llm, options):
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    free = _whole_characters(llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, **options)))
    assert len(free) >= 6
    # each unconstrained text made the only output its grammar allows: the same tokens come back (a seeded draw
    # too: masking only rescales the allowed tokens' odds), then the grammar is complete and the request stops
    # where the free one ran on to its length
    constrained = llm.generate([f.prompt for f in free], [
        SamplingParams(max_tokens=40, structured_outputs={"choice": [f.text]}, **options) for f in free])
    for f, c in zip(free, constrained):
        assert c.token_ids[:len(f.token_ids)] == f.token_ids, (f.text, c.text)
        assert c.text == f.text and c.finish_reason == "stop"


def test_regex_choice_grammar_and_json_object(llm):
    outs = llm.generate(["a", "b", "c", "d"], [
        SamplingParams(max_tokens=30, temperature=0, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"}),
        SamplingParams(max_tokens=30, temperature=1.0, seed=0, structured_outputs={"choice": ["yes", "no"]}),
        SamplingParams(max_tokens=30, temperature=0, structured_outputs={"grammar": 'root ::= "x" [0-9] "y"'}),
        SamplingParams(max_tokens=200, temperature=0, structured_outputs={"json_object": True}),
    ])
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("yes", "no")
    assert re.fullmatch(r"x[0-9]y", outs[2].text)
    assert isinstance(json.loads(outs[3].text), dict) and outs[3].finish_reason == "stop"


def test_complete_output_stops_even_with_ignore_eos_and_n_choices(llm):
    params = SamplingParams(max_tokens=50, temperature=0.8, seed=9, ignore_eos=True,
                            structured_outputs={"choice": ["alpha", "beta"]})
    outs = llm.generate(["x"] * 4, params)
    assert all(o.text in ("alpha", "beta") and o.finish_reason == "stop" for o in outs)


def test_constrained_and_free_requests_batch_together(llm):
    params = []
    for i in range(12):
        so_spec = {"json": SCHEMA} if i % 2 == 0 else None
        params.append(SamplingParams(max_tokens=40, temperature=0 if i % 3 else 0.8, seed=i, ignore_eos=not so_spec,
                                     structured_outputs=so_spec))
    prompts = [PROMPTS[i % 4] for i in range(12)]
    outs = llm.generate(prompts, params)
    alone = [llm.generate([p], [sp])[0] for p, sp in zip(prompts[:4], params[:4])]
    for i, o in enumerate(outs):
        if i % 2 == 0:
            _json(o.text)
        else:
            assert len(o.token_ids) == 40
    # batching changes nothing: the same outputs as each request alone
    assert [o.token_ids for o in outs[:4]] == [o.token_ids for o in alone]


def test_a_grammar_that_cannot_be_built_fails_its_own_request_only(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=5, structured_outputs={"regex": "(unclosed"}),
                                     SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)])
    assert outs[0].finish_reason == "rejected" and "invalid regex" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5


def test_a_grammar_the_vocabulary_cannot_follow_is_refused_not_broken(llm):
    # SmolLM2's tokenizer has no token for the control byte 0x16: after "x" nothing can continue the output
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=10, structured_outputs={"choice": ["x\u0016y"]}),
                                     SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)])
    assert outs[0].finish_reason == "rejected" and "can continue the output" in outs[0].error
    assert outs[0].text in ("", "x")  # never a token outside the grammar
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5


def test_spec_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs={"json": SCHEMA, "regex": "a"})
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(structured_outputs={"jsn": SCHEMA})
    with pytest.raises(so.GrammarError, match="invalid JSON schema"):
        so.check({"json": '{"type": "nope"}'})


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_parallel_layouts_constrain_like_one_process(tiny_chat_model, llm, layout):
    params = [SamplingParams(max_tokens=40, temperature=0, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.9, seed=4, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=30, temperature=0, structured_outputs={"choice": ["up", "down"]})]
    expected = llm.generate(PROMPTS, params)
    with LLM(tiny_chat_model, max_model_len=512, **layout) as parallel:
        got = parallel.generate(PROMPTS, params)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason
    _json(got[0].text), _json(got[2].text)


def test_grammar_gate_holds_requests_until_their_grammar_is_compiled():
    from array import array

    from nanoslg.protocol import GrammarCompiled, TokenizedRequest
    from scheduler_proc.grammar_gate import GrammarGate

    announced = []
    gate = GrammarGate(announced.append)
    spec = so.normalize({"json": SCHEMA})
    req = lambda rid, s: TokenizedRequest(rid, array("i", [1, 2]), SamplingParams(structured_outputs=s), [])  # noqa: E731
    assert gate.offer(req("free", None))
    assert not gate.offer(req("a", spec)) and not gate.offer(req("b", spec)) and not gate.offer(req("c", spec))
    assert len(announced) == 1 and announced[0].spec == spec  # one compile per grammar, however many requests
    assert gate.abort("b") and gate.num_waiting == 2
    held, error = gate.on_compiled(GrammarCompiled(announced[0].key))
    assert [r.rid for r in held] == ["a", "c"] and error is None
    assert gate.offer(req("d", spec)) and len(announced) == 1  # known compiled: straight through
    bad = so.normalize({"regex": "("})
    assert not gate.offer(req("e", bad))
    held, error = gate.on_compiled(GrammarCompiled(announced[1].key, "invalid regex"))
    assert [r.rid for r in held] == ["e"] and error == "invalid regex"
    assert not gate.offer(req("f", bad)) and len(announced) == 3  # a failed grammar is not remembered as built


def test_the_bitmask_fill_takes_the_cores_the_node_leaves():
    from gpu_workers.grammar import grammar_threads

    # a GPU node of 16 cores: one worker, the scheduler, the tokenizer and an API server leave 12
    assert grammar_threads("cuda", 16, 1, 4, 3) == 12
    assert grammar_threads("cuda", 16, 1, 4, 5) == 10  # three API-server processes
    assert grammar_threads("cuda", 16, 2, 4, 3) == 5  # two ranks on the node share what is left
    assert grammar_threads("cuda", 16, 8, 4, 0) == 1  # a node of eight workers and nothing else
    assert grammar_threads("cuda", 128, 1, 4, 3) == 32  # capped
    assert grammar_threads("cuda", 4, 1, 4, 3) == 1 and grammar_threads("cuda", 2, 2, 1, 3) == 1
    # on a CPU the forward pass is over when the fill runs: the rank's own threads
    assert grammar_threads("cpu", 16, 1, 14, 3) == 14 and grammar_threads("cpu", 2, 1, 2, 3) == 2
    assert grammar_threads("cuda", 16, 1, 4, 3, override="6") == 6
    assert grammar_threads("cuda", 16, 1, 4, 3, override="lots") == 12  # ignored, with a warning


def test_a_paused_step_span_leaves_the_host_wait_out():
    import time

    import torch

    from gpu_workers.step_profiler import StepSpan

    span = StepSpan(torch.device("cpu"))
    time.sleep(0.02)
    span.pause()  # the forward pass is queued; the host fills the grammar's bitmask meanwhile
    time.sleep(0.2)
    span.resume()
    time.sleep(0.02)
    span.end()
    assert 35 <= span.ms() < 150
