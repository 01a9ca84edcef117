"""HTTP endpoints: thin, validate -> render -> generate -> format. No torch.

/v1/* and /(de)tokenize require the API key when one is set (app.ApiKeyMiddleware); /health,
/live, /metrics and /version are open (probes and scrapers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from model.source import ModelSourceError, resolve_model
from server.app import (
    RETRY_AFTER_SECONDS,
    ErrorAnsweringRoute,
    ModelNotFound,
    NotServed,
    ServerState,
    Unavailable,
    package_version,
    request_id_var,
)
from server.beam_search import submit_beam_searches
from server.engine_front import AdapterExists, AdapterRefused, EngineFront, SlotsUnavailable
from server.engine_process import EngineProcess
from server.guided.regex import GuideError
from server.guided.spec import COMPILER, cached_guide, compile_guide
from server.metrics import CONTENT_TYPE
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    RequestError,
    TokenizeRequest,
    TokenizeResponse,
    random_id,
)
from server.protocol.anthropic import (
    AnthropicMessage,
    CountTokensRequest,
    MessagesRequest,
    TokenCount,
    as_messages_error,
    new_id,
)
from server.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from server.protocol.llamacpp import (
    ApplyTemplateRequest,
    LlamaCppCompletionRequest,
    LlamaCppEmbeddingRequest,
    LlamaCppInfillRequest,
)
from server.protocol.lora import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.protocol.responses_api import (
    DeletedResponse,
    InputItemList,
    ResponseObject,
    ResponsesRequest,
    as_responses_error,
)
from server.protocol.scoring import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from server.request import SamplingParams
from server.serving import (
    DONE,
    UNTRUSTED_TEMPLATE,
    ChatService,
    CompletionService,
    Submitted,
    encode_messages,
    error_event,
    failure_message,
    submit,
)
from server.serving_anthropic import LAST_MESSAGE_EVENT, MessagesJob, MessagesService
from server.serving_embeddings import EmbeddingService
from server.serving_llamacpp import piece_or_bytes, slot_json, tokenize_parts
from server.serving_responses import LAST_RESPONSE_EVENT, ResponseJob, ResponsesService

logger = logging.getLogger(__name__)
SSE_PING_SECONDS = 15
# Stop proxies (nginx) from buffering the stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Bodies larger than this are tokenized off the event loop (_tokenized); smaller ones, the
# usual case, inline: a thread hop per request is not free either.
TOKENIZE_OFF_LOOP_BYTES = 16_384
T = TypeVar("T")


async def get_state(request: Request) -> ServerState:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per request.
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


router = APIRouter(route_class=ErrorAnsweringRoute)


# HEAD too on the probes: load balancers' health checks often send it (the body is dropped)
@router.api_route("/health", methods=["GET", "HEAD"])
# SageMaker's health check (vLLM's /ping: GET or POST)
@router.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)
async def health(state: State) -> JSONResponse:
    try:
        state.serving_engine()
    except Exception as e:  # noqa: BLE001 - any reason not to serve is a 503 for probes
        return JSONResponse({"status": state.status, "reason": str(e)}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_SECONDS})
    return JSONResponse({"status": "ok"})


@router.api_route("/live", methods=["GET", "HEAD"])
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": package_version()}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_model_card(state, name) for name in state.config.model_names] + [
        _lora_card(state, name, path) for name, path in state.adapters.items()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: State) -> ModelCard:
    if model_id in state.adapters:
        return _lora_card(state, model_id, state.adapters[model_id])
    if model_id not in state.config.model_names:  # "" too: `/v1/models/` names no model
        raise ModelNotFound(f"The model `{model_id}` does not exist.")
    return _model_card(state, model_id)


def _model_card(state: ServerState, name: str) -> ModelCard:
    """A card for each name the model answers to; `root` is the name responses carry."""
    engine = state.engine
    return ModelCard(id=name, root=state.config.served_model_name,
                     max_model_len=engine.max_model_len if engine else None)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, state: State, request: Request):  # noqa: ANN201
    service = state.completions
    response_id = _response_id("cmpl")
    with state.admission(body) as engine:
        assert service is not None
        params = service.with_infill_stop(body, await _sampling_params(body, service, state))
        prompts = await _tokenized(request, lambda: service.prompts(body))
        submitted = _submit(engine, service, body, prompts, params, response_id, "prompt")
    return await _respond(request, body.stream, service, body, submitted, response_id)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, state: State,  # noqa: ANN201
                           request: Request):
    service = state.chat
    response_id = _response_id("chatcmpl")
    with state.admission(body) as engine:
        assert service is not None
        service.prepare_tools(body)
        service.check_thinking_budget(body)
        params = await _sampling_params(body, service, state)
        prompt_ids = await _tokenized(request, lambda: service.prompt_ids(body))
        params = service.with_reasoning(params, body, prompt_ids)
        submitted = _submit(engine, service, body, [(prompt_ids, None)], params, response_id,
                            "messages")
    return await _respond(request, body.stream, service, body, submitted, response_id)


@router.post("/invocations")
async def invocations(state: State, request: Request):  # noqa: ANN201
    """SageMaker's one inference path, as vLLM serves it: the body goes to the first endpoint
    whose request it is (chat, completions, then, with --enable-embeddings, embeddings,
    score and rerank)."""
    try:
        body = json.loads(await request.body())
    except ValueError as e:  # (UnicodeDecodeError too)
        raise RequestError(f"the body is not valid JSON: {e}") from None
    endpoints: list[tuple[type[Any], Callable[..., Awaitable[Any]]]] = [
        (ChatCompletionRequest, chat_completions), (CompletionRequest, completions)]
    if state.config.enable_embeddings:
        endpoints += [(EmbeddingRequest, embeddings), (ScoreRequest, score),
                      (RerankRequest, rerank)]
    for model, endpoint in endpoints:
        try:
            parsed = model.model_validate(body)
        except ValidationError:
            continue
        return await endpoint(parsed, state, request)
    names = ", ".join(model.__name__ for model, _ in endpoints)
    raise RequestError(f"Cannot find a suitable endpoint for the request: its body is none "
                       f"of {names}")


@router.post("/completion")
@router.post("/completions", include_in_schema=False)
async def llamacpp_completion(body: LlamaCppCompletionRequest, state: State,  # noqa: ANN201
                              request: Request):
    """llama.cpp's native completion (server/protocol/llamacpp.py)."""
    return await _llamacpp(body, state, request)


