"""Tools in the prompt: whether a chat template renders OpenAI's `tools` itself, a system prompt describing them
for one that does not, and the conversation's tool calls and results as such a template can take them (Hermes
`<tool_call>` and `<tool_response>` blocks, the format tool_calls.py parses back)."""
from __future__ import annotations

import copy
import json
import re
from typing import Any

from nanoslg.server.tool_calls import HERMES_CLOSE, HERMES_OPEN

_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_TOOLS_VAR = re.compile(r"\btools\b")


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the jinja template renders a `tools` variable (e.g. mentions 'tools' in a jinja expression/statement)."""
    return any(_TOOLS_VAR.search(block) for block in _JINJA.findall(chat_template or ""))


def fallback_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """A system-prompt text for templates without tool support: lists the tools (OpenAI `tools` entries:
    {"type":"function","function":{"name","description","parameters"}}) as JSON and tells the model to answer a
    call as <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Hermes style)."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n'
            "Function results come back to you within <tool_response></tool_response> XML tags.")


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def messages_for_template(messages: list[dict[str, Any]], supports_tools: bool) -> list[dict[str, Any]]:
    """OpenAI chat messages -> what the chat template gets. Assistant `tool_calls` entries get their
    `function.arguments` JSON string parsed into a dict when it is a JSON object (HF templates expect a dict);
    `content: None` becomes "". Without template tool support: an assistant message's tool_calls are appended to
    its content as Hermes <tool_call>{...}</tool_call> blocks (and the tool_calls key removed), and a `tool`
    message becomes a `user` message whose content is "<tool_response>\n{content}\n</tool_response>"; with
    support, messages keep their roles/keys (tool messages keep tool_call_id/name). Never mutates the input.

    Without tool support, consecutive tool messages (parallel calls) merge into one user message: many such
    templates insist that user and assistant turns alternate."""
    out: list[dict[str, Any]] = []
    after_tool = False
    for msg in messages:
        msg = copy.deepcopy(msg)
        if "content" in msg and msg["content"] is None:
            msg["content"] = ""
        role = msg.get("role")
        if role == "assistant" and "tool_calls" in msg and not msg["tool_calls"]:
            msg.pop("tool_calls")  # an empty list trips templates that insist on exactly one call
        for tc in (msg.get("tool_calls") or []) if role == "assistant" else []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    parsed = json.loads(fn["arguments"])
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    fn["arguments"] = parsed
        if not supports_tools and role == "tool":
            block = f"<tool_response>\n{_text(msg.get('content'))}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            after_tool = True
            continue
        if not supports_tools and role == "assistant" and msg.get("tool_calls"):
            blocks = []
            for tc in msg.pop("tool_calls"):
                fn = (tc.get("function") if isinstance(tc, dict) else None) or {}
                call = {"name": fn.get("name"), "arguments": fn.get("arguments", {})}
                blocks.append(f"{HERMES_OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{HERMES_CLOSE}")
            msg["content"] = "\n".join([t for t in [_text(msg.get("content"))] if t] + blocks)
        out.append(msg)
        after_tool = False
    return out
