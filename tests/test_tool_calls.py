"""Unit tests for nanoslg.server.tool_calls: whole and streamed tool-call parsing, template detection and the
message rendering for templates with and without tool support."""
import copy
import json
import random

import pytest

from nanoslg.server.tool_calls import PARSERS, ToolCall, ToolCallStream, detect_parser, parse_tool_calls
from nanoslg.server.tool_prompts import fallback_tools_prompt, messages_for_template, template_supports_tools

HERMES_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "parameters": {"tz": "CET"}}\n</tool_call>')
LLAMA_TWO = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "arguments": {}}'
MISTRAL_TWO = ('Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
               '{"name": "get_time", "arguments": {"tz": "CET"}}]')
MISTRAL_NEW = 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'

# (parser, text) pairs the streamed parse must agree with, whatever the chunking
CASES = [
    ("hermes", HERMES_TWO),
    ("hermes", "plain text with a < sign and <tool and <tool_cal but no call"),
    ("hermes", 'a <tool_call>{"name": broken}</tool_call> b <tool_call>{"name": "f", "arguments": {}}</tool_call>'),
    ("hermes", 'x <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'),
    ("hermes", 'x <tool_call>\n{"name": "f", "argu'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call> tail </tool_call'),
    ("llama3_json", LLAMA_TWO),
    ("llama3_json", '  {"name": "f", "parameters": {"q": "a;b"}}  '),
    ("llama3_json", '{"name": "John", "age": 30}'),
    ("llama3_json", '{"name": "f", "parameters": {}} and then some words'),
    ("llama3_json", "Hello there, no calls {here}."),
    ("llama3_json", '{this is not json'),
    ("llama3_json", '<|python_tag|>print("hi")'),
    ("llama3_json", '{"name": "f", "parameters": {"x": [1, 2'),
    ("mistral", MISTRAL_TWO),
    ("mistral", MISTRAL_NEW),
    ("mistral", "[TOOL_CALLS] not json at all [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}] after"),
    ("mistral", "text [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {"),
    ("mistral", "no marker here [TOOL but [ARGS] text"),
]


def names_and_args(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def stream_parse(parser, chunks, tool_names=None):
    stream = ToolCallStream(parser, tool_names)
    content, calls = [], []
    for chunk in chunks:
        text, new = stream.feed(chunk)
        content.append(text)
        calls += new
    text, new = stream.finish()
    return "".join(content) + text, calls + new


def random_chunks(text, rng):
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i:i + n])
        i += n
    return out


def test_hermes_whole():
    content, calls = parse_tool_calls("hermes", HERMES_TWO)
    assert content == "Let me check."
    assert names_and_args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert calls[0].arguments == '{"city":"Paris"}'  # compact
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_hermes_malformed_block_stays_in_content():
    text = 'a <tool_call>{"name": broken}</tool_call> b <tool_call>{"name": "f", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls("hermes", text)
    assert content == 'a <tool_call>{"name": broken}</tool_call> b'
    assert names_and_args(calls) == [("f", {})]
    only_bad = 'see <tool_call>{"name": broken}</tool_call> '
    assert parse_tool_calls("hermes", only_bad) == (only_bad, [])