@router.post("/infill")
async def llamacpp_infill(body: LlamaCppInfillRequest, state: State,  # noqa: ANN201
                          request: Request):
    """llama.cpp's fill in the middle, on models with the tokens (model/infill.py)."""
    return await _llamacpp(body, state, request)


async def _llamacpp(body: LlamaCppCompletionRequest, state: ServerState,
                    request: Request) -> Any:
    arrived = time.monotonic()
    body = _llamacpp_named(body, state)
    response_id = _response_id("cmpl")
    with state.admission(body) as engine:
        service = state.llamacpp
        assert service is not None
        lora = _adapter(body.model, state)  # (named before any await: see _on_adapter)
        params = replace(body.to_sampling_params(
            service.logit_bias(body), engine.max_model_len, await service.dry_breakers(body)),
            lora=lora)
        params = await _guided(body, params)
        if isinstance(body, LlamaCppInfillRequest):
            if engine.tokenizer.infill is None:  # (llama.cpp's is a 501; a 5xx is a failure)
                raise NotServed("Infill is not supported by this model: it has no "
                                "fill-in-the-middle tokens (Code Llama's ▁<PRE>, ▁<SUF> and "
                                "▁<MID>)")
            params = service.infill_stop(params)
            prompts = await _tokenized(request, lambda: service.infill_prompt(body))
        else:
            prompts = await _tokenized(request, lambda: service.prompts(body))
        params = service.fit(params, prompts, isinstance(body, LlamaCppInfillRequest))
        submitted = submit(engine, prompts, params, _engine_request_id(response_id), "prompt")
    if body.stream:
        return _sse(service.stream(body, submitted, params, arrived))
    answer = await _unless_disconnected(request, service.create(body, submitted, params,
                                                                arrived))
    return answer if isinstance(answer, Response) else JSONResponse(service.dump(body, answer))


