"""create_app(): the FastAPI application, its lifespan, middleware and the one error table.

The engine is built on a background thread during the lifespan so that /health can answer
"loading" meanwhile; when loading fails the server is asked to exit. Every error leaves as
OpenAI's `{"error": {...}}` with the status from `ERRORS`; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.tokenizer import ChatTemplateError
from server.config import ServerConfig
from server.engine_front import EngineDeadError, EngineFront, EngineOverloaded, RequestRejected
from server.engine_process import EngineStartFailed
from server.memory import freeze_startup_objects
from server.metrics import Metrics
from server.protocol import ErrorResponse, RequestError, RequestLimits, describe_validation_errors
from server.protocol.anthropic import error_body as anthropic_error
from server.response_store import ResponseNotFound, ResponseStore
from server.serving import ChatService, CompletionService, GenerationFailed
from server.serving_anthropic import MessagesService
from server.serving_embeddings import EmbeddingsAborted, EmbeddingService
from server.serving_llamacpp import LlamaCppService
from server.serving_responses import ResponsesService

logger = logging.getLogger(__name__)
# The request being served (RequestIdMiddleware): names the response (routes)
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

RETRY_AFTER_SECONDS = "1"


# How often the app looks for a dead engine, and how long a server whose engine died keeps
# answering `failed` before it exits (balancers and probes see it go; then it is restarted).
ENGINE_CHECK_SECONDS = 0.5
FAILED_EXIT_SECONDS = 10.0


class Unavailable(Exception):
    """Not serving right now (loading, draining, failed): 503 with Retry-After."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ModelNotFound(Exception):
    pass


class NotServed(Exception):
    """An endpoint this server was not started to serve (HTTP 404, as vLLM answers one its
    model does not support)."""