def test_hermes_unterminated_block_at_the_end():
    content, calls = parse_tool_calls("hermes", 'x <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert content == "x" and names_and_args(calls) == [("f", {"a": 1})]
    cut = 'x <tool_call>\n{"name": "f", "argu'
    assert parse_tool_calls("hermes", cut) == (cut, [])


def test_string_arguments_kept_or_quoted():
    _, calls = parse_tool_calls("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert calls[0].arguments == '{"a": 1}'
    _, calls = parse_tool_calls("hermes", '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>')
    assert calls[0].arguments == '"not json"'


def test_no_markup_comes_back_unchanged():
    for parser in PARSERS:
        text = "  Just an answer.\n"
        assert parse_tool_calls(parser, text) == (text, [])
        assert parse_tool_calls(parser, "") == ("", [])


def test_llama3_json_whole():
    content, calls = parse_tool_calls("llama3_json", LLAMA_TWO)
    assert content == "" and names_and_args(calls) == [("get_weather", {"city": "Paris"}), ("f", {})]
    _, calls = parse_tool_calls("llama3_json", '  {"name": "f", "parameters": {"q": "a;b"}}  ')
    assert names_and_args(calls) == [("f", {"q": "a;b"})]
    for text in ['{"name": "John", "age": 30}', '{"name": "f", "parameters": {}} and then some words',
                 "Hello {}", '{"name": "f", "parameters": {}}; nope', '{"name": "f", "parameters": {']:
        assert parse_tool_calls("llama3_json", text) == (text, [])


def test_mistral_whole_both_forms():
    for text in (MISTRAL_TWO, MISTRAL_NEW):
        content, calls = parse_tool_calls("mistral", text)
        assert content == "Sure."
        assert names_and_args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    bad = "[TOOL_CALLS] not json at all"
    assert parse_tool_calls("mistral", bad) == (bad, [])
    content, calls = parse_tool_calls("mistral", "[TOOL_CALLS] oops [TOOL_CALLS][{\"name\": \"f\"}] after")
    assert content == "[TOOL_CALLS] oops  after" and names_and_args(calls) == [("f", {})]


def test_to_openai():
    call = ToolCall("f", '{"a":1}', id="call_x")
    assert call.to_openai() == {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}


@pytest.mark.parametrize("parser,text", CASES)
def test_stream_matches_whole_parse(parser, text):
    whole_content, whole_calls = parse_tool_calls(parser, text)
    rng = random.Random(1234)
    chunkings = [[text], list(text)] + [random_chunks(text, rng) for _ in range(20)]
    for chunks in chunkings:
        content, calls = stream_parse(parser, chunks)
        assert content.strip() == whole_content.strip(), chunks
        assert names_and_args(calls) == names_and_args(whole_calls), chunks
        if not whole_calls:
            assert content == text  # nothing is lost or reordered


def test_stream_holds_back_a_partial_marker():
    stream = ToolCallStream("hermes")
    assert stream.feed("Checking <tool") == ("Checking ", [])
    assert stream.feed('_call>{"name": "f", "arguments": {}}') == ("", [])
    text, calls = stream.feed("</tool_call> done")
    assert text == " done" and names_and_args(calls) == [("f", {})]
    assert stream.finish() == ("", [])

    stream = ToolCallStream("hermes")
    assert stream.feed("a <tool") == ("a ", [])
    assert stream.feed("box> b") == ("<toolbox> b", [])  # released once it cannot be the marker

    stream = ToolCallStream("mistral")
    assert stream.feed("Hi [TOOL_") == ("Hi ", [])
    assert stream.feed('CALLS][{"name": "f", "arguments": {"a": 1}}') == ("", [])
    text, calls = stream.feed("]")  # the call is out as soon as its JSON closes
    assert text == "" and names_and_args(calls) == [("f", {"a": 1})]


def test_stream_unterminated_hermes_block_at_finish():
    stream = ToolCallStream("hermes")
    assert stream.feed('<tool_call>\n{"name": "f", "arguments": {"a": 1}}') == ("", [])
    text, calls = stream.finish()
    assert text == "" and names_and_args(calls) == [("f", {"a": 1})]
    stream = ToolCallStream("hermes")
    stream.feed('<tool_call>{"name": "f", ')
    assert stream.finish() == ('<tool_call>{"name": "f", ', [])


def test_stream_llama3_holds_json_and_releases_plain_text():
    stream = ToolCallStream("llama3_json")
    assert stream.feed('{"name": "f", ') == ("", [])
    assert stream.feed('"parameters": {"x": 1}}') == ("", [])
    text, calls = stream.finish()
    assert text == "" and names_and_args(calls) == [("f", {"x": 1})]

    stream = ToolCallStream("llama3_json")
    assert stream.feed("  ") == ("", [])
    assert stream.feed("Hello") == ("  Hello", [])  # decided: not a call
    assert stream.feed(" world {") == (" world {", [])
    assert stream.finish() == ("", [])

    stream = ToolCallStream("llama3_json")
    assert stream.feed("<|python") == ("", [])
    assert stream.feed("_tag|>{") == ("", [])
    assert stream.feed("oops") == ("<|python_tag|>{oops", [])  # an object's first token must be a key


def test_stream_rejects_unknown_parser_and_feed_after_finish():
    with pytest.raises(ValueError):
        ToolCallStream("nope")
    stream = ToolCallStream("hermes")
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed("x")


def test_detect_parser():
    qwen = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
            "{{- '<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>' }}"
            "{%- endif %}")
    mistral = "{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}{%- endif %}"
    llama31 = ("{%- if builtin_tools is defined or tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
               "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}")
    llama_tag = "{{- '<|python_tag|>' + tool_call.name }}"
    plain = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    assert detect_parser(qwen) == "hermes"
    assert detect_parser(mistral) == "mistral"
    assert detect_parser(llama31) == "llama3_json"
    assert detect_parser(llama_tag) == "llama3_json"
    assert detect_parser(plain) == "hermes"
    assert detect_parser(None) == "hermes"


def test_template_supports_tools():
    assert template_supports_tools("{%- if tools %}{{ tools | tojson }}{% endif %}")
    assert template_supports_tools("{{ render(tools=tools) }}")
    assert not template_supports_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_supports_tools("Plain text about tools, outside any jinja block {{ x }}")
    assert not template_supports_tools("{{ message.tool_calls }}")
    assert not template_supports_tools(None)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "Time",
                                           "parameters": {"type": "object", "properties": {}}}}]

