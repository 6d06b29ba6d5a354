"""Chat and text completions in OpenAI's response shapes, streamed (SSE) or whole."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from pydantic_core import to_json

from nanoslg.protocol import GenerateRequest, OutputDelta, token_ids
from nanoslg.server.async_engine import AsyncEngine, DeltaQueue, EngineUnavailable
from nanoslg.server.metrics import ServerMetrics
from nanoslg.server.schemas import ChatCompletionRequest, CompletionRequest
from nanoslg.server.structured import OutputPlan, ToolCallOutput
from nanoslg.server.tool_prompts import fallback_tools_prompt, messages_for_template


class RequestRejected(ValueError):
    """The engine refused the request itself (e.g. prompt longer than max_model_len): a 400, not a 5xx. code: the
    OpenAI error code the engine gave it (errors.py), if any."""

    def __init__(self, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.code = code


class GenerationFailed(RuntimeError):
    pass


# one generated token's logprob entry: (token text, logprob, [(text, logprob), ...] of the top tokens)
LogprobEntry = tuple[str, float, list[tuple[str, float]]]


@dataclass(slots=True)
class Choice:
    index: int
    prompt_index: int  # which prompt of the request this choice continues (n choices share one)
    text_parts: list[str] = field(default_factory=list)  # joined once at the end: += per delta would be quadratic
    text_len: int = 0
    num_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    logprobs: list[LogprobEntry] = field(default_factory=list)
    prompt_text: Optional[str] = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


# what a generation yields: (choice, its delta, the delta's new logprob entries)
Event = tuple[Choice, OutputDelta, list[LogprobEntry]]


class Generation:
    """One HTTP request's choices running in the engine, merged into a single stream of (choice, delta, logprobs)."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, reqs: list[GenerateRequest],
                 choices_per_prompt: int):
        self.engine, self.metrics, self.reqs = engine, metrics, reqs
        self.choices = [Choice(i, i // choices_per_prompt) for i in range(len(reqs))]
        self.start = time.monotonic()
        self.first_token: Optional[float] = None
        self._queue: DeltaQueue = asyncio.Queue()  # (choice index, delta or exception), filled by the engine
        self.status = "aborted"  # ok, rejected, or how it ended early (access_log.py writes it)

    @property
    def request_id(self) -> str:
        return self.reqs[0].rid.partition("-")[0].partition(".")[0]  # the HTTP request's id (uuid hex)

    async def deltas(self) -> AsyncIterator[Event]:
        """Starts the requests, then yields (choice, delta, the delta's new logprob entries) until every choice has
        finished; raises RequestRejected / GenerationFailed / EngineUnavailable."""
        pending = len(self.reqs)
        admitted = False
        abort_reason = "client_disconnected"  # unless it ends otherwise: the consumer stopped iterating
        try:
            await self.engine.admit(self.reqs, self._queue)
            admitted = True
            while pending:
                index, item = await self._queue.get()
                if isinstance(item, Exception):
                    raise item
                choice = self.choices[index]
                if item.error is not None:
                    if item.finish_reason == "rejected":
                        raise RequestRejected(item.error, item.error_code)
                    raise GenerationFailed(item.error)
                new_logprobs = self._apply(choice, item)
                if item.finish_reason is not None:
                    pending -= 1
                yield choice, item, new_logprobs
            self.status = "ok"
        except RequestRejected:
            self.status = "rejected"
            raise
        except EngineUnavailable as e:
            self.status, abort_reason = "error", e.reason
            raise
        except Exception:
            self.status, abort_reason = "error", "error"
            raise
        finally:
            self.engine.release(self.reqs)  # a client gone or an error: abort whatever still runs
            status = self.status
            if status not in ("ok", "rejected"):
                self.status = f"{status} ({abort_reason})"
                if admitted:
                    self.metrics.aborts.labels(reason=abort_reason).inc()
            self.metrics.observe_request(status, self.start, self.first_token, time.monotonic(),
                                         self.prompt_tokens, self.completion_tokens)

    def ready(self) -> bool:
        """Whether a delta already waits (the next one comes without waiting)."""
        return not self._queue.empty()

    def _apply(self, choice: Choice, d: OutputDelta) -> list[LogprobEntry]:
        """Folds d into choice; returns the logprob entries it added."""
        if d.token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        if d.queue_time is not None:
            self.metrics.observe_first_token(d.queue_time, d.prefill_time or 0.0)
        if d.text:
            choice.text_parts.append(d.text)
            choice.text_len += len(d.text)
        choice.num_tokens += len(d.token_ids)
        choice.token_ids.extend(d.token_ids)
        choice.num_prompt_tokens = d.num_prompt_tokens
        choice.num_cached_tokens = max(choice.num_cached_tokens, d.num_cached_tokens)
        if d.prompt_text is not None:
            choice.prompt_text = d.prompt_text
        if d.finish_reason is not None:
            choice.finish_reason = d.finish_reason
        new: list[LogprobEntry] = []
        if d.logprobs:
            for (lp, top), (text, top_texts) in zip(d.logprobs, d.logprob_texts or []):
                new.append((text, lp, [(t, v) for t, (_, v) in zip(top_texts, top)]))
            choice.logprobs.extend(new)
        return new

    def _per_prompt(self, field: str) -> int:
        # n choices of one prompt share it: count each distinct prompt once
        per_prompt: dict[int, int] = {}
        for c in self.choices:
            per_prompt[c.prompt_index] = max(per_prompt.get(c.prompt_index, 0), getattr(c, field))
        return sum(per_prompt.values())

    @property
    def prompt_tokens(self) -> int:
        return self._per_prompt("num_prompt_tokens")

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self._per_prompt("num_cached_tokens")}}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_requests(body: ChatCompletionRequest, request_id: str, plan: OutputPlan, template_tools: bool,
                  strict_max_tokens: bool = False) -> list[GenerateRequest]:
    """template_tools: the model's chat template renders `tools`; otherwise a system prompt describes them.
    strict_max_tokens: the client set max_tokens, which prompt + output must then fit (else a 400)."""
    conv = messages_for_template(body.conversation(), template_tools)
    kwargs = None
    if body.tools and body.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        if template_tools:
            kwargs = {"tools": tools}
        elif conv and conv[0]["role"] == "system":
            conv[0] = {**conv[0], "content": f"{conv[0]['content']}\n\n{fallback_tools_prompt(tools)}"}
        else:
            conv.insert(0, {"role": "system", "content": fallback_tools_prompt(tools)})
    reqs = []
    for i in range(body.n):
        params = body.to_sampling_params(i, plan.spec)
        if plan.tools == "auto":  # a tool-call marker may be a special token ([TOOL_CALLS]): the parser needs it
            params.skip_special_tokens = False
        reqs.append(GenerateRequest(f"{request_id}-{i}", params, messages=conv, chat_template_kwargs=kwargs,
                                    strict_max_tokens=strict_max_tokens))
    return reqs


