"""The server driven by the official openai client, on a tiny random model with a real tokenizer."""
import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from nanoslg import LLM, SamplingParams
from server_utils import Server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["1", "2"], ids=["1api", "2api"])
def server(tiny_chat_model, request):
    """One server per API-server count: every test runs against one process and against two."""
    with Server(tiny_chat_model, "--max-model-len", "512", "--served-model-name", "tiny", "--api-server-count",
                request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def test_chat_non_streaming_usage_is_exact(client, tokenizer):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if hasattr(prompt_ids, "keys"):  # transformers 5 returns a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {"tiny"}
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": QUESTION, "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])  # usage only when asked


def test_completions_prompt_forms_and_echo(client, tokenizer):
    ids = tokenizer("Hello there").input_ids
    text = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0)
    from_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert text.choices[0].text == from_ids.choices[0].text
    assert text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="tiny", prompt=["Hello there", "Good morning"], max_tokens=6,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == text.choices[0].text
    id_batch = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert id_batch.choices[1].text == text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(tokenizer("Good morning").input_ids)
    echo = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "Hello there" + text.choices[0].text


def test_n_choices_and_seed(client):
    kw = dict(model="tiny", messages=QUESTION, max_tokens=12, temperature=1.0, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    c = client.chat.completions.create(**{**kw, "seed": 8})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_stop_strings(client):
    free = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:9]
    cut = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == free.split(stop)[0]
    streamed = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_logprobs_in_both_shapes(client):
    chat = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content) == chat.choices[0].message.content or \
        chat.choices[0].finish_reason == "stop"
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4 and t.bytes == list(t.token.encode())
    comp = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-4)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_penalties_change_greedy_output(client):
    kw = dict(model="tiny", prompt="Hello there", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    penalised = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0)
    repeated = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "repetition_penalty": 10.0}})
    assert penalised.choices[0].text != plain and repeated.choices[0].text != plain


def test_models_version_and_openapi(server):
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{server.url}/version").json()["version"]
    from openapi_spec_validator import validate

    spec = httpx.get(f"{server.url}/openapi.json").json()
    validate(spec)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "temperature", "top_p", "n", "stream", "logprobs"} <= set(props)


def test_metrics_parse(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    for name in ("nanoslg_requests", "nanoslg_num_requests_running", "nanoslg_num_requests_waiting",
                 "nanoslg_kv_cache_usage_ratio", "nanoslg_kv_pages_used", "nanoslg_time_to_first_token_seconds",
                 "nanoslg_time_per_output_token_seconds", "nanoslg_e2e_request_latency_seconds",
                 "nanoslg_prompt_tokens", "nanoslg_generation_tokens"):
        assert name in families, name
    ok = [s for s in families["nanoslg_requests"].samples if s.labels.get("status") == "ok"
          and s.name.endswith("_total")]
    assert ok and ok[0].value >= 1
    dtypes = families["nanoslg_model_dtype_info"].samples  # the tiny model is fp32, neither FP8 flag given
    assert [(s.labels, s.value) for s in dtypes] == [({"weights": "float32", "kv_cache": "float32"}, 1.0)]


def test_http_greedy_chat_equals_llm_chat(server, client, tiny_chat_model):
    over_http = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, temperature=0)
    with LLM(tiny_chat_model, max_model_len=512) as llm:
        offline = llm.chat(QUESTION, SamplingParams(max_tokens=16, temperature=0))[0]
    assert over_http.choices[0].message.content == offline.text
    assert over_http.usage.completion_tokens == len(offline.token_ids)


@pytest.mark.slow
def test_smollm2_over_http_equals_llm_chat(smollm2_dir):
    with LLM(smollm2_dir, max_model_len=1024) as llm:
        offline = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0))[0]
    with Server(smollm2_dir, "--max-model-len", "1024") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24,
                                           temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.content == offline.text
