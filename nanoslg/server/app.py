"""The Starlette application: routes, API-key check, body limits and OpenAI-shaped errors."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from pydantic import ValidationError
from pydantic_core import ErrorDetails, from_json
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import nanoslg
from nanoslg.server.access_log import GENERATION, AccessLog
from nanoslg.server.async_engine import AsyncEngine, EngineUnavailable, TooManyChoices
from nanoslg.server.metrics import ServerMetrics
from nanoslg.server.openai_api import (Generation, GenerationFailed, RequestRejected, Responder, chat_requests,
                                       completion_requests)
from nanoslg.server.openapi import openapi_schema
from nanoslg.server.schemas import ChatCompletionRequest, CompletionRequest, ServedModel
from nanoslg.server.structured import GrammarChecker, StructuredOutputError, chat_templates, plan_output
from nanoslg.server.tool_calls import detect_parser
from nanoslg.server.tool_prompts import template_supports_tools

log = logging.getLogger("nanoslg.server")
STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_tokens_default: Optional[int] = None  # for requests that set no max_tokens; None: up to max_model_len
    tool_call_parser: str = "auto"  # tool_calls.PARSERS, or auto: from the chat template
    access_log: bool = True  # one INFO line per request (access_log.py)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self, headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _field_path(loc: tuple[int | str, ...]) -> str:
    """The field a pydantic error location names, without the union members it also names ("str", "list[int]")."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or (
        p.isidentifier() and p.islower() and p not in ("str", "int", "float", "bool")))