@router.post("/embedding")
@router.post("/embeddings", include_in_schema=False)
async def llamacpp_embedding(body: LlamaCppEmbeddingRequest, state: State,  # noqa: ANN201
                             request: Request):
    """llama.cpp's native embeddings (--enable-embeddings): a list of each prompt's vector."""
    service = _embedding_service(state)
    body = _llamacpp_named(body, state)
    tokenizer = service.engine.tokenizer
    return await _pooled(body, state, request, "embd", lambda b: [
        (tokenize_parts(tokenizer, prompt, add_special=True), None) for prompt in b.content],
        service.llamacpp, "content")


@router.post("/apply-template")
async def apply_template(body: ApplyTemplateRequest, state: State) -> dict[str, str]:
    """llama.cpp's: the prompt text the chat template makes of `messages`."""
    engine = state.accept(_llamacpp_named(body, state))
    if body.request_template is not None and not state.config.trust_request_chat_template:
        raise RequestError(UNTRUSTED_TEMPLATE, "chat_template")
    return {"prompt": engine.tokenizer.apply_chat_template(
        [m.template_dict() for m in body.messages], **body.template_args())}


@router.get("/props")
async def props(state: State) -> dict[str, Any]:
    """llama.cpp's server properties: its default generation settings and context."""
    engine = state.serving_engine()
    tokenizer = engine.tokenizer
    defaults = LlamaCppCompletionRequest(prompt="")
    settings = defaults.settings(defaults.to_sampling_params((), engine.max_model_len))
    return {
        "default_generation_settings": {"params": settings, "n_ctx": engine.max_model_len},
        "total_slots": engine.num_slots,
        "model_alias": state.config.served_model_name,
        "modalities": {"vision": False, "audio": False},
        "chat_template": tokenizer.chat_template or "",
        "bos_token": tokenizer.special_tokens.get("bos_token", ""),
        "eos_token": tokenizer.special_tokens.get("eos_token", ""),
        "build_info": f"llama-serve {package_version()}",
        "endpoint_slots": state.config.slots_endpoint, "endpoint_props": False,
        "endpoint_metrics": True,
        "is_sleeping": False,
    }


@router.get("/slots")
async def slots(state: State, fail_on_no_slot: str = "") -> list[dict[str, Any]]:
    """llama.cpp's slot monitor: every KV-cache slot, the task it runs or last ran, its
    parameters and progress. `fail_on_no_slot` (any value): 503 when every slot is busy."""
    if not state.config.slots_endpoint:
        raise NotServed("GET /slots is off on this server (--no-slots)")
    engine = state.serving_engine()
    try:
        states = await engine.slot_states()
    except SlotsUnavailable as e:
        raise Unavailable(str(e), "slots_unavailable") from None
    if fail_on_no_slot and all(slot.processing for slot in states):
        raise Unavailable("no slot available", "no_slot_available")
    return [slot_json(slot, engine.max_model_len) for slot in states]


@router.post("/v1/responses", response_model=ResponseObject)
async def responses(body: ResponsesRequest, state: State, request: Request):  # noqa: ANN201
    """OpenAI's Responses API, read as a chat completion (server/protocol/responses_api.py);
    errors name the Responses request's fields."""
    try:
        service = _responses(state)
        response_id = service.response_id(request_id_var.get())
        chat = body.chat_request(service.history(body))
        params, submitted = await _chat_backed(
            state, request, chat, service.chat, response_id, "input",
            lambda params: service.prompt_ids(body, chat, params))
    except RequestError as e:
        raise as_responses_error(e) from None
    job = ResponseJob(body, chat, params)
    return await _respond(request, body.stream, service, job, submitted, response_id)


