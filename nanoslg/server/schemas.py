"""Request bodies of the OpenAI-compatible endpoints (pydantic models, which also give /openapi.json its schemas).

Unknown fields are refused rather than silently ignored: a client relying on a parameter we do not implement
(tools, response_format...) learns so from a 400 naming it.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanoslg.sampling_params import MAX_LOGPROBS, SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    user: Optional[str] = None
    # vLLM's extension: each choice (each streamed chunk) carries the generated token ids, so a client can follow
    # a model served without a tokenizer, and re-send exactly what was generated
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 16 or any(not s for s in items):
            raise ValueError("stop takes up to 16 non-empty strings")
        return v

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int], seed_offset: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=None if self.seed is None else self.seed + seed_offset, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=logprobs,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    def conversation(self) -> list:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def to_sampling_params(self, index: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, logprobs, index)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list:
        """Each prompt as a str or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    def to_sampling_params(self, index: int) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs, index)


def openapi_schema(version: str) -> dict:
    """A real OpenAPI 3 document for the endpoints and their bodies."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    schemas["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    errors = {str(code): {"description": desc, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
        for code, desc in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                           (413, "body too large"), (503, "engine unavailable or busy")]}

    def post(body: str, summary: str) -> dict:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}},
            "responses": {"200": {"description": "the completion (JSON), or server-sent events when stream is true",
                                  "content": {"application/json": {"schema": {"type": "object"}},
                                              "text/event-stream": {"schema": {"type": "string"}}}},
                          **errors}}}

    def get(summary: str) -> dict:
        return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "nanoslg OpenAI-compatible API", "version": version},
        "paths": {
            "/v1/chat/completions": post("ChatCompletionRequest", "Create a chat completion"),
            "/v1/completions": post("CompletionRequest", "Create a text completion"),
            "/v1/models": get("List the served model"),
            "/health": {"get": {"summary": "200 while every engine process is alive and ready",
                                "responses": {"200": {"description": "healthy"},
                                              "503": {"description": "an engine process is down"}}}},
            "/metrics": get("Prometheus metrics"),
            "/version": get("Server version"),
        },
        "components": {"schemas": schemas},
    }