def completion_requests(body: CompletionRequest, request_id: str, plan: OutputPlan,
                        strict_max_tokens: bool = False) -> list[GenerateRequest]:
    reqs = []
    for p_index, prompt in enumerate(body.prompts()):
        for i in range(body.n):
            rid = f"{request_id}.{p_index}-{i}"
            params = body.to_sampling_params(i, plan.spec)
            if isinstance(prompt, str):
                reqs.append(GenerateRequest(rid, params, prompt=prompt, echo=body.echo,
                                            strict_max_tokens=strict_max_tokens))
            else:
                reqs.append(GenerateRequest(rid, params, prompt_ids=token_ids(prompt), echo=body.echo,
                                            strict_max_tokens=strict_max_tokens))
    return reqs


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": _bytes(t),
                         "top_logprobs": [{"token": tt, "logprob": tv, "bytes": _bytes(tt)} for tt, tv in top]}
                        for t, lp, top in entries]}


def _completion_logprobs(entries: list[LogprobEntry], offset: int) -> dict[str, Any]:
    offsets = []
    for t, _, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


class Responder:
    """Builds one request's response objects; chat and completions differ only in shapes."""

    def __init__(self, chat: bool, model: str, gen: Generation, body, plan: Optional[OutputPlan] = None):
        self.chat, self.model, self.gen, self.body = chat, model, gen, body
        # tool calls: each choice's text becomes content and calls (structured.py)
        plan = plan or OutputPlan()
        self.tool_outputs = [ToolCallOutput(plan) for _ in gen.choices] if chat and plan.tools != "none" else None
        self.id = _new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.want_logprobs = (body.logprobs if chat else body.logprobs is not None)
        # Every event shares its envelope: encoded once, only the choice is encoded per event.
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        envelope = to_json({"id": self.id, "object": self.chunk_object, "created": self.created, "model": model})
        self._event_head = b"data: " + envelope[:-1] + b',"choices":['
        self._event_tail = b'],"usage":null}\n\n' if body.include_usage else b"]}\n\n"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self) -> dict[str, Any]:
        choices = []
        for c in self.gen.choices:
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                finish = c.finish_reason
                if self.tool_outputs is not None:
                    content, calls, finish = self.tool_outputs[c.index].whole(c.text, finish)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = calls
                choice = {"index": c.index, "message": message,
                          "logprobs": _chat_logprobs(c.logprobs) if self.want_logprobs else None,
                          "finish_reason": finish}
            else:
                prefix = c.prompt_text or ""
                choice = {"index": c.index, "text": prefix + c.text,
                          "logprobs": _completion_logprobs(c.logprobs, len(prefix)) if self.want_logprobs else None,
                          "finish_reason": c.finish_reason}
            if self.body.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        out = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        out["usage"] = self.gen.usage()
        return out

    async def stream(self, first: Optional[Event], rest: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        include_usage = self.body.include_usage
        obj = self.chunk_object
        if self.chat:
            yield self._sse([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in self.gen.choices])
        try:
            item = first
            while item is not None:
                choice, delta, new = item
                text = delta.text
                if not self.chat and delta.prompt_text:
                    text = delta.prompt_text + text
                ids = list(delta.token_ids) if self.body.return_token_ids else []
                finish = delta.finish_reason
                item = None
                # What already waits for the same choice goes in this event too: a process that fell behind
                # catches up with fewer, larger events instead of one per token.
                failure = None
                while finish is None and self.gen.ready():
                    try:
                        item = await anext(rest, None)
                    except (RequestRejected, GenerationFailed, EngineUnavailable) as e:
                        item, failure = None, e  # what this event holds still goes out, before the error
                        break
                    if item is None or item[0] is not choice:
                        break
                    _, more, more_new = item
                    text, finish, new = text + more.text, more.finish_reason, new + more_new
                    if self.body.return_token_ids:
                        ids.extend(more.token_ids)
                    item = None
                if text or ids or finish is not None or new:
                    chunk = self._chunk_choice(choice, text, new, finish)
                    if self.body.return_token_ids:
                        chunk["token_ids"] = ids
                    if chunk.get("delta", True) or chunk["finish_reason"] is not None or new or ids:
                        yield self._sse([chunk])  # (not a chat event whose text a tool-call parser holds back)
                if failure is not None:
                    raise failure
                if item is None:
                    item = await anext(rest, None)
        except (RequestRejected, GenerationFailed, EngineUnavailable) as e:
            kind = "invalid_request_error" if isinstance(e, RequestRejected) else "server_error"
            error = {"message": str(e), "type": kind, "param": None, "code": getattr(e, "code", None)}
            yield b"data: " + to_json({"error": error}) + b"\n\n"
        if include_usage:
            usage = self._envelope(obj, [])
            usage["usage"] = self.gen.usage()
            yield b"data: " + to_json(usage) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _chunk_choice(self, choice: Choice, text: str, new_logprobs: list[LogprobEntry],
                      finish: Optional[str]) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if self.tool_outputs is not None:
                out = self.tool_outputs[choice.index]
                content, calls = out.feed(text)
                if finish is not None:
                    more, more_calls, finish = out.finish(finish)
                    content, calls = content + more, calls + more_calls
                delta = {"content": content} if content else {}
                if calls:
                    delta["tool_calls"] = calls
            return {"index": choice.index, "delta": delta,
                    "logprobs": _chat_logprobs(new_logprobs) if self.want_logprobs and new_logprobs else None,
                    "finish_reason": finish}
        offset = len(choice.prompt_text or "") + choice.text_len - len(text)
        return {"index": choice.index, "text": text,
                "logprobs": _completion_logprobs(new_logprobs, offset) if self.want_logprobs and new_logprobs
                else None, "finish_reason": finish}

    def _sse(self, choices: list[dict[str, Any]]) -> bytes:
        body = b",".join(to_json(c) for c in choices)
        return self._event_head + body + self._event_tail
