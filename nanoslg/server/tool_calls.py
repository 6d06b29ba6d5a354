"""Tool calls (OpenAI `tool_choice: "auto"`): parse a model's own tool-call markup out of its generated text, whole
or while it streams (tool_prompts.py renders tool conversations for chat templates).

Three output formats cover the common open models: Hermes `<tool_call>{json}</tool_call>` blocks (Qwen2.5/Qwen3,
Hermes, and what our fallback prompt asks any other model for), Llama 3.1's bare JSON object(s), and Mistral's
`[TOOL_CALLS]` marker. Whatever the format, small models often answer a call as bare JSON without their markup:
given the request's tool names, a reply that is only one JSON object (or a list of them) naming one of those tools
with an arguments (or parameters) object is a call too; other JSON stays content. Whole-text parsing is the
streaming parser fed everything at once, so the two cannot drift apart: a stream gives the same content and calls
however the text is cut into chunks."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Collection, Optional

PARSERS = ("hermes", "llama3_json", "mistral")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL = "[TOOL_CALLS]"
_ARGS = "[ARGS]"
_PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")
_MISTRAL_NAME = re.compile(r"[^\s\[\]{}\"]+")
_BAD = object()  # a call block that is not well-formed: it stays in the content
# Past this many buffered characters a held-back call is re-decoded only when the new text could close its JSON:
# decoding the whole buffer on every token would be quadratic in the call's length.
_RESCAN_ALWAYS = 256


def detect_parser(chat_template: str | None) -> str:
    """Parser for a chat template's tool format: '<tool_call>' in it -> 'hermes' (Qwen2.5/Qwen3/Hermes);
    '[TOOL_CALLS]' -> 'mistral'; '<|python_tag|>' or Llama-3.1 style ('ipython' role / '"parameters"' JSON with
    tools) -> 'llama3_json'; anything else (including None) -> 'hermes' (the format our fallback prompt asks for)."""
    t = chat_template or ""
    if HERMES_OPEN in t:
        return "hermes"
    if _MISTRAL in t:
        return "mistral"
    if _PYTHON_TAG in t or "ipython" in t or ('"parameters"' in t and "tools" in t):
        return "llama3_json"
    return "hermes"


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _arguments_text(value) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):  # some models emit the arguments already as JSON text
        try:
            json.loads(value)
            return value
        except ValueError:
            return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _call_from_obj(obj, need_args: bool = False) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters" if "parameters" in obj else None
    if key is None and need_args:
        return None
    return ToolCall(obj["name"], _arguments_text(obj[key] if key else {}))


def _call_from_json(text: str) -> ToolCall | None:
    try:
        return _call_from_obj(json.loads(text))
    except ValueError:
        return None


def _skip_ws(s: str, pos: int) -> int:
    m = _WS.match(s, pos)
    assert m is not None  # \s* matches anywhere, if only the empty string
    return m.end()


def _decode(s: str, pos: int):
    """(value, end) of the JSON value at s[pos:], or (None, pos) when it is incomplete or malformed."""
    try:
        return _DECODER.raw_decode(s, pos)
    except ValueError:
        return None, pos


def _partial_marker(buf: str, marker: str) -> int:
    """Length of the longest end of buf that is a proper prefix of marker (text that must wait for more)."""
    for k in range(min(len(buf), len(marker) - 1), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


def _mistral_segment(seg: str, final: bool):
    """The text after a [TOOL_CALLS] marker (up to the next one): (calls, end of the call JSON), None while it may
    still become a call, or _BAD. Arrays and objects end at their closing bracket, so a call decoded from a prefix
    of the segment is the call the whole segment gives."""
    i = _skip_ws(seg, 0)
    if i == len(seg):
        return _BAD if final else None
    if seg[i] in "[{":  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
        value, end = _decode(seg, i)
        if value is None:
            return _BAD if final else None
        calls = [_call_from_obj(x) for x in (value if isinstance(value, list) else [value])]
        return (calls, end) if calls and all(c is not None for c in calls) else _BAD
    m = _MISTRAL_NAME.match(seg, i)  # [TOOL_CALLS]name[ARGS]{...}
    if not m:
        return _BAD
    rest = seg[m.end():m.end() + len(_ARGS)]
    if rest != _ARGS:
        return None if not final and _ARGS.startswith(rest) else _BAD
    j = _skip_ws(seg, m.end() + len(_ARGS))
    if j == len(seg):
        return _BAD if final else None
    if seg[j] != "{":
        return _BAD
    value, end = _decode(seg, j)
    if value is None:
        return _BAD if final else None
    return [ToolCall(m.group(), _arguments_text(value))], end


def _could_be_object(s: str, pos: int) -> bool:
    """Whether the incomplete JSON at s[pos] ('{') can still become an object: its first token must be a key."""
    p = _skip_ws(s, pos + 1)
    return p == len(s) or s[p] in '"}'


def _llama_scan(text: str, final: bool, names: Collection[str] = ()):
    """Llama 3.1 JSON calls: the calls when the whole text is `[<|python_tag|>]{call}[; {call}...]`, None while it
    may still become that, or _BAD. names: the request's tools, which an untagged call must name."""
    s = text.lstrip()
    tagged = s.startswith(_PYTHON_TAG)
    if tagged:
        s = s[len(_PYTHON_TAG):]
    elif _PYTHON_TAG.startswith(s):
        return _BAD if final else None
    calls: list[ToolCall] = []
    pos = _skip_ws(s, 0)
    while True:
        if pos == len(s):
            return (calls or _BAD) if final else None
        if calls:
            if s[pos] != ";":
                return _BAD
            pos = _skip_ws(s, pos + 1)
            if pos == len(s):  # a trailing ';' is harmless
                return calls if final else None
        if s[pos] != "{":
            return _BAD
        value, end = _decode(s, pos)
        if value is None:
            return _BAD if final or not _could_be_object(s, pos) else None
        # bare JSON: without arguments it is just a JSON answer; given the tools, it must call one (the rule
        # every parser applies to bare JSON)
        call = _bare_call(value, names) if names and not tagged else _call_from_obj(value, need_args=True)
        if call is None:
            return _BAD
        calls.append(call)
        pos = _skip_ws(s, end)