@router.post("/v1/messages", response_model=AnthropicMessage)
async def messages(body: MessagesRequest, state: State, request: Request):  # noqa: ANN201
    """Anthropic's Messages API, read as a chat completion (server/protocol/anthropic.py);
    errors in Anthropic's shape (app.error_response), naming its fields."""
    service = _messages(state)
    request_id = request_id_var.get()
    message_id = f"msg_{request_id}" if request_id else new_id("msg")
    try:
        chat = body.chat_request()
        params, submitted = await _chat_backed(state, request, chat, service.chat, message_id,
                                               "messages", lambda _: service.chat.prompt_ids(chat))
    except RequestError as e:
        raise as_messages_error(e) from None
    job = MessagesJob(body, chat, params)
    return await _respond(request, body.stream, service, job, submitted, message_id)


@router.post("/v1/messages/count_tokens", response_model=TokenCount)
async def count_message_tokens(body: CountTokensRequest, state: State,
                               request: Request) -> TokenCount:
    """Anthropic's count of a message request's input tokens: its chat prompt's."""
    service = _messages(state)
    try:
        chat = body.chat_request()
        state.accept(chat)
        return TokenCount(input_tokens=len(await _tokenized(
            request, lambda: service.chat.prompt_ids(chat))))
    except RequestError as e:
        raise as_messages_error(e) from None


def _messages(state: ServerState) -> MessagesService:
    state.serving_engine()  # (503 while loading, as generation)
    assert state.messages is not None
    return state.messages


async def _chat_backed(state: ServerState, request: Request, chat: ChatCompletionRequest,
                       service: ChatService, response_id: str, prompt_param: str,
                       prompt_ids_of: Callable[[SamplingParams], list[int]]
                       ) -> tuple[SamplingParams, list[Submitted]]:
    """A request read as a chat completion (the Responses and Messages APIs): admitted, its
    tools prepared, its prompt tokenized (`prompt_ids_of` its parameters) and queued."""
    with state.admission(chat) as engine:
        service.prepare_tools(chat)
        params = await _sampling_params(chat, service, state)
        prompt_ids = await _tokenized(request, lambda: prompt_ids_of(params))
        params = service.with_reasoning(params, chat, prompt_ids)
        submitted = submit(engine, [(prompt_ids, None)], params,
                           _engine_request_id(response_id), prompt_param)
    return params, submitted


# (:path: an X-Request-Id, and so a response's id, may hold a "/"; the input items' route
# comes first, or the one below would take its path)
@router.get("/v1/responses/{response_id:path}/input_items", response_model=InputItemList)
async def get_input_items(response_id: str, state: State, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          order: Literal["asc", "desc"] = "desc") -> InputItemList:
    """A stored response's input items (--responses-store), OpenAI's cursor page."""
    return _responses(state).input_items(response_id, after, limit, order)


@router.get("/v1/responses/{response_id:path}", response_model=ResponseObject)
async def get_response(response_id: str, state: State) -> ResponseObject:
    """A stored response (--responses-store)."""
    return _responses(state).stored(response_id).response


@router.delete("/v1/responses/{response_id:path}", response_model=DeletedResponse)
async def delete_response(response_id: str, state: State) -> DeletedResponse:
    _responses(state).delete(response_id)
    return DeletedResponse(id=response_id)