@dataclass
class ServerState:
    """What the routes need, reached through one dependency (routes.get_state)."""

    config: ServerConfig
    limits: RequestLimits
    metrics: Metrics
    engine: EngineFront | None = None
    completions: CompletionService | None = None
    chat: ChatService | None = None
    responses: ResponsesService | None = None
    embeddings: EmbeddingService | None = None
    llamacpp: LlamaCppService | None = None  # llama.cpp's native /completion and /infill
    messages: MessagesService | None = None  # Anthropic's Messages API
    status: str = "loading"  # loading | ready | draining | failed
    # Generation requests between their checks and their queueing: changed on the event loop
    # only (admission), read by the drain's thread
    admitting: int = 0
    reason: str = "the model is loading"
    ready: threading.Event = field(default_factory=threading.Event)
    # The LoRA adapters requests may name, name -> path: --lora-modules', then those loaded
    # and unloaded while serving (--allow-runtime-lora-updating)
    adapters: dict[str, str] = field(default_factory=dict)
    lora_loading: set[str] = field(default_factory=set)  # names being loaded

    def __post_init__(self) -> None:
        self.adapters.update(self.config.lora_modules)

    def serving_engine(self) -> EngineFront:
        if self.status != "ready" or self.engine is None:
            raise Unavailable(self.reason, self.status)
        try:
            self.engine.check_health()
        except EngineDeadError as e:
            self.status, self.reason = "failed", str(e)
            raise
        return self.engine

    def accept(self, body: AcceptedBody) -> EngineFront:
        """The engine, once `body` passes the checks every endpoint makes: serving, model
        name, configured limits."""
        engine = self.serving_engine()
        self.check_model(body.model)
        body.check_limits(self.limits, engine.vocab_size, engine.max_model_len)
        return engine

    @contextlib.contextmanager
    def admission(self, body: AcceptedBody) -> Iterator[EngineFront]:
        """The engine for a generation request, from its checks (`accept`) until it is queued
        (tokenizing a long prompt takes a while, off the event loop). A drain waits for such
        requests as for those in flight: counted before the check, so that either the request
        sees the drain begun (503) or the drain sees the request."""
        self.admitting += 1
        try:
            yield self.accept(body)
        finally:
            self.admitting -= 1

    def drain(self) -> None:
        """Stop taking requests, give those in flight `shutdown_timeout` seconds to finish,
        then abort the rest (each stream still gets a final chunk and [DONE]). Blocking."""
        self.status, self.reason = "draining", "the server is shutting down"
        logger.info("draining: %s s for requests in flight", self.config.shutdown_timeout)
        engine = self.engine
        if engine is None:
            return
        deadline = time.monotonic() + self.config.shutdown_timeout
        while (self.admitting or engine.num_unfinished()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if engine.num_unfinished():
            logger.warning("aborting %d requests still in flight", engine.num_unfinished())
            engine.abort_all()
            abort_deadline = time.monotonic() + 5
            while engine.num_unfinished() and time.monotonic() < abort_deadline:
                time.sleep(0.02)

    def check_model(self, model: str | None) -> None:
        if model and model not in self.config.model_names and model not in self.adapters:
            raise ModelNotFound(f"The model `{model}` does not exist.")


class AcceptedBody(Protocol):
    model: str | None

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None: ...


ANTHROPIC_PATH = "/v1/messages"  # whose errors are Anthropic's shape
# exception type -> (status, OpenAI error type, code)
ERRORS: dict[type[Exception], tuple[int, str, str | None]] = {
    RequestError: (400, "invalid_request_error", None),
    RequestRejected: (400, "invalid_request_error", None),
    ChatTemplateError: (400, "invalid_request_error", None),
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    ResponseNotFound: (404, "invalid_request_error", None),
    NotServed: (404, "invalid_request_error", None),
    EmbeddingsAborted: (503, "server_error", "draining"),
    EngineOverloaded: (503, "server_error", "overloaded"),
    EngineDeadError: (503, "server_error", "failed"),  # as /health says from then on
    Unavailable: (503, "server_error", None),
    GenerationFailed: (500, "server_error", None),
}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, headers: Mapping[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    """OpenAI's error body. `code` is a string or null, as OpenAI sends it (vLLM sends the
    status there, an int: one type for the field keeps typed clients working). On
    Anthropic's Messages API (`path`), Anthropic's body instead: its SDKs read that one."""
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    if path.startswith(ANTHROPIC_PATH):
        return JSONResponse(anthropic_error(status, message), status_code=status,
                            headers=headers)
    body = ErrorResponse.of(message, type_, param, code)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def internal_error(exc: Exception, path: str = "") -> JSONResponse:
    """The answer to an error nothing expected (a bug): logged with its traceback, a 500."""
    logger.error("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", "server_error", path=path)


class ErrorAnsweringRoute(APIRoute):
    """A route that answers an error no exception handler names itself, as a 500.

    Starlette gives a handler for Exception to its outermost middleware, which re-raises
    after answering: uvicorn then logged a second traceback and closed the keep-alive
    connection unannounced, so the client's next request on it failed as well. Errors with a
    handler of their own (the error table, validation, HTTP errors) go on to it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                handlers = request.app.exception_handlers
                if any(cls in handlers for cls in type(exc).__mro__ if cls is not Exception):
                    raise
                return internal_error(exc, request.url.path)

        return answer


def _count_refusal(scope: Scope, reason: str) -> None:
    """Count a refused API request in requests_rejected_total. The API's requests are POSTs;
    a GET is a lookup (a model card, a path), with which scanners would fill the series."""
    if scope["method"] == "POST":
        scope["app"].state.server.metrics.rejected(reason)


def _install_error_table(app: FastAPI) -> None:
    async def known(request: Request, exc: Exception) -> JSONResponse:
        status, type_, code = ERRORS[type(exc)]
        code = getattr(exc, "code", None) or code  # Unavailable's, RequestRejected's
        if status != 500:  # (a 500 is a request that failed after admission)
            _count_refusal(request.scope,
                          "invalid_request" if status == 400 else code or "unavailable")
        return error_response(status, str(exc), type_, getattr(exc, "param", None), code,
                              path=request.url.path)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count_refusal(request.scope, "invalid_request")
        message, param = describe_validation_errors(exc.errors())
        return error_response(400, message, "invalid_request_error", param,
                              path=request.url.path)

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "request_too_large" if exc.status_code == 413 else None
        if code:  # a chunked body past the limit
            _count_refusal(request.scope, code)
        # Starlette's own headers kept: a 405's Allow lists the methods the path takes
        return error_response(exc.status_code, str(exc.detail), type_, code=code,
                              headers=exc.headers, path=request.url.path)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc, request.url.path)

    for exc_type in ERRORS:
        app.add_exception_handler(exc_type, known)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            _count_refusal(scope, "request_too_large")
            response = error_response(413, message, "invalid_request_error",
                                      code="request_too_large", path=scope["path"])
            return await response(scope, receive, send)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException survives FastAPI's body parsing (anything else would
                    # become a 400) and reaches the error table.
                    raise StarletteHTTPException(413, message)
            return received

        await self.app(scope, counting_receive, send)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` on the protected paths, before any parsing.

    The comparison is constant-time: timing must not reveal how much of a guess was right.
    """

    # (llama.cpp's native API too: /completion(s), /infill, /props, /slots)
    PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/completion", "/infill", "/props",
                 "/slots", "/invocations", "/embedding", "/apply-template")

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if not header and b"x-api-key" in headers:  # (Anthropic's SDKs send the key so)
                scheme, token = b"bearer", headers[b"x-api-key"]
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                _count_refusal(scope, "invalid_api_key")
                response = error_response(
                    401, "invalid or missing API key: send 'Authorization: Bearer <key>' (or "
                    "'x-api-key: <key>')", "invalid_request_error", code="invalid_api_key",
                    path=scope["path"])
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Honour or generate X-Request-Id: it comes back as a header and names the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = raw if raw.isprintable() and raw else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        # Anthropic's API names it request-id (its SDKs show it as a response's _request_id)
        names = ((b"x-request-id", b"request-id") if scope["path"].startswith(ANTHROPIC_PATH)
                 else (b"x-request-id",))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      *((name, request_id.encode("latin-1")) for name in names)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def create_app(config: ServerConfig, load_engine: Callable[[], EngineFront],
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The app; `load_engine` runs on a thread at start-up, `on_fatal` hears if it fails, or
    if the engine dies later (FAILED_EXIT_SECONDS after)."""
    from server.routes import router

    state = ServerState(config=config, limits=RequestLimits(max_n=config.max_n),
                        metrics=Metrics(config.served_model_name, config.metrics_compat,
                                        lora=config.enable_lora, max_loras=config.max_loras))

    def load() -> None:
        try:
            engine = load_engine()
            engine.start()
            state.engine = engine
            services = (engine, engine.tokenizer, config.served_model_name,
                        config.prompt_tokens_details)
            state.completions = CompletionService(*services)
            state.llamacpp = LlamaCppService(engine, engine.tokenizer,
                                             config.served_model_name)
            state.chat = ChatService(*services, tool_call_parser=config.tool_call_parser,
                                     trust_request_templates=config.trust_request_chat_template,
                                     reasoning_parser=config.reasoning_parser)
            state.messages = MessagesService(state.chat)
            state.responses = ResponsesService(state.chat, ResponseStore(
                config.responses_store) if config.responses_store else None)
            if config.enable_embeddings:
                state.embeddings = EmbeddingService(
                    engine, config.served_model_name, config.pooling,
                    trust_request_templates=config.trust_request_chat_template)
            state.metrics.attach(engine)
            frozen = freeze_startup_objects()
            state.status, state.reason = "ready", "ready"
            logger.info("ready: serving %s (%d start-up objects left out of garbage collection)",
                        config.served_model_name, frozen)
        except Exception as e:  # noqa: BLE001 - any load failure is fatal and reported
            # An engine process logged its own traceback; a ValueError's message says it all
            logger.error("loading failed: %s", e,
                         exc_info=not isinstance(e, ValueError | EngineStartFailed))
            state.status, state.reason = "failed", f"loading failed: {e}"
            if on_fatal is not None:
                on_fatal(f"cannot start: {e}")
        finally:
            state.ready.set()

    async def exit_when_the_engine_dies() -> None:
        """An engine that died does not come back (vLLM's server exits then too): streams end
        with the error at once, /health and requests say `failed` (503) for a while so that a
        balancer takes the replica out, then `on_fatal` stops the server (exit 1) for its
        supervisor to restart it: a restart policy, or a liveness probe that no longer finds
        the process."""
        while state.status in ("loading", "ready"):
            await asyncio.sleep(ENGINE_CHECK_SECONDS)
            if state.status == "ready" and state.engine is not None:
                with contextlib.suppress(EngineDeadError, Unavailable):
                    state.serving_engine()  # (marks the state failed when the engine died)
        if state.status != "failed" or state.engine is None:
            return  # draining, or loading failed (the loader has said so)
        logger.error("the engine died (%s): exiting in %.0f s, to be restarted", state.reason,
                     FAILED_EXIT_SECONDS)
        await asyncio.sleep(FAILED_EXIT_SECONDS)
        if on_fatal is not None:
            on_fatal(f"the engine died: {state.reason}")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A thread that ends once the engine runs: one that had run OpenMP regions (loading
        # does) and stayed alive would double libgomp's thread count past the CPUs', and
        # libgomp then stops spinning between regions: the CPU forward measured 35% slower.
        threading.Thread(target=load, name="loader", daemon=True).start()
        watcher = asyncio.ensure_future(exit_when_the_engine_dies())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if state.engine is not None:
                state.engine.stop()

    app = FastAPI(title="llama-serve", version=package_version(), lifespan=lifespan)
    app.state.server = state
    _install_error_table(app)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestIdMiddleware)
    return app


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-serve")
    except PackageNotFoundError:
        return "0+unknown"


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT first drains (health 503, in-flight requests finish or are aborted),
    then stops uvicorn; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.state.status != "ready":
            # Stop now (a second signal; or nothing to drain: loading, failed), and exit 0 as
            # a drain does: uvicorn's own handler re-raises the signal at exit (status 143).
            # One more signal after that stops without waiting for connections.
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.draining = True

        def drain_then_exit() -> None:
            self.state.drain()
            self.should_exit = True

        threading.Thread(target=drain_then_exit, name="drain", daemon=True).start()