def _bare_call(obj, names: Collection[str]) -> ToolCall | None:
    """A call from a bare JSON object: it names one of the tools and its arguments are an object (or, as OpenAI
    writes them on the wire, a string holding one)."""
    name = obj.get("name") if isinstance(obj, dict) else None
    if not isinstance(name, str) or name not in names:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(name, _arguments_text(args)) if isinstance(args, dict) else None


def _bare_scan(text: str, names: Collection[str], final: bool):
    """Bare JSON calls: the calls when the whole text is one call object or a list of them, None while it may
    still become that, or _BAD."""
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return _BAD if final else None
    if text[pos] not in "[{":
        return _BAD
    value, end = _decode(text, pos)
    if value is None:
        if final:
            return _BAD
        if text[pos] == "{":
            return None if _could_be_object(text, pos) else _BAD
        p = _skip_ws(text, pos + 1)
        return None if p == len(text) or text[p] == "{" else _BAD
    if _skip_ws(text, end) != len(text):
        return _BAD  # more than the JSON: an answer that contains JSON, not a call
    calls = [_bare_call(x, names) for x in (value if isinstance(value, list) else [value])]
    return calls if calls and all(c is not None for c in calls) else _BAD


class ToolCallStream:
    """Incremental version for SSE: feed(text) -> (content safe to show now, calls completed by this text);
    finish() -> (remaining content, remaining calls) at the end of generation. Content that could be the start of a
    tool-call marker is held back until it is known not to be one; with tool_names, so is a reply that may still
    be bare JSON calls of those tools (then the calls come at the end). Concatenating all content outputs and all
    calls must equal parse_tool_calls on the whole text (content modulo surrounding whitespace)."""

    def __init__(self, parser: str, tool_names: Optional[Collection[str]] = None):
        if parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {parser!r} (expected one of {', '.join(PARSERS)})")
        self.parser = parser
        self.tool_names = frozenset(tool_names or ())
        self._head: Optional[str] = "" if self.tool_names else None  # text held while it may be bare JSON calls
        self._buf = ""
        self._in_call = False  # hermes/mistral: the buffer is the text after an opening marker
        self._plain = False  # llama3_json: known not to be a call, so text passes straight through
        self._closer = False  # the last fed text could have completed a JSON value
        self._finished = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._head is not None:
            self._head += text
            closer = "}" in text or "]" in text
            if (closer or len(self._head) <= _RESCAN_ALWAYS or not text) and \
                    _bare_scan(self._head, self.tool_names, final=False) is _BAD:
                text, self._head = self._head, None  # not bare calls: the model's own format decides
                return self._feed(text)
            return "", []
        return self._feed(text)

    def _feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        self._closer = "}" in text or "]" in text or ";" in text
        if self.parser == "llama3_json":
            if not self._plain and (self._closer or len(self._buf) <= _RESCAN_ALWAYS):
                self._plain = _llama_scan(self._buf, False, self.tool_names) is _BAD
            if not self._plain:
                return "", []
            out, self._buf = self._buf, ""
            return out, []
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self._finished:
            return "", []
        if self._head is not None:
            head, self._head = self._head, None
            calls = _bare_scan(head, self.tool_names, final=True)
            if isinstance(calls, list):
                self._finished = True
                return "", calls
            content, calls = self._feed(head)
            rest, more = self.finish()
            return content + rest, calls + more
        self._finished = True
        if self.parser != "llama3_json":
            return self._scan(final=True)
        text, self._buf = self._buf, ""
        calls = _BAD if self._plain else _llama_scan(text, True, self.tool_names)
        return ("", calls) if isinstance(calls, list) else (text, [])  # final: a list of calls or _BAD

    def _scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        opener = HERMES_OPEN if self.parser == "hermes" else _MISTRAL
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                i = self._buf.find(opener)
                if i < 0:
                    keep = 0 if final else _partial_marker(self._buf, opener)
                    content.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return "".join(content), calls
                content.append(self._buf[:i])
                self._buf = self._buf[i + len(opener):]
                self._in_call = True
                continue
            got = self._hermes_call(final) if self.parser == "hermes" else self._mistral_call(final)
            if got is None:
                return "".join(content), calls
            text, new_calls, end = got
            content.append(text)
            calls.extend(new_calls)
            self._buf = self._buf[end:]
            self._in_call = False

    def _hermes_call(self, final: bool):
        """(content, calls, characters consumed) for the block the buffer starts, or None until it is closed."""
        j = self._buf.find(HERMES_CLOSE)
        if j < 0 and not final:
            return None
        # An unclosed block at the end still counts when its JSON is whole: models sometimes stop before the tag.
        end = len(self._buf) if j < 0 else j + len(HERMES_CLOSE)
        call = _call_from_json(self._buf if j < 0 else self._buf[:j])
        return ("", [call], end) if call else (HERMES_OPEN + self._buf[:end], [], end)

    def _mistral_call(self, final: bool):
        j = self._buf.find(_MISTRAL)
        seg = self._buf if j < 0 else self._buf[:j]
        if not final and j < 0 and not self._closer and len(seg) > _RESCAN_ALWAYS:
            return None
        got = _mistral_segment(seg, final or j >= 0)
        if got is None:
            return None
        if got is _BAD:  # the marker is content; what follows it is scanned again as content
            return _MISTRAL, [], 0
        return "", got[0], got[1]


def parse_tool_calls(parser: str, text: str,
                     tool_names: Optional[Collection[str]] = None) -> tuple[str, list[ToolCall]]:
    """(content with the tool-call markup removed, stripped of surrounding whitespace, calls). Text with no
    well-formed call comes back unchanged with []. A malformed call block is left in the content (never lost).
    tool_names: the request's tools (bare JSON calls of them count; untagged Llama 3.1 calls must name one)."""
    stream = ToolCallStream(parser, tool_names)
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    calls += more
    return ((content + rest).strip(), calls) if calls else (text, [])