def _responses(state: ServerState) -> ResponsesService:
    state.serving_engine()  # (503 while loading, as generation)
    assert state.responses is not None
    return state.responses


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, state: State) -> PlainTextResponse:
    """vLLM's: load a LoRA adapter while serving (--allow-runtime-lora-updating); requests
    may name it from the answer on. It is read on a thread of its own."""
    engine, name = _runtime_lora(state), body.lora_name
    if name in state.adapters or name in state.lora_loading or name in state.config.model_names:
        raise RequestError(f"The lora adapter '{name}' has already been loaded."
                           if name not in state.config.model_names else
                           f"'{name}' is the model's own name", "lora_name")
    state.lora_loading.add(name)  # (before any await: a second load of it waits for none)
    try:
        folder = await asyncio.to_thread(resolve_model, body.lora_path)
        await _on_a_thread_of_its_own(engine.load_adapter, name, folder)
        state.adapters[name] = body.lora_path
    except (AdapterRefused, ModelSourceError, OSError) as e:  # (OSError: a path too long...)
        raise RequestError(str(e), "lora_path") from None
    except AdapterExists as e:
        raise RequestError(str(e), "lora_name") from None
    finally:
        state.lora_loading.discard(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _on_a_thread_of_its_own(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on a thread that ends with it: tensor work on a pool's thread, which
    lives on, keeps an OpenMP team there that slowed the CPU forward by 35-40% (measured at
    start-up, which loads on a short-lived thread for it: server/app.py)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
            loop.call_soon_threadsafe(_settle, done, None, e)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=run, name="lora-loader", daemon=True).start()
    return await done


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not future.done():  # (the awaiting request may be gone)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, state: State
                              ) -> PlainTextResponse:
    """vLLM's: unload an adapter; new requests may no longer name it, those admitted keep
    it to their end (and its memory until then)."""
    engine, name = _runtime_lora(state), body.lora_name
    if name not in state.adapters:
        raise ModelNotFound(f"The lora adapter '{name}' cannot be found.")
    del state.adapters[name]  # (first: no request is admitted on it from here)
    with contextlib.suppress(KeyError):  # (a request beside this one unloaded it)
        engine.unload_adapter(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _runtime_lora(state: ServerState) -> EngineFront:
    if not state.config.runtime_lora_updating:
        raise NotServed("This server does not load LoRA adapters while serving: start it with "
                        "--enable-lora --allow-runtime-lora-updating")
    engine = state.serving_engine()
    if isinstance(engine, EngineProcess):
        raise NotServed("LoRA adapters are not loaded while serving with --engine-process")
    return engine


def _lora_card(state: ServerState, name: str, path: str) -> ModelCard:
    """A LoRA adapter's card, as vLLM lists one: its path as `root`, the model as `parent`."""
    engine = state.engine
    return ModelCard(id=name, root=path, parent=state.config.served_model_name,
                     max_model_len=engine.max_model_len if engine else None)


def _response_id(prefix: str) -> str:
    """`<prefix>-<X-Request-Id>`, as vLLM names a response after the request's header (the
    middleware makes an id up when none came), so that a client's or a proxy's id finds the
    response."""
    request_id = request_id_var.get()
    return f"{prefix}-{request_id}" if request_id is not None else random_id(prefix)


def _engine_request_id(response_id: str) -> str:
    """The response's id and a random tag: an X-Request-Id may repeat, the engine's ids may
    not, and the engine's log lines still name the response."""
    return f"{response_id}-{secrets.token_hex(4)}"


async def _tokenized(request: Request, work: Callable[[], T]) -> T:
    """`work()` (tokenizing), on a worker thread for a large body: encoding takes about 0.6 s
    a MB (model/tokenizer.py releases the GIL for long texts), which on the event loop would
    stall every stream and health check."""
    if int(request.headers.get("content-length") or 0) > TOKENIZE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(work)
    return work()


def _submit(engine: EngineFront, service: CompletionService | ChatService,
            body: CompletionRequest | ChatCompletionRequest,
            prompts: list[tuple[list[int], str | None]], params: SamplingParams,
            response_id: str, prompt_param: str) -> list[Submitted]:
    """The prompts queued, or their beam searches made (use_beam_search)."""
    request_id = _engine_request_id(response_id)
    if body.use_beam_search:
        return submit_beam_searches(engine, prompts, params, request_id, body.length_penalty,
                                    service.tokenizer, prompt_param)
    return submit(engine, prompts, params, request_id, prompt_param)


async def _sampling_params(body: CompletionRequest | ChatCompletionRequest,
                           service: CompletionService | ChatService, state: ServerState
                           ) -> SamplingParams:
    """The engine's parameters for a request: its fields (the model's defaults for those it
    leaves out), its guide and its bad words' tokens."""
    params = _on_adapter(body.to_sampling_params(state.config.generation_defaults),
                         body.model, state)
    return service.with_bad_words(body, await _guided(body, params))


def _on_adapter(params: SamplingParams, model: str | None, state: ServerState
                ) -> SamplingParams:
    """`params` on the LoRA adapter `model` names, if it names one (named before any await:
    one unloaded meanwhile refuses the request rather than run on none)."""
    lora = _adapter(model, state)
    return params if lora is None else replace(params, lora=lora)


def _adapter(model: str | None, state: ServerState) -> str | None:
    """The LoRA adapter `model` names; None: it names none."""
    return model if model in state.adapters else None


def _llamacpp_named(body: T, state: ServerState) -> T:
    """A llama.cpp body's `model`: ignored, as llama.cpp ignores it, unless it names a LoRA
    adapter (which then runs)."""
    model = getattr(body, "model", None)
    return body if model in state.adapters else body.model_copy(  # type: ignore[attr-defined]
        update={"model": None})


async def _guided(body: CompletionRequest | ChatCompletionRequest, params: SamplingParams
                  ) -> SamplingParams:
    """`params` with the request's guide (guided decoding), compiled on the guides' own
    thread unless compiled before: a large schema or grammar takes up to its deadline (3 s,
    6 s), after the compiles queued before it."""
    spec = body.guide_spec()
    if spec is None:
        return params
    try:
        guide = cached_guide(spec) or await asyncio.get_running_loop().run_in_executor(
            COMPILER, compile_guide, spec)
    except GuideError as e:
        raise RequestError(str(e), spec.field) from None
    return replace(params, guide=guide)


async def _respond(request: Request, stream: bool, service: Any, body: Any,
                   submitted: list[Submitted], response_id: str) -> Any:
    """SSE events, or one response object once every choice has finished."""
    if stream:
        return _sse(service.stream(body, submitted, response_id))
    return await _unless_disconnected(request, service.create(body, submitted, response_id))


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, state: State, request: Request):  # noqa: ANN201
    service = _embedding_service(state)
    return await _pooled(body, state, request, "embd", service.prompts, service.create,
                         "input" if body.messages is None else "messages")


