"""The OpenAPI 3.1 document of the server (/openapi.json), built from the request models of schemas.py with the
served model's limits, the rules that span several fields, and the real response shapes. Schema and validator must
agree: tests/test_schemathesis.py checks that every body the document allows is accepted."""
from __future__ import annotations

from typing import Any

from nanoslg.server.schemas import ChatCompletionRequest, CompletionRequest, ServedModel


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out = {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "seconds after which a retry can succeed (absent when the "
                                                         "server is shutting down)", "schema": {"type": "integer"}}}
    return out


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_INT, _STR, _NULLABLE_OBJ = {"type": "integer"}, {"type": "string"}, {"type": ["object", "null"]}
_FINISH = {"enum": ["stop", "length", "tool_calls"]}  # a whole response has finished every choice


def _response_schemas() -> dict[str, Any]:
    usage = _obj(["prompt_tokens", "completion_tokens", "total_tokens"], prompt_tokens=_INT, completion_tokens=_INT,
                 total_tokens=_INT, prompt_tokens_details=_obj(["cached_tokens"], cached_tokens=_INT))
    token_ids = {"type": "array", "items": _INT, "description": "only with return_token_ids"}

    def envelope(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR, object={"const": obj},
                    created=_INT, model=_STR, choices={"type": "array", "items": choice}, usage=usage)

    call = _obj(["id", "type", "function"], id=_STR, type={"const": "function"},
                function=_obj(["name", "arguments"], name=_STR, arguments=_STR))
    message = _obj(["role", "content"], role={"const": "assistant"}, content={"type": ["string", "null"]},
                   tool_calls={"type": "array", "items": call})
    call_delta = _obj(["index"], index=_INT, id=_STR, type={"const": "function"},
                      function=_obj([], name=_STR, arguments=_STR))

    # usage is null on each chunk, or absent without include_usage
    def chunk(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return _obj(["id", "object", "created", "model", "choices"], id=_STR, object={"const": obj}, created=_INT,
                    model=_STR, choices={"type": "array", "items": choice}, usage={"anyOf": [usage, {"type": "null"}]})

    streamed_finish = {"enum": ["stop", "length", "tool_calls", None]}
    return {
        "ChatCompletionChunk": chunk("chat.completion.chunk", _obj(
            ["index", "delta", "logprobs", "finish_reason"], index=_INT, logprobs=_NULLABLE_OBJ,
            delta=_obj([], role={"const": "assistant"}, content=_STR,
                       tool_calls={"type": "array", "items": call_delta}), finish_reason=streamed_finish,
            token_ids=token_ids)),
        "CompletionChunk": chunk("text_completion", _obj(
            ["index", "text", "logprobs", "finish_reason"], index=_INT, text=_STR, logprobs=_NULLABLE_OBJ,
            finish_reason=streamed_finish, token_ids=token_ids)),
        "ChatCompletion": envelope("chat.completion", _obj(
            ["index", "message", "logprobs", "finish_reason"], index=_INT, message=message, logprobs=_NULLABLE_OBJ,
            finish_reason=_FINISH, token_ids=token_ids)),
        "Completion": envelope("text_completion", _obj(
            ["index", "text", "logprobs", "finish_reason"], index=_INT, text=_STR, logprobs=_NULLABLE_OBJ,
            finish_reason=_FINISH, token_ids=token_ids)),
        "ModelList": _obj(["object", "data"], object={"const": "list"}, data={"type": "array", "items": _obj(
            ["id", "object", "created", "owned_by"], id=_STR, object={"const": "model"}, created=_INT,
            owned_by=_STR, max_model_len=_INT)}),
        "Error": _obj(["error"], error=_obj(["message", "type", "param", "code"], message=_STR, type=_STR,
                                            param={"type": ["string", "null"]}, code={"type": ["string", "null"]})),
    }


def _apply_served_model(schemas: dict[str, Any], served: ServedModel) -> None:
    """The served model's limits, where the static models can only say "an int32"."""
    top_id = served.vocab_size - 1
    max_ids = max(1, served.max_model_len - 1)  # the prompt must leave room for one generated token
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"]["anyOf"][0] = {"const": served.name}
        props["stop_token_ids"]["anyOf"][0]["items"]["maximum"] = top_id
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for ids in (prompt["anyOf"][2], prompt["anyOf"][3]["items"]):
        ids["items"]["maximum"], ids["maxItems"] = top_id, max_ids
    prompt["description"] = (f"text, texts, token ids or lists of token ids (each id below {served.vocab_size}); a "
                             f"text of {served.max_model_len} tokens or more gets a 400 with code "
                             f"context_length_exceeded, one of no tokens (only characters the tokenizer drops) a "
                             f"400 with code empty_prompt")
    default = served.max_tokens_default
    stop = (f"generation always stops at max_model_len ({served.max_model_len}) tokens of prompt plus output, and a "
            f"max_tokens the request sets must fit there beside the prompt (else a 400 with code "
            f"context_length_exceeded)")
    completion_max = schemas["CompletionRequest"]["properties"]["max_tokens"]
    completion_max["default"] = default or 16
    completion_max["description"] = (f"unset: {default or 16} (the server's --max-tokens-default, else 16 as in "
                                     f"OpenAI's API); null: no limit; {stop}")
    chat = schemas["ChatCompletionRequest"]["properties"]
    for key in ("max_tokens", "max_completion_tokens"):
        chat[key]["default"] = default
        chat[key]["description"] = (f"max_completion_tokens wins over max_tokens; both unset: "
                                    f"{default or 'no limit'} (the server's --max-tokens-default); {stop}")


def _add_cross_field_rules(schemas: dict[str, Any]) -> None:
    """What the validators refuse across fields, in JSON Schema's words."""
    json_format = {"properties": {"type": {"enum": ["json_object", "json_schema"]}}}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name].setdefault("allOf", []).append({"not": {
            "required": ["response_format", "structured_outputs"],
            "properties": {"response_format": {"type": "object", **json_format},
                           "structured_outputs": {"type": "object"}}}})
    chat = schemas["ChatCompletionRequest"]
    chat["allOf"].append({"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"type": "null"}}}},
                          "then": {"required": ["tools"], "properties": {"tools": {"type": "array"}}}})
    chat["properties"]["tool_choice"]["description"] = (
        "unset: auto with tools; needs tools; a named function must be one of them (else a 400 with code "
        "unknown_tool)")
    schemas["ResponseFormat"]["if"] = {"properties": {"type": {"const": "json_schema"}}}
    schemas["ResponseFormat"]["then"] = {"required": ["json_schema"],
                                         "properties": {"json_schema": {"not": {"type": "null"}}}}
    calls = {"properties": {"tool_calls": {"type": "array", "minItems": 1}}, "required": ["tool_calls"]}
    schemas["ChatMessage"]["allOf"] = [
        {"if": calls, "then": {"properties": {"role": {"const": "assistant"}}}},
        {"if": {"not": calls}, "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}},
    ]
    schemas["JsonSchemaFormat"]["properties"]["schema"]["description"] = (
        "a JSON schema; one xgrammar cannot build gets a 400 with code invalid_json_schema")
    for prop in schemas["StructuredOutputs"]["properties"].values():
        prop.pop("default", None)  # absent, not null
    schemas["StructuredOutputs"]["description"] = (
        "vLLM's extension: exactly one key; a schema, regex or grammar xgrammar cannot build gets a 400 with code "
        "invalid_json_schema or invalid_grammar")


def openapi_schema(version: str, served: ServedModel) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this server: its endpoints, the served model's limits, its real responses."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    schemas = {**defs["$defs"], **_response_schemas()}
    _apply_served_model(schemas, served)
    _add_cross_field_rules(schemas)
    errors = {
        "400": _error("invalid request: the body breaks this schema, or its prompt (conversation) has too many "
                      "tokens for max_model_len, alone or with the max_tokens it sets (code "
                      "context_length_exceeded), or none (code empty_prompt), or it "
                      "asks for more completions (prompts x n) than the server runs at once (code "
                      "too_many_choices: --max-waiting-requests and --max-queued-requests)"),
        "404": _error("the model is not the served one"),
        "413": _error("the body is larger than --max-body-mb"),
        "500": _error("the engine failed while generating"),
        "503": _error("the engine is restarting, overloaded or shutting down", retry_after=True),
    }
    if served.api_key:
        errors["401"] = _error("missing or wrong API key")
    security: dict[str, Any] = {"security": [{"bearer": []}]} if served.api_key else {}

    def event(chunk: str) -> dict[str, Any]:
        """One server-sent event: a chunk, an error met after the stream began, or the closing [DONE]."""
        payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/Error"}]}
        return _obj(["data"], data={"anyOf": [{"const": "[DONE]"}, {
            "type": "string", "contentMediaType": "application/json", "contentSchema": payload}]})

    def post(body: str, response: str, summary: str) -> dict[str, Any]:
        return {"post": {"summary": summary, **security, "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}},
            "responses": {"200": {
                "description": "the completion, or with stream true server-sent events (data: lines of chunks, "
                               "then data: [DONE])",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}},
                            "text/event-stream": {"schema": event(f"{response}Chunk")}}}, **errors}}}

    def get(summary: str, media: str, schema: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {
            "200": {"description": "OK", "content": {media: {"schema": schema}}}, **more}}}

    models = get("List the served model", "application/json", {"$ref": "#/components/schemas/ModelList"})
    if served.api_key:
        models["get"].update(security)
        models["get"]["responses"]["401"] = errors["401"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "nanoslg OpenAI-compatible API", "version": version},
        "paths": {
            "/v1/chat/completions": post("ChatCompletionRequest", "ChatCompletion", "Create a chat completion"),
            "/v1/completions": post("CompletionRequest", "Completion", "Create a text completion"),
            "/v1/models": models,
            "/health": {"get": {"summary": "200 while every engine process is alive and ready (no body)",
                                "responses": {"200": {"description": "healthy"},
                                              "503": {"description": "the engine is down or restarting"}}}},
            "/metrics": get("Prometheus metrics", "text/plain", {"type": "string"}),
            "/version": get("Server version", "application/json", _obj(["version"], version=_STR)),
            "/openapi.json": get("This document", "application/json", {"type": "object"}),
            "/": get("The web chat page", "text/html", {"type": "string"}),
        },
        "components": {"schemas": schemas,
                       **({"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
                          if served.api_key else {})},
    }
