"""Bare JSON tool calls under tool_choice auto: whatever the model's markup, a reply that is only one JSON object
(or a list of them) naming one of the request's tools with an arguments (or parameters) object is a call, whole and
streamed; other JSON stays content, untouched."""
import json
import random

import pytest

from nanoslg.server.tool_calls import PARSERS, ToolCallStream, parse_tool_calls
from test_tool_calls import HERMES_TWO, names_and_args, random_chunks, stream_parse


NAMES = ("get_weather", "get_time")
BARE_CALLS = [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('\n  {"name": "get_time", "parameters": {"tz": "CET"}}  \n', [("get_time", {"tz": "CET"})]),
    ('[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]',
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', [("get_weather", {"city": "Oslo"})]),
]
NOT_CALLS = [
    '{"name": "John", "age": 30}',  # JSON that names no tool
    '{"name": "send_email", "arguments": {"to": "x"}}',  # a function that is not among the tools
    '{"answer": 42}',
    '{"name": "get_weather"}',  # no arguments object
    '{"name": "get_weather", "arguments": {"city": "Paris"}} and that is all',  # more than the JSON
    '{"name": {"first": "Ada"}}',  # a name that is no string
    '[{"name": ["get_weather"], "arguments": {}}]',
    '{"name": "get_weather", "arguments": "not json"}',
    '[{"name": "get_weather", "arguments": {}}, {"name": "nope", "arguments": {}}]',  # one of them is no call
    "[1, 2, 3]",
    "[]",
    '{"name": "get_weather", "arguments": {"city": "Par',  # cut short
    "Sure, here it is: {}",
]


@pytest.mark.parametrize("parser", PARSERS)
def test_bare_json_naming_a_tool_is_a_call_whatever_the_parser(parser):
    rng = random.Random(7)
    for text, expected in BARE_CALLS:
        content, calls = parse_tool_calls(parser, text, NAMES)
        assert content == "" and names_and_args(calls) == expected
        for chunks in ([text], list(text), random_chunks(text, rng), random_chunks(text, rng)):
            content, calls = stream_parse(parser, chunks, NAMES)
            assert content == "" and names_and_args(calls) == expected, chunks
        if parser != "llama3_json":  # its own format is bare JSON; the others' needs the request's tool names
            assert parse_tool_calls(parser, text) == (text, [])


@pytest.mark.parametrize("parser", PARSERS)
def test_json_that_is_no_call_of_a_given_tool_stays_content(parser):
    rng = random.Random(8)
    for text in NOT_CALLS:
        assert parse_tool_calls(parser, text, NAMES) == (text, []), text
        for chunks in (list(text), random_chunks(text, rng)):
            content, calls = stream_parse(parser, chunks, NAMES)
            assert content == text and calls == [], chunks


def test_plain_text_is_not_held_back_while_tools_are_given():
    stream = ToolCallStream("hermes", NAMES)
    assert stream.feed("  ") == ("", [])
    assert stream.feed("The weather") == ("  The weather", [])
    assert stream.feed(" is fine {") == (" is fine {", [])
    stream = ToolCallStream("hermes", NAMES)
    assert stream.feed('{"name": "get_weather", "arguments": {"city": "Paris"}}') == ("", [])  # may go on
    content, calls = stream.finish()
    assert content == "" and names_and_args(calls) == [("get_weather", {"city": "Paris"})]
    stream = ToolCallStream("hermes", NAMES)
    assert stream.feed('{"x": 1') == ("", [])
    assert stream.feed("} done") == ('{"x": 1} done', [])  # decided as soon as the JSON closes


def test_markup_still_parses_when_tools_are_given():
    content, calls = parse_tool_calls("hermes", HERMES_TWO, NAMES)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    # an untagged Llama 3.1 call must name a tool; a tagged one is the model's own markup
    assert parse_tool_calls("llama3_json", '{"name": "f", "parameters": {}}', NAMES) == \
        ('{"name": "f", "parameters": {}}', [])
    _, calls = parse_tool_calls("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}', NAMES)
    assert [c.name for c in calls] == ["f"]


def test_long_bare_json_call_streams_quickly():
    big = {"city": "x" * 30000}
    text = json.dumps({"name": "get_weather", "arguments": big})
    content, calls = stream_parse("hermes", [text[i:i + 4] for i in range(0, len(text), 4)], NAMES)
    assert content == "" and names_and_args(calls) == [("get_weather", big)]


def test_tool_call_output_streams_a_bare_call_as_tool_call_deltas():
    from nanoslg.server.structured import OutputPlan, ToolCallOutput

    out = ToolCallOutput(OutputPlan(tools="auto", parser="hermes", tool_names=NAMES))
    text = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    pieces = [out.feed(text[i:i + 5]) for i in range(0, len(text), 5)]
    assert all(p == ("", []) for p in pieces)
    content, deltas, finish = out.finish("stop")
    assert content == "" and finish == "tool_calls"
    assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == \
        [(0, "get_time", {"tz": "UTC"})]
    whole = ToolCallOutput(OutputPlan(tools="auto", parser="hermes", tool_names=NAMES)).whole(text, "stop")
    assert whole[0] is None and whole[1][0]["function"]["name"] == "get_time" and whole[2] == "tool_calls"