@router.post("/score", response_model=ScoreResponse, include_in_schema=False)
@router.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, state: State, request: Request):  # noqa: ANN201
    """vLLM's score of an embedding model: each pair's cosine similarity."""
    service = _embedding_service(state)
    return await _pooled(body, state, request, "score", service.text_prompts, service.score,
                         "text_2")


@router.post("/rerank", response_model=RerankResponse, include_in_schema=False)
@router.post("/v2/rerank", response_model=RerankResponse, include_in_schema=False)
@router.post("/v1/rerank", response_model=RerankResponse)
async def rerank(body: RerankRequest, state: State, request: Request):  # noqa: ANN201
    """vLLM's rerank (Jina's and Cohere's shape) of an embedding model: the documents by
    cosine similarity to the query."""
    service = _embedding_service(state)
    return await _pooled(body, state, request, "rerank", service.text_prompts,
                         service.rerank, "documents")


async def _pooled(body: Any, state: ServerState, request: Request, prefix: str,
                  prompts_of: Callable[[Any], list[tuple[list[int], str | None]]],
                  answer: Callable[[Any, list[Submitted], str], Awaitable[Any]],
                  prompt_param: str) -> Any:
    """An embeddings-made answer: the body's prompts queued as pooling requests (on the LoRA
    adapter it names), `answer` made from their vectors."""
    service, response_id = _embedding_service(state), _response_id(prefix)
    with state.admission(body) as engine:
        params = _pooling_params(body, service, state)
        prompts = await _tokenized(request, lambda: prompts_of(body))
        submitted = submit(engine, prompts, params, _engine_request_id(response_id),
                           prompt_param)
    return await _unless_disconnected(request, answer(body, submitted, response_id))


def _embedding_service(state: ServerState) -> EmbeddingService:
    if not state.config.enable_embeddings:
        raise NotServed("This server does not serve embeddings (nor scores and reranks made "
                        "from them): start it with --enable-embeddings")
    state.serving_engine()  # (503 while loading)
    assert state.embeddings is not None
    return state.embeddings


