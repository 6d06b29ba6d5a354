"""The Starlette application: routes, API-key check, body limits and OpenAI-shaped errors."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import nanoslg
from nanoslg.server.async_engine import AsyncEngine, EngineUnavailable
from nanoslg.server.metrics import ServerMetrics
from nanoslg.server.openai_api import (Generation, GenerationFailed, RequestRejected, Responder, chat_requests,
                                       completion_requests)
from nanoslg.server.schemas import ChatCompletionRequest, CompletionRequest, openapi_schema

log = logging.getLogger("nanoslg.server")
STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = 8 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()))
    kind = first.get("type", "")
    message = f"unsupported parameter: {param}" if kind == "extra_forbidden" else f"{param}: {first.get('msg')}"
    return ApiError(400, message, param=param or None)


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.metrics = ServerMetrics()

    # ------------------------------------------------------------------ request plumbing
    def _check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or invalid API key", "authentication_error", code="invalid_api_key")

    async def _json_body(self, request: Request) -> dict:
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
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
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
                body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
            except ValidationError as e:
                raise _validation_error(e) from None
            self._check_model(body.model)
            if not chat and body.echo and body.logprobs is not None:
                raise ApiError(400, "echo together with logprobs is not supported", param="echo")
            # before building them: a body of many prompts times n must not hold up the event loop first
            self.engine.check_room(body.n * (1 if chat else len(body.prompts())))
            request_id = uuid.uuid4().hex
            try:
                reqs = chat_requests(body, request_id) if chat else completion_requests(body, request_id)
            except ValidationError as e:
                raise _validation_error(e) from None
            except ValueError as e:  # SamplingParams' own checks
                raise ApiError(400, str(e)) from None
            gen = Generation(self.engine, self.metrics, reqs, body.n)
            responder = Responder(chat, self.settings.served_model_name, gen, body)
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
            return ApiError(400, str(e)).response()
        except EngineUnavailable as e:
            return ApiError(503, str(e), "service_unavailable").response()
        except GenerationFailed as e:
            return ApiError(500, f"generation failed: {e}", "server_error").response()

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
            self.metrics.update_engine_state(await self.engine.scheduler_state())
        except EngineUnavailable:
            pass  # serve the counters we have; the engine gauges keep their last values
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_schema(nanoslg.__version__))

    async def index(self, request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")


def build_app(engine: AsyncEngine, settings: ServerSettings) -> Starlette:
    server = OpenAIServer(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
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
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal server error", "server_error").response()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: unexpected_error})
    app.state.server = server
    return app
