"""Request bodies of the OpenAI-compatible endpoints (pydantic models); openapi.py builds /openapi.json from them.

The published schema and the validator must agree: every body the schema allows is accepted, and every body it
forbids gets a 4xx. The exception is a prompt's length in tokens, which JSON Schema cannot express: a text or
conversation too long for max_model_len (400, OpenAI's code context_length_exceeded) or a text of no tokens at
all (400, code empty_prompt), both documented. So:
- unknown fields are refused rather than silently ignored (a client relying on tools, response_format... learns
  so from a 400 naming it), and types are strict like OpenAI's (no "1" for 1, no true for 1);
- limits that depend on the served model (token ids below the vocabulary size, a token-id prompt shorter than
  max_model_len) reach the validator as pydantic's validation context and the schema through openapi_schema;
- every integer is bounded: ids travel as int32, seeds as int64, and an unbounded one would fail on the wire (5xx).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union, cast

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from nanoslg.errors import ContextLengthExceeded
from nanoslg.sampling_params import MAX_LOGPROBS, SamplingParams

INT32_MAX = 2 ** 31 - 1


def _integral(v: Any) -> Any:
    # JSON Schema's "integer" includes 64.0; strict mode would refuse it, yet still refuses true and "64"
    return int(v) if isinstance(v, float) and v.is_integer() else v


# Bounded integers: the bounds inside the annotation, or pydantic would publish them as "ge"/"le". Spelled out as
# aliases (no function making them): a type checker only reads an annotation written out.
_INTEGRAL = BeforeValidator(_integral)
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX), _INTEGRAL]
PositiveInt32 = Annotated[int, Field(ge=1, le=INT32_MAX), _INTEGRAL]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _INTEGRAL]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# An empty text prompt tokenizes to nothing (SmolLM2 and Llama 3 tokenizers add no BOS): vLLM refuses it too.
NonEmptyStr = Annotated[str, Field(min_length=1)]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the schema and the validator both need to know about the served model and the server's settings."""
    name: str
    max_model_len: int
    vocab_size: int
    max_tokens_default: Optional[int] = None
    api_key: bool = False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the arguments object as JSON text")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    # present when a client rebuilt the call from streamed deltas
    index: Optional[Annotated[int, Field(ge=0, le=1024), _INTEGRAL]] = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, description="an assistant message's calls (content may be "
                                                                   "null then)")
    tool_call_id: Optional[str] = Field(None, description="a tool message: the call it answers")
    # what the openai client sends back when a reply's message object is appended to the conversation as is
    refusal: Optional[str] = None
    annotations: Optional[list[Any]] = None
    audio: Optional[dict[str, Any]] = None
    function_call: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls may "
                             f"have none)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def to_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for the system role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


# The default of a key either given with a value or absent: None, typed Any so that the field's own type leaves null
# out (schema and validator refuse a null there)
_ABSENT: Any = None


class StructuredOutputs(_Strict):
    """vLLM's extension: exactly one of these constrains the output."""
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"minProperties": 1, "maxProperties": 1})
    # typed without null (a default of None is not validated): the schema says a key is given with a value
    json_: Union[dict[str, Any], str] = Field(_ABSENT, alias="json", description="a JSON schema")
    json_object: Literal[True] = _ABSENT
    regex: NonEmptyStr = _ABSENT
    choice: Annotated[list[NonEmptyStr], Field(min_length=1)] = _ABSENT
    grammar: NonEmptyStr = Field(_ABSENT, description="EBNF (GBNF) with a root rule")
    structural_tag: Union[dict[str, Any], str] = Field(_ABSENT, description="xgrammar's structural tag")

    def spec(self) -> dict[str, Any]:
        return {"json": self.json_, "json_object": self.json_object, "regex": self.regex, "choice": self.choice,
                "grammar": self.grammar, "structural_tag": self.structural_tag}


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="a JSON schema for the arguments object")
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def _check_vocab(ids: list[int], info: ValidationInfo) -> None:
    served = info.context
    if isinstance(served, ServedModel):
        bad = next((t for t in ids if t >= served.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {served.vocab_size})")


class _Sampling(_Strict):
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); null: that model")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX), _INTEGRAL] = Field(0, description="0 or -1: no top-k")
    min_p: float = Field(0.0, ge=0, le=1)
    n: Annotated[int, Field(ge=1, le=16), _INTEGRAL] = 1
    stop: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=16)], None] = None
    stop_token_ids: Optional[list[TokenId]] = None
    seed: Optional[Annotated[int, Field(ge=-2 ** 63, le=2 ** 63 - 1), _INTEGRAL]] = None
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

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_in_vocab(cls, v, info: ValidationInfo):
        _check_vocab(v or [], info)
        return v

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int], seed_offset: int,
                        structured: Optional[dict[str, Any]] = None) -> SamplingParams:
        return SamplingParams(structured_outputs=structured,

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
    max_tokens: Optional[PositiveInt32] = None
    max_completion_tokens: Optional[PositiveInt32] = None
    logprobs: bool = False
    top_logprobs: Optional[NumLogprobs] = None
    tools: Optional[Annotated[list[Tool], Field(min_length=1, max_length=128)]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description="unset: auto with tools, none without; needs tools")
    parallel_tool_calls: bool = True

    def conversation(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def to_sampling_params(self, index: int, structured: Optional[dict[str, Any]] = None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, logprobs, index, structured)


_ECHO_WITH_LOGPROBS: dict[str, Any] = {"required": ["echo", "logprobs"],
                                       "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}}}


class CompletionRequest(_Sampling):
    # the schema's "not" says what the model validator refuses: prompt logprobs are not implemented
    model_config = ConfigDict(json_schema_extra={"not": _ECHO_WITH_LOGPROBS})

    prompt: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: Optional[PositiveInt32] = 16
    logprobs: Optional[NumLogprobs] = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _ids_fit(cls, v, info: ValidationInfo):
        served = info.context
        id_lists = [] if isinstance(v, str) or isinstance(v[0], str) else v if isinstance(v[0], list) else [v]
        for ids in id_lists:
            _check_vocab(ids, info)
            if isinstance(served, ServedModel) and len(ids) >= served.max_model_len:
                raise ContextLengthExceeded(len(ids), served.max_model_len)
        return v

    @model_validator(mode="after")
    def _no_echo_with_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt as a str or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(cast("Union[list[str], list[list[int]]]", p))  # not token ids (returned above)

    def to_sampling_params(self, index: int, structured: Optional[dict[str, Any]] = None) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs, index, structured)