def _pooling_params(body: Any, service: EmbeddingService, state: ServerState
                    ) -> SamplingParams:
    """The service's pooling parameters, on the LoRA adapter the body names."""
    return _on_adapter(service.params, body.model, state)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, state: State,  # noqa: ANN201
                   request: Request):
    engine = state.accept(body)
    tokenizer = engine.tokenizer
    if body.content is not None:  # llama.cpp's form, and its answer
        content = body.content
        ids = await _tokenized(request, lambda: tokenize_parts(tokenizer, content,
                                                              body.add_special))
        if not body.with_pieces:
            return JSONResponse({"tokens": ids})
        return JSONResponse({"tokens": [{"id": i, "piece": piece_or_bytes(raw)} for i, raw
                                        in zip(ids, tokenizer.token_bytes(ids), strict=True)]})

    def encode() -> list[int]:
        if body.messages is not None:  # the same path as a chat request's prompt
            return encode_messages(tokenizer, body.messages, body, body.add_special_tokens,
                                   state.config.trust_request_chat_template)
        return tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)

    tokens = await _tokenized(request, encode)
    strs = [tokenizer.id_to_token(t) for t in tokens] if body.return_token_strs else None
    return TokenizeResponse(tokens=tokens, token_strs=strs, count=len(tokens),
                            max_model_len=engine.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    engine = state.accept(body)
    # Special tokens kept, as vLLM's (transformers' decode by default)
    text = engine.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return DetokenizeResponse(prompt=text, content=text)


class _EventStream(EventSourceResponse):
    """sse-starlette's response, without the anyio cancel scope it opens around every send
    when no send timeout is set (a scope that can never fire; a tenth of the event loop's
    Python time per streamed token), and without its `Connection: keep-alive` header: the
    connection is the HTTP server's business (uvicorn adds `close` when the client asked
    for it, and the two contradicted each other), and HTTP/2 forbids the header.

    The body ends with its last event (chat's and completions' [DONE], the Responses API's
    response.completed), in the same message. sse-starlette ends it in a
    message of its own once the generator has returned, after a lock's checkpoint: a second
    write (0.12 ms later on an idle server), a loop iteration or more later on a busy one
    (an httpx client of 16 streams on the dev machine saw the end 3.5 ms after [DONE],
    median, 1.7-2.2 ms with this, its own event loop a part of both). Clients that read a
    stream to its end (the OpenAI SDKs, vLLM's benchmark, anything reusing the connection)
    waited that long for their next request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"connection"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ended = False

        async def send_ending_at_last(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body":
                if ended:
                    return  # sse-starlette's own end of the body, or a ping, after it
                body = message.get("body", b"")
                if body == DONE_FRAME or body.startswith((LAST_RESPONSE_EVENT,
                                                          LAST_MESSAGE_EVENT)):
                    ended = True
                    message = {**message, "more_body": False}
            await send(message)

        await super().__call__(scope, receive, send_ending_at_last)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def _sse(events: AsyncIterator[str | bytes]) -> EventSourceResponse:
    """`data: <json>` events (or frames made already: the Responses API's named events),
    keep-alive comments while waiting; a client that goes away cancels `events`, whose
    cleanup aborts the engine requests."""
    return _EventStream(_in_band_errors(events), ping=SSE_PING_SECONDS, sep="\n",
                        headers=SSE_HEADERS)


async def _in_band_errors(events: AsyncIterator[str | bytes]) -> AsyncIterator[bytes | str]:
    """After the 200 has gone out, a failure can only be reported inside the stream."""
    try:
        async for event in events:
            yield _frame(event)
    except Exception as e:
        yield _frame(error_event(failure_message(e)))
        yield _frame(DONE)


def _frame(event: str | bytes) -> bytes | str:
    """`data: <event>` as sse-starlette frames it (sep "\n"), built here once: its encoder
    (a ServerSentEvent a chunk) is a per-token cost. Only one-line events (JSON, [DONE]);
    others go to the encoder, which writes one `data:` line per line. Bytes are a frame
    already (the Responses API's named events)."""
    if isinstance(event, bytes):
        return event
    if "\n" in event or "\r" in event:
        return event
    return b"data: " + event.encode() + b"\n\n"


DONE_FRAME = _frame(DONE)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server stopping: the work (and its requests) too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # nobody is listening; for the access log only
    return task.result()
