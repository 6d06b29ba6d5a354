"""OpenAI's response_format, tools and tool_choice: from a request body to the structured output the engine
enforces, and from the generated text back to OpenAI's message content and tool calls.

- response_format json_object / json_schema, and vLLM's structured_outputs, constrain the text.
- tool_choice "required" constrains the output to a JSON array of calls ({"name", "parameters"}) of the given
  tools, and a named function to that function's arguments object: any chat template works, and the call is
  parsed from JSON the grammar made well-formed.
- tool_choice "auto" (the default with tools) constrains nothing: the model's own tool-call markup, chosen from
  its chat template (tool_calls.py), is parsed out of the text, and so is a reply that is only bare JSON calling
  one of the tools.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from nanoslg import structured_outputs as so
from nanoslg.server.schemas import ChatCompletionRequest, NamedToolChoice
from nanoslg.server.tool_calls import ToolCall, ToolCallStream, parse_tool_calls


class StructuredOutputError(ValueError):
    """A 400 naming the field at fault."""

    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True, slots=True)
class OutputPlan:
    spec: Optional[dict[str, Any]] = None  # the engine's structured_outputs
    tools: str = "none"  # none | auto | named | required: how the text becomes tool calls
    function: Optional[str] = None  # the named function
    parser: Optional[str] = None  # auto: the model's tool-call format
    tool_names: tuple[str, ...] = ()  # auto: the tools a bare JSON call may name
    checks: tuple[tuple[str, dict[str, Any]], ...] = field(default=())  # (param, spec) the grammar builder must accept


def _arguments_schema(parameters: Optional[dict[str, Any]]) -> dict[str, Any]:
    return parameters if parameters else {"type": "object"}


def plan_output(body, parser: str) -> OutputPlan:
    """What body asks of its output; raises StructuredOutputError for what cannot be built."""
    rf = body.response_format
    spec: Optional[dict[str, Any]] = None
    param = ""  # the field spec comes from, set with it
    if rf is not None and rf.type == "json_object":
        spec, param = {"json_object": True}, "response_format"
    elif rf is not None and rf.type == "json_schema":
        spec, param = {"json": json.dumps(rf.json_schema.schema_)}, "response_format.json_schema.schema"
    if body.structured_outputs is not None:
        if spec is not None:
            raise StructuredOutputError("give response_format or structured_outputs, not both", "structured_outputs",
                                        "conflicting_parameters")
        param = "structured_outputs"
        try:
            spec = so.normalize(body.structured_outputs.spec())
        except ValueError as e:
            raise StructuredOutputError(str(e), param, "invalid_grammar") from None
    checks: list[tuple[str, dict[str, Any]]] = [(param, spec)] if spec is not None else []
    if not isinstance(body, ChatCompletionRequest):
        return OutputPlan(spec, checks=tuple(checks))
    if body.tool_choice is not None and not body.tools:
        raise StructuredOutputError("tool_choice needs tools", "tool_choice", "missing_tools")
    if not body.tools:
        return OutputPlan(spec, checks=tuple(checks))
    tools = body.tools
    for i, t in enumerate(tools):
        if t.function.parameters:
            checks.append((f"tools.{i}.function.parameters", {"json": json.dumps(t.function.parameters)}))
    choice = body.tool_choice or "auto"
    if choice == "none":
        return OutputPlan(spec, checks=tuple(checks))
    if choice == "auto":
        return OutputPlan(spec, "auto", parser=parser, tool_names=tuple(t.function.name for t in tools),
                          checks=tuple(checks))
    if isinstance(choice, NamedToolChoice):
        fn = next((t.function for t in tools if t.function.name == choice.function.name), None)
        if fn is None:
            raise StructuredOutputError(f"tool_choice names the function {choice.function.name!r}, which is not "
                                        f"among the tools", "tool_choice", "unknown_tool")
        return OutputPlan({"json": json.dumps(_arguments_schema(fn.parameters))}, "named", fn.name,
                          checks=tuple(checks))
    calls: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": []}, "$defs": {}}
    for i, t in enumerate(tools):
        # each tool's arguments schema moves under $defs, its own $defs beside it and its $refs renamed to
        # match: a schema's "#/$defs/..." refers to its root, which is no longer the root once nested
        defs = _lift_definitions(_arguments_schema(t.function.parameters), f"tool{i}", calls["$defs"])
        calls["items"]["anyOf"].append({"type": "object", "properties": {
            "name": {"const": t.function.name}, "parameters": defs}, "required": ["name", "parameters"]})
    if not body.parallel_tool_calls:
        calls["maxItems"] = 1
    spec = {"json": json.dumps(calls)}
    return OutputPlan(spec, "required", checks=tuple(checks) + (("tools", spec),))


def _lift_definitions(schema: dict[str, Any], name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Puts schema (with its own $defs / definitions, renamed name_*) into defs; returns a $ref to it."""
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    renames = {f"#/{kind}/{key}": f"#/$defs/{name}_{key}" for kind in ("$defs", "definitions") for key in own}
    renames["#"] = f"#/$defs/{name}"

    def rewrite(node):
        if isinstance(node, dict):
            return {k: (renames.get(v, v) if k == "$ref" and isinstance(v, str) else rewrite(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    defs[name] = rewrite({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})
    for key, sub in own.items():
        defs[f"{name}_{key}"] = rewrite(sub)
    return {"$ref": f"#/$defs/{name}"}


class GrammarChecker:
    """Builds each distinct grammar once, off the event loop, so a 400 names a bad schema before the engine sees
    it; grammars that built are remembered (a bounded set), so a repeated schema costs nothing. Its own two threads:
    a burst of costly schemas waits there, not in the loop's default executor (engine start and stop use that)."""

    TIMEOUT_S = 30.0

    def __init__(self, limit: int = 1024):
        self.ok: OrderedDict[str, None] = OrderedDict()
        self.limit = limit
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-check")

    async def check(self, plan: OutputPlan) -> None:
        loop = asyncio.get_running_loop()
        for param, spec in plan.checks:
            key = so.cache_key(spec)
            if key in self.ok:
                continue
            code = "invalid_json_schema" if "json" in spec else "invalid_grammar"
            try:
                await asyncio.wait_for(loop.run_in_executor(self.pool, so.check, spec), self.TIMEOUT_S)
            except so.GrammarError as e:
                raise StructuredOutputError(f"{param}: {e}", param, code) from None
            except asyncio.TimeoutError:
                raise StructuredOutputError(f"{param}: the grammar took over {self.TIMEOUT_S:.0f} s to build",
                                            param, code) from None
            self.ok[key] = None
            while len(self.ok) > self.limit:
                self.ok.popitem(last=False)


def chat_templates(path: str) -> list[str]:
    """Every chat template a model folder holds (tokenizer_config.json's, named ones included, and
    chat_template.jinja): which tool-call format the model writes is read from them."""
    out: list[str] = []
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            t = json.load(f).get("chat_template")
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, list):
            out += [x.get("template", "") for x in t if isinstance(x, dict)]
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(path, "chat_template.jinja")) as f:
            out.append(f.read())
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------- responses
class ToolCallOutput:
    """One choice's text turned into OpenAI's content and tool calls, whole or as streamed deltas. A constrained
    reply is a call by construction; one cut short by max_tokens keeps what it completed (the calls of a required
    array, a named function's arguments so far) with finish_reason "length"."""

    def __init__(self, plan: OutputPlan):
        self.plan = plan
        self.stream = ToolCallStream(self._parser(), plan.tool_names) if plan.tools == "auto" else None
        self.text = ""  # required: the array so far
        self.pos = 0  # required: where the next call of the array starts
        self.num_calls = 0

    def _parser(self) -> str:
        assert self.plan.parser is not None  # plan_output gives every auto plan its parser
        return self.plan.parser

    def _function(self) -> str:
        assert self.plan.function is not None  # plan_output gives every named plan its function
        return self.plan.function

    def whole(self, text: str, finish: Optional[str]) -> tuple[Optional[str], list[dict[str, Any]], Optional[str]]:
        """(content or None, tool calls, finish_reason) of a whole reply."""
        mode = self.plan.tools
        content: Optional[str]
        calls: list[ToolCall]
        if mode == "auto":
            content, calls = parse_tool_calls(self._parser(), text, self.plan.tool_names)
            content = content or None
        elif mode == "named":
            content, calls = None, [ToolCall(self._function(), text)]
        else:
            calls = self._array_calls(text)
            content = None if calls else text
        return content, [c.to_openai() for c in calls], self._finish_reason(finish, bool(calls))

    def _array_calls(self, text: str) -> list[ToolCall]:
        """The complete calls of a required reply's JSON array, from self.pos on (advancing it)."""
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        while True:
            i = self.pos
            while i < len(text) and text[i] in "[, \n\t":
                i += 1
            try:
                item, end = decoder.raw_decode(text, i)
            except ValueError:
                return calls
            if not isinstance(item, dict) or "name" not in item:
                return calls
            calls.append(ToolCall(item["name"], json.dumps(item.get("parameters", {}))))
            self.pos = end

    @staticmethod
    def _finish_reason(finish: Optional[str], called: bool) -> Optional[str]:
        return "tool_calls" if called and finish == "stop" else finish

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool-call deltas) for a streamed piece of text."""
        mode = self.plan.tools
        if mode == "auto":
            assert self.stream is not None  # made for every auto plan
            content, calls = self.stream.feed(text)
            return content, self._deltas(calls)
        if not text:
            return "", []
        if mode == "named":  # the text is the arguments: they stream as they come
            if self.num_calls == 0:
                self.num_calls = 1
                call = ToolCall(self._function(), "")
                return "", [{"index": 0, "id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": text}}]
            return "", [{"index": 0, "function": {"arguments": text}}]
        self.text += text  # required: each call of the array goes out once its object is complete
        if "}" not in text:  # no object can have closed: decoding again would only repeat work
            return "", []
        return "", self._deltas(self._array_calls(self.text))

    def finish(self, finish: Optional[str]) -> tuple[str, list[dict[str, Any]], Optional[str]]:
        """(content, tool-call deltas, finish_reason) when the choice ends."""
        content = ""
        deltas: list[dict[str, Any]] = []
        if self.plan.tools == "auto":
            assert self.stream is not None  # made for every auto plan
            content, calls = self.stream.finish()
            deltas = self._deltas(calls)
        elif self.plan.tools == "required" and self.num_calls == 0:
            content = self.text  # not even one complete call
        return content, deltas, self._finish_reason(finish, self.num_calls > 0)

    def _deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in calls:
            out.append({"index": self.num_calls, "id": c.id, "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}})
            self.num_calls += 1
        return out