def _validation_error(e: ValidationError) -> ApiError:
    errors = e.errors()
    first = errors[0]
    param = _field_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unsupported parameter: {param}", param=param)

    def message(err: ErrorDetails) -> str:  # our own validators' messages stand alone
        return str(err["ctx"]["error"]) if err.get("type") == "value_error" else err.get("msg", "")

    same_field = [err for err in errors if _field_path(err.get("loc", ())).startswith(param)]
    if len(same_field) > 1:  # a union: say why each of its forms failed
        reasons = "; ".join(dict.fromkeys(f"{_field_path(err['loc'])}: {message(err)}" for err in same_field[:4]))
        return ApiError(400, f"{param} matches none of its accepted forms ({reasons})", param=param or None)
    return ApiError(400, f"{param}: {message(first)}" if param else message(first), param=param or None)


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.metrics = ServerMetrics(engine.cfg.storage_dtypes)
        self._served: Optional[ServedModel] = None
        self._openapi: Optional[dict[str, Any]] = None
        self.grammars = GrammarChecker()
        self._tool_format: Optional[tuple[str, bool]] = None

    @property
    def tool_format(self) -> tuple[str, bool]:
        """(tool-call parser, whether the chat template renders tools), read from the model's chat templates."""
        if self._tool_format is None:
            cfg = self.engine.cfg
            templates = chat_templates(cfg.tokenizer or cfg.model)
            tool_templates = [t for t in templates if template_supports_tools(t)]
            parser = self.settings.tool_call_parser
            if parser == "auto":
                parser = detect_parser(tool_templates[0] if tool_templates else None)
            self._tool_format = (parser, bool(tool_templates))
        return self._tool_format

    @property
    def served(self) -> ServedModel:
        """The served model's limits: the validator enforces them and /openapi.json publishes them."""
        if self._served is None:
            cfg = self.engine.cfg
            self._served = ServedModel(self.settings.served_model_name, cfg.max_model_len,
                                       cfg.model_spec.vocab_size, self.settings.max_tokens_default,
                                       self.settings.api_key is not None)
        return self._served

    # ------------------------------------------------------------------ request plumbing
    def _check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or invalid API key", "authentication_error", code="invalid_api_key")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes")
        try:
            # pydantic's parser, unlike json.loads, refuses lone surrogates (no UTF-8 for the tokenizer or the
            # wire) and NaN / Infinity, which are not JSON
            data = from_json(bytes(body), allow_inf_nan=False)
        except ValueError as e:
            raise ApiError(400, f"invalid JSON body: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the JSON body must be an object")
        return data

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        try:
            self._check_auth(request)
            data = await self._json_body(request)
            try:
                body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data, context=self.served)
            except ValidationError as e:
                raise _validation_error(e) from None
            self._check_model(body.model)
            asked_max_tokens = self._default_max_tokens(body, chat)
            # before building them: a body of many prompts times n must not hold up the event loop first
            self.engine.check_room(body.n * (len(body.prompts()) if isinstance(body, CompletionRequest) else 1))
            request_id = uuid.uuid4().hex
            parser, template_tools = self.tool_format
            try:
                plan = plan_output(body, parser)
                await self.grammars.check(plan)  # a bad schema is a 400 before the engine sees it
                reqs = chat_requests(body, request_id, plan, template_tools, asked_max_tokens) \
                    if isinstance(body, ChatCompletionRequest) else \
                    completion_requests(body, request_id, plan, asked_max_tokens)
            except StructuredOutputError as e:
                raise ApiError(400, str(e), param=e.param, code=e.code) from None
            except ValidationError as e:
                raise _validation_error(e) from None
            except ValueError as e:  # SamplingParams' own checks
                raise ApiError(400, str(e)) from None
            gen = Generation(self.engine, self.metrics, reqs, body.n)
            setattr(request.state, GENERATION, gen)
            responder = Responder(chat, self.settings.served_model_name, gen, body, plan)
            deltas = gen.deltas()
            # Wait for the first output before answering, so a request the engine rejects gets a 400.
            first = await self._until_disconnect(request, anext(deltas, None))
            if body.stream:
                return StreamingResponse(responder.stream(first, deltas), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            await self._until_disconnect(request, self._drain(deltas))
            return JSONResponse(responder.whole())
        except ApiError as e:
            return e.response()
        except RequestRejected as e:
            return ApiError(400, str(e), code=e.code).response()
        except TooManyChoices as e:
            return ApiError(400, str(e), param="n", code="too_many_choices").response()
        except EngineUnavailable as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
            return ApiError(503, str(e), "service_unavailable").response(headers)
        except GenerationFailed as e:
            return ApiError(500, f"generation failed: {e}", "server_error").response()

    def _default_max_tokens(self, body, chat: bool) -> bool:
        """Gives a body without max_tokens the server's default; whether the client set max_tokens itself (then
        prompt + max_tokens must fit in max_model_len, as OpenAI's and vLLM's servers require)."""
        default = self.settings.max_tokens_default
        if chat:
            asked = body.max_tokens is not None or body.max_completion_tokens is not None
            if default is not None and not asked:
                body.max_completion_tokens = default
            return asked
        if "max_tokens" not in body.model_fields_set:  # unset: the default; null: no limit
            if default is not None:
                body.max_tokens = default
            return False
        return body.max_tokens is not None

    @staticmethod
    async def _drain(deltas) -> None:
        async for _ in deltas:
            pass

    @staticmethod
    async def _until_disconnect(request: Request, awaitable):
        """Await while watching the client: if it goes away, stop the generation (aborting its requests)."""
        task = asyncio.ensure_future(awaitable)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                # Cancelling unwinds the generator inside the task, whose cleanup aborts the engine requests.
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(499, "client disconnected")

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{
            "id": self.settings.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "nanoslg", "max_model_len": self.engine.cfg.max_model_len}]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.engine.healthy else 503)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": nanoslg.__version__})

    async def metrics_endpoint(self, request: Request) -> Response:
        try:
            state: Optional[dict[str, Any]] = await self.engine.scheduler_state()
        except EngineUnavailable:
            state = None  # serve the counters we have; the engine gauges keep their last values
        self.metrics.engine.update(state, self.engine.num_restarts, self.engine.pids)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = openapi_schema(nanoslg.__version__, self.served)
        return JSONResponse(self._openapi)

    async def index(self, request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")


def build_app(engine: AsyncEngine, settings: ServerSettings) -> Any:
    """The ASGI application: Starlette's, behind the access log unless settings turn it off."""
    app = _starlette_app(engine, settings)
    return AccessLog(app) if settings.access_log else app


def _starlette_app(engine: AsyncEngine, settings: ServerSettings) -> Starlette:
    server = OpenAIServer(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        await engine.ready()  # uvicorn listens only after this: another API-server process first learns the engine
        yield
        engine.close()

    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/version", server.version, methods=["GET"]),
        Route("/metrics", server.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", server.openapi, methods=["GET"]),
        Route("/", server.index, methods=["GET"]),
    ]
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # exc.headers carries a 405's Allow
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response(exc.headers)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal server error", "server_error").response()

    app = Starlette(routes=routes, lifespan=lifespan,
                    # starlette types every handler as taking any exception; it passes http_error HTTPExceptions only
                    exception_handlers={HTTPException: http_error,  # type: ignore[dict-item]
                                        Exception: unexpected_error})
    app.state.server = server
    return app