CONVERSATION = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "Sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "assistant", "content": "Sunny, noon.", "tool_calls": []},
]


def test_fallback_tools_prompt():
    prompt = fallback_tools_prompt(TOOLS)
    for tool in TOOLS:
        assert tool["function"]["name"] in prompt
        assert json.dumps(tool["function"]["parameters"]) in prompt
    assert "<tool_call>" in prompt and '"arguments"' in prompt


def test_messages_for_template_with_tool_support():
    before = copy.deepcopy(CONVERSATION)
    out = messages_for_template(CONVERSATION, supports_tools=True)
    assert CONVERSATION == before
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "tool", "assistant"]
    assert out[1]["content"] == ""
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[1]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert out[2] == CONVERSATION[2]
    assert "tool_calls" not in out[4]


def test_messages_for_template_without_tool_support():
    before = copy.deepcopy(CONVERSATION)
    out = messages_for_template(CONVERSATION, supports_tools=False)
    assert CONVERSATION == before
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant"]
    assert "tool_calls" not in out[1]
    content, calls = parse_tool_calls("hermes", out[1]["content"])
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    # consecutive tool results share one user turn: many such templates insist that roles alternate
    assert out[2] == {"role": "user",
                      "content": "<tool_response>\nSunny\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"}
    single = messages_for_template([{"role": "tool", "tool_call_id": "c", "content": "42"}], supports_tools=False)
    assert single == [{"role": "user", "content": "<tool_response>\n42\n</tool_response>"}]
    with_text = messages_for_template([{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], supports_tools=False)
    assert with_text[0]["content"] == 'Checking.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'


FRAGMENTS = {
    "hermes": ["Hello ", "<", "<tool", "\n", '<tool_call>{"name": "f", "arguments": {"a": [1, 2]}}</tool_call>',
               '<tool_call>{"name": oops}</tool_call>', "</tool_call>", '<tool_call>{"name": "g"}',
               "<tool_call>", "text with </tool_call> in it "],
    "llama3_json": ['{"name": "f", "parameters": {"a": 1}}', "; ", " ", "<|python_tag|>", "<|py", "{", "}",
                    '{"name": "g", "arguments": "{}"}', "words ", '"x"'],
    "mistral": ["Hi ", "[TOOL_CALLS]", "[TOOL", '[{"name": "f", "arguments": {"a": 1}}]', "g[ARGS]",
                '{"b": 2}', "[ARGS]", " junk ", "[", "]"],
}


@pytest.mark.parametrize("parser", PARSERS)
def test_stream_matches_whole_parse_on_random_mixes(parser):
    rng = random.Random(99)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS[parser]) for _ in range(rng.randint(1, 6)))
        whole_content, whole_calls = parse_tool_calls(parser, text)
        for chunks in (list(text), random_chunks(text, rng)):
            content, calls = stream_parse(parser, chunks)
            assert content.strip() == whole_content.strip(), chunks
            assert names_and_args(calls) == names_and_args(whole_calls), chunks
            if not whole_calls:
                assert content == text


def test_long_calls_stream_quickly():
    big = {"code": "x = 1\n" * 3000}
    texts = {"hermes": f'<tool_call>{{"name": "run", "arguments": {json.dumps(big)}}}</tool_call>',
             "llama3_json": json.dumps({"name": "run", "parameters": big}),
             "mistral": f"[TOOL_CALLS]run[ARGS]{json.dumps(big)}"}
    for parser, text in texts.items():
        content, calls = stream_parse(parser, [text[i:i + 4] for i in range(0, len(text), 4)])
        assert content == "" and names_and_args(calls) == [("run", big)]

