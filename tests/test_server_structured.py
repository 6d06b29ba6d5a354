"""Structured outputs and tool calls through the OpenAI API, driven by the official openai client against a real
server on tiny random models: json_schema (strict, greedy and sampled, streamed and not), `parse` with a pydantic
model, json_object, named / required / auto tool choice (streamed deltas included), a tool-result round trip, and
the 400s of bad input after which the server goes on serving."""
import json
import os
import shutil

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from server_utils import Server

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "color": {"enum": ["red", "green"]}}, "required": ["ok", "n", "color"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TOOLS[1]["function"]["parameters"]}


class Forecast(BaseModel):
    city: str
    sunny: bool
    days: int


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "1024", "--served-model-name", "tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _stream_text(chunks) -> tuple:
    text, finish = "", None
    for c in chunks:
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_json_schema_strict_replies_validate(client, stream, sampling):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for i in range(3):
        messages = [{"role": "user", "content": f"Give me JSON number {i}"}]
        if stream:
            text, finish = _stream_text(client.chat.completions.create(
                model="tiny", messages=messages, response_format=fmt, max_tokens=80, stream=True, **sampling))
        else:
            r = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt, max_tokens=80,
                                               **sampling)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="tiny", messages=USER, response_format=Forecast, max_tokens=200,
                                      temperature=0)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and r.choices[0].finish_reason == "stop"
    assert Forecast.model_validate_json(r.choices[0].message.content) == parsed


def test_json_object_and_completions_response_format(client, server):
    # a single JSON value of the object kind; the tiny model's strings can run on, so it gets room to close them
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=80, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "messages": USER, "max_tokens": 400, "temperature": 0, "seed": 1, "response_format": {"type": "json_object"},
        "stop": None})
    body = r.json()
    text = body["choices"][0]["message"]["content"]
    if body["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens inside a string: still an object's beginning
        assert text.startswith("{")


def test_vllm_structured_outputs_extension(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = client.completions.create(model="tiny", prompt="code:", max_tokens=20, temperature=0.7, seed=2,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    import re
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text)


def _check_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id and (names is None or c.function.name in names)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_named_tool_choice_whole_and_streamed(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=60,
                                       temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    _check_calls(msg.tool_calls, {"get_weather"})
    with client.chat.completions.stream(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=60,
                                        temperature=0) as stream:
        deltas = [e for e in stream if e.type == "chunk"]
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed] == \
        [(c.function.name, c.function.arguments) for c in msg.tool_calls]
    first = next(d.chunk.choices[0].delta.tool_calls[0] for d in deltas
                 if d.chunk.choices and d.chunk.choices[0].delta.tool_calls)
    assert first.index == 0 and first.id and first.function.name == "get_weather"


def test_required_tool_choice_whole_and_streamed(client):
    kw = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
    r = client.chat.completions.create(parallel_tool_calls=False, **kw)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    _check_calls(r.choices[0].message.tool_calls)
    chunks = list(client.chat.completions.create(stream=True, parallel_tool_calls=False, **kw))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # parallel calls: every complete call comes back, even from a reply max_tokens cut short
    r = client.chat.completions.create(**kw)
    _check_calls(r.choices[0].message.tool_calls)
    assert r.choices[0].finish_reason in ("tool_calls", "length")


def test_required_tool_with_definitions_of_its_own(client):
    # the openai client's pydantic_function_tool writes nested models as $defs / $ref
    unit = {"type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"],
            "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"]}}}
    tools = TOOLS + [{"type": "function", "function": {"name": "set_unit", "parameters": unit}}]
    r = client.chat.completions.create(model="tiny", messages=USER, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=60, temperature=0.7, seed=11)
    call = r.choices[0].message.tool_calls[0]
    if call.function.name == "set_unit":
        assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")
    else:
        _check_calls([call])


def test_tool_result_round_trip(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=60,
                                       temperature=0)
    call = r.choices[0].message.tool_calls[0]
    history = USER + [r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert again.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt
    # a template without tool support sees the tools in a system prompt: the prompt grows by their description
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50


BAD = {
    "invalid_json_schema": dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}),
    "unknown_tool": dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
    "missing_tools": dict(tool_choice="required"),
    "invalid_grammar": dict(extra_body={"structured_outputs": {"regex": "(unclosed"}}),
    "bad_tool_schema": dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": 5}}}}}]),
    "conflicting_parameters": dict(response_format={"type": "json_object"},
                                   extra_body={"structured_outputs": {"choice": ["a"]}}),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_400_naming_it_and_the_server_goes_on(client, case):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, **case)
    error = e.value.body
    assert error["type"] == "invalid_request_error" and error["param"] and error["message"]
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": SCHEMA}})
    assert r.choices[0].message.content.startswith("{")


HERMES_TEMPLATE = """{%- if messages[0].content == "boom" %}{{ raise_exception("no boom here") }}{% endif %}
{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def hermes_server(tiny_chat_model, tmp_path_factory):
    """The tiny model with a Qwen/Hermes-style chat template that renders tools."""
    folder = str(tmp_path_factory.mktemp("hermes") / "model")
    shutil.copytree(tiny_chat_model, folder)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(HERMES_TEMPLATE)
    with Server(folder, "--max-model-len", "1024", "--served-model-name", "tiny") as srv:
        yield srv


CALL_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
             '</tool_call>')


def _forced_auto_reply(client, text: str, stream: bool) -> tuple:
    """(content, finish_reason, tool calls) of a tool_choice auto reply that a grammar forces to be `text`."""
    kw = dict(model="tiny", messages=USER, tools=TOOLS, max_tokens=80, temperature=0,
              extra_body={"structured_outputs": {"choice": [text]}})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        content, finish = _stream_text(chunks)
        return content, finish, [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    r = client.chat.completions.create(**kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.choices[0].message.tool_calls or []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_choice_parses_the_models_own_markup(hermes_server, stream):
    client = openai.OpenAI(base_url=f"{hermes_server.url}/v1", api_key="unused", max_retries=0)
    # the random model is made to write a Hermes tool call (a grammar allowing only that text); auto parses it
    content, finish, calls = _forced_auto_reply(client, CALL_TEXT, stream)
    assert finish == "tool_calls" and "<tool_call>" not in (content or "")
    assert content.strip() == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris", "days": 3})]
    # no markup: a plain reply, untouched
    plain = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=6, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    # the template renders the tools itself (no fallback prompt): they are in the prompt
    bare = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    assert plain.usage.prompt_tokens > bare.usage.prompt_tokens + 50


BARE_CALL = '{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}'
NOT_A_CALL = '{"name": "get_forecast", "arguments": {"city": "Rome"}}'  # no such tool: an answer in JSON


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_choice_takes_bare_json_naming_a_tool_as_a_call(hermes_server, stream):
    """Small models often answer a call as bare JSON without their template's markup (Qwen2.5-0.5B does)."""
    client = openai.OpenAI(base_url=f"{hermes_server.url}/v1", api_key="unused", max_retries=0)
    for text, expected in ((BARE_CALL, [("get_weather", {"city": "Rome", "days": 2})]), (NOT_A_CALL, [])):
        content, finish, calls = _forced_auto_reply(client, text, stream)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected
        if expected:
            assert finish == "tool_calls" and not content and calls[0].id.startswith("call_")
        else:
            assert finish == "stop" and content == text


def test_a_conversation_the_template_refuses_is_a_400(hermes_server):
    client = openai.OpenAI(base_url=f"{hermes_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no boom here"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "boom"}], max_tokens=2)
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices[0].message.content
