"""The Responses API on top of the chat service: a request's one answer as output items (a
message, or function calls), gathered into a response object or streamed as named events.

The answer is read as chat reads it (ChatService: a named tool's arguments, the calls
"required" asked for or the parser found, or text); what differs is the shape. A stream
opens an item when its first piece comes and closes it at the end: text and a named call's
arguments stream as they come, calls found in a finished answer go out whole (as chat's).
Item ids are the same in the stream and in the final response (the SDK's stream helper
checks them). No FastAPI and no tensors here.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    NamedToolChoice,
    RequestError,
    random_id,
)
from server.protocol.base import MAX_ITEMS
from server.protocol.responses_api import (
    FunctionToolChoice,
    IncompleteDetails,
    InputItem,
    InputItemList,
    ItemStatus,
    ListedItem,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from server.request import FinishReason, SamplingParams, TokenLogprob
from server.response_store import ResponseNotFound, ResponseStore, StoredResponse
from server.serving import (
    ChatService,
    Choice,
    Submitted,
    abort_all,
    failure_message,
    merged,
    raise_if_failed,
)

# How the stream's last event starts (the HTTP layer ends the body with it)
LAST_RESPONSE_EVENT = b"event: response.completed\n"

# The ids' prefixes of listed input items, by type (OpenAI's msg_ and fc_)
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                "reasoning": "rs"}


@dataclass(slots=True)
class ResponseJob:
    """A Responses request, the chat request it reads as, and the parameters its engine
    request samples with (echoed: temperature and top_p after the model's defaults)."""

    request: ResponsesRequest
    chat: ChatCompletionRequest
    params: SamplingParams


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _message(text: str = "", logprobs: list[ChatCompletionTokenLogprob] | None = None
             ) -> OutputMessage:
    return OutputMessage(id=_item_id("msg"), content=[OutputText(text=text, logprobs=logprobs)])


def _reasoning(text: str = "") -> OutputReasoning:
    return OutputReasoning(id=_item_id("rs"), content=[ReasoningText(text=text)])


def _call(name: str, arguments: str = "") -> OutputFunctionCall:
    return OutputFunctionCall(id=_item_id("fc"), call_id=_item_id("call"), name=name,
                              arguments=arguments)


class ResponsesService:
    """/v1/responses: the chat service's prompt, generation and reading of the answer,
    shaped as the Responses API's output items and events; finished responses asking to be
    stored (`store`, true by default) kept in `store`, where the server has one."""

    def __init__(self, chat: ChatService, store: ResponseStore | None = None) -> None:
        self.chat, self.store = chat, store

    def response_id(self, request_id: str | None) -> str:
        """`resp_<X-Request-Id>`, as vLLM names it, or a random one; where responses are
        stored, with a random tag too: an X-Request-Id may repeat, a stored id may not."""
        if request_id is None:
            return random_id("resp", "_")
        return f"resp_{request_id}" + (f"_{secrets.token_hex(8)}" if self.store else "")

    def history(self, request: ResponsesRequest) -> list[InputItem]:
        """The items of the conversation `previous_response_id` continues (none without
        one)."""
        if request.previous_response_id is None:
            return []
        if self.store is None:
            raise RequestError("previous_response_id needs stored responses, and this server "
                               "keeps none (--responses-store N): send the conversation as "
                               "input instead", "previous_response_id")
        items = self.store.conversation(request.previous_response_id, "previous_response_id")
        if len(items) + len(request.input) > MAX_ITEMS:
            raise RequestError(f"previous_response_id: the conversation would have "
                               f"{len(items) + len(request.input)} items, more than "
                               f"{MAX_ITEMS}: send a shorter one as input",
                               "previous_response_id")
        return items

    def stored(self, response_id: str) -> StoredResponse:
        """GET /v1/responses/{id}'s response."""
        return self._store(response_id).get(response_id)

    def input_items(self, response_id: str, after: str | None, limit: int,
                    order: Literal["asc", "desc"]) -> InputItemList:
        """A stored response's input items, as OpenAI lists them: newest first unless `order`
        is "asc", from the one after `after`, `limit` of them. Their ids are the response's
        own and their place (input items carry none: OpenAI gives them theirs)."""
        stored = self._store(response_id).get(response_id)
        tag = response_id.removeprefix("resp_")
        items = [ListedItem.of(item, f"{_ITEM_PREFIX[item.type]}_{tag}_{i}")
                 for i, item in enumerate(stored.inputs)]
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((i for i, item in enumerate(items) if item.id == after), None)
            if at is None:
                raise RequestError(f"No input item {after!r} in response {response_id!r}.",
                                   "after")
            items = items[at + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0].id if page else None,
                             last_id=page[-1].id if page else None,
                             has_more=len(items) > limit)

    def delete(self, response_id: str) -> None:
        self._store(response_id).delete(response_id)

    def _store(self, response_id: str) -> ResponseStore:
        """The store, for a lookup; where there is none, a 404 that says why."""
        if self.store is not None:
            return self.store
        raise ResponseNotFound(f"Response with id {response_id!r} not found: this server "
                               "keeps no responses (--responses-store N)")

    def _keep(self, job: ResponseJob, response: ResponseObject) -> None:
        """Store a finished response that asked to be: its turn's items, as the next turn
        reads them (an unfinished answer it continued, and the continuation, one message)."""
        if not response.store or self.store is None:
            return
        sent = list(job.request.input)
        inputs, outputs = sent[:], [item.as_input() for item in response.output]
        at = next((i for i, item in enumerate(outputs) if isinstance(item, MessageItem)), None)
        if job.request.continues_answer and at is not None:
            begun, first = inputs.pop(), outputs[at]
            assert isinstance(begun, MessageItem) and isinstance(first, MessageItem)
            outputs[at] = first.model_copy(update={"content": begun.text + first.text})
        self.store.put(StoredResponse(response, [*inputs, *outputs], sent))

    def prompt_ids(self, request: ResponsesRequest, chat: ChatCompletionRequest,
                   params: SamplingParams) -> list[int]:
        """The chat prompt; with truncation "auto", its last tokens that leave room for the
        output the request must have (max_output_tokens, else min_tokens or one token)."""
        ids = self.chat.prompt_ids(chat)
        needed = params.max_tokens if params.max_tokens is not None else max(params.min_tokens, 1)
        room = self.chat.engine.max_model_len - needed
        if request.truncation == "auto" and 0 < room < len(ids):
            return ids[-room:]
        return ids

    def _skeleton(self, job: ResponseJob, response_id: str) -> ResponseObject:
        """The response before any output: the request's settings echoed."""
        r = job.request
        return ResponseObject(
            id=response_id, model=job.params.lora or self.chat.model_name,
            instructions=r.instructions,
            max_output_tokens=r.max_output_tokens, max_tool_calls=r.max_tool_calls,
            metadata=r.metadata or {}, parallel_tool_calls=r.parallel_tool_calls,
            reasoning=r.reasoning, temperature=job.params.temperature, top_p=job.params.top_p,
            text=(r.text.model_dump(exclude_none=True, by_alias=True) if r.text and r.text.format
                  else {"format": {"type": "text"}}),
            tool_choice=(r.tool_choice.model_dump() if isinstance(r.tool_choice,
                                                                   FunctionToolChoice)
                         else r.tool_choice or "auto"),
            tools=[tool.model_dump(exclude_none=True) for tool in r.tools or ()],
            top_logprobs=r.top_logprobs or 0, truncation=r.truncation, user=r.user,
            previous_response_id=r.previous_response_id,
            store=r.store and self.store is not None)  # (not stored: false, as vLLM's)

    def _logprobs(self, job: ResponseJob, lps: list[TokenLogprob]
                  ) -> list[ChatCompletionTokenLogprob] | None:
        """Chat's logprobs entries (token, logprob, bytes, top_logprobs: the Responses
        API's too), where `include` asked for them."""
        if not job.request.wants_logprobs:
            return None
        return self.chat.logprobs(job.chat, lps).content or []

    def _answer_items(self, job: ResponseJob, choice: Choice,
                      prompt_ids: list[int] | None = None) -> list[OutputItem]:
        """A finished answer's items (in progress: the caller finishes them): its thinking
        (under --reasoning-parser; `prompt_ids` given: a stream's choice holds its content
        alone), its text (if any, or if there are no calls), then its calls."""
        items: list[OutputItem] = []
        if prompt_ids is not None:
            reasoning, choice = self.chat.split_reasoning(job.chat, choice, prompt_ids)
            if reasoning:
                items.append(_reasoning(reasoning))
        content, calls, _ = self.chat.answer(job.chat, choice)
        if content or not calls:
            items.append(_message(content or "", self._logprobs(job, choice.logprobs)))
        items += [_call(call.name, call.arguments) for call in calls or ()]
        return items

    def _finish(self, job: ResponseJob, response: ResponseObject, choice: Choice,
                submitted: list[Submitted]) -> ResponseObject:
        """The response's final status and usage (its items' status follows it)."""
        if choice.finish_reason is FinishReason.LENGTH:
            response.status, response.incomplete_details = "incomplete", IncompleteDetails()
        elif choice.finish_reason is FinishReason.ABORT:  # the server shutting down
            response.status = "cancelled"
        else:
            response.status = "completed"
        response.usage = ResponseUsage.of(len(submitted[0].prompt_ids),
                                          choice.num_output_tokens, choice.num_cached_tokens)
        response.usage.output_tokens_details.reasoning_tokens = self.chat.reasoning_tokens(
            job.chat, choice.token_ids, submitted[0].prompt_ids)
        return response

    async def create(self, job: ResponseJob, submitted: list[Submitted],
                     response_id: str) -> ResponseObject:
        choice = Choice()
        async for _, out in merged(self.chat.engine, submitted):
            raise_if_failed(out)
            choice.absorb(out)
        response = self._finish(job, self._skeleton(job, response_id), choice, submitted)
        response.output = self._answer_items(job, choice, submitted[0].prompt_ids)
        for item in response.output:
            item.status = response.item_status
        self._keep(job, response)
        return response

    async def stream(self, job: ResponseJob, submitted: list[Submitted],
                     response_id: str) -> AsyncIterator[bytes]:
        """The response's events, ending with response.completed (whatever the status, as
        vLLM's; the SDK's stream helper waits for that one), or with an error event."""
        events, read = _Events(self._skeleton(job, response_id)), False
        try:
            yield events.lifecycle("response.created")
            yield events.lifecycle("response.in_progress")
            try:
                async for frame in self._output_events(job, submitted, events):
                    yield frame
            except Exception as e:  # noqa: BLE001 - after the 200, told in the stream
                yield events.error(failure_message(e))
            read = True
        finally:
            if not read:  # (closed before its outputs were read: merged() never ran)
                abort_all(self.chat.engine, submitted)

    async def _output_events(self, job: ResponseJob, submitted: list[Submitted],
                             events: _Events) -> AsyncIterator[bytes]:
        request, choice = job.chat, Choice()
        named = (request.tool_choice.function.name
                 if isinstance(request.tool_choice, NamedToolChoice) else None)
        held = self.chat.holds_back(request)
        item: OutputItem | None = None  # the item being streamed
        thinking = self.chat.reasoning_split(request, submitted[0].prompt_ids)
        thought: OutputReasoning | None = None  # its item, open while it streams
        async for _, out in merged(self.chat.engine, submitted):
            raise_if_failed(out)
            if thinking is not None:  # the thinking as its item; the rest is `out`
                reasoning, _, out = thinking.split(out)
                if reasoning:
                    if thought is None:
                        thought = _reasoning()
                        yield events.open(thought)
                    yield events.reasoning(thought, reasoning)
                if thought is not None and thinking.in_content and (
                        thought.status == "in_progress"):
                    yield events.close(thought, "completed")
            choice.absorb(out)
            if named is not None:  # the named tool's arguments, as they come
                if item is None and out.text:
                    item = _call(named)
                    yield events.open(item)
                if out.text:
                    yield events.arguments(item, out.text)
                continue
            piece = held.release(choice, out)
            text, lps = piece.text, piece.logprobs or []
            if text or lps:  # (a token of no text: eos, a piece of a character, one a stop
                # string may end with, still has its logprob)
                if item is None:
                    item = _message()
                    yield events.open(item)
                yield events.text(item, text, self._logprobs(job, lps))
        response = self._finish(job, events.response, choice, submitted)
        if thought is not None and thought.status == "in_progress":  # (cut while thinking)
            yield events.close(thought, response.item_status)
        if named is not None and item is None:  # (no arguments at all)
            item = _call(named)
            yield events.open(item)
        items = [] if named is not None else self._answer_items(job, choice)
        if item is not None:  # (the named call, or a message)
            if named is None and held.held is not False:  # text streamed, then held back:
                # the rest of it, else (its calls follow) the logprobs not sent
                rest, lps = held.rest(self.chat.answer(request, choice)[0], choice)
                if rest or lps:
                    yield events.text(item, rest or "", self._logprobs(job, lps))
            yield events.close(item, response.item_status)
            items = [i for i in items if not isinstance(i, OutputMessage)]  # (streamed)
        for whole in items:  # what was not streamed: the whole of it now
            yield events.whole(whole, response.item_status)
        self._keep(job, response)  # (before the last event: a client may send the next turn)
        yield events.lifecycle("response.completed")


class _Events:
    """A response's stream: events numbered in order (sequence_number), each framed as
    `event: <type>` and `data: <json>`; the items streamed become the response's output."""

    def __init__(self, response: ResponseObject) -> None:
        self.response, self.sequence = response, 0
        self._index: dict[str, int] = {}  # item id -> output_index

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": self.sequence, **fields},
                          ensure_ascii=False, separators=(",", ":"))
        self.sequence += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def lifecycle(self, kind: str) -> bytes:
        return self._event(kind, response=self.response.model_dump(mode="json"))

    def error(self, message: str) -> bytes:
        return self._event("error", code="server_error", message=message, param=None)

    def _where(self, item: OutputItem) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": self._index[item.id]}

    def open(self, item: OutputItem) -> bytes:
        """The item added, in progress (a message with its one text part, empty)."""
        self._index[item.id] = len(self.response.output)
        self.response.output.append(item)
        shown = {**item.model_dump(mode="json"), "status": "in_progress"}
        if isinstance(item, OutputMessage | OutputReasoning):
            shown["content"] = []
        added = self._event("response.output_item.added", output_index=self._index[item.id],
                            item=shown)
        if isinstance(item, OutputFunctionCall):
            return added
        part = ({"type": "reasoning_text", "text": ""} if isinstance(item, OutputReasoning)
                else {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        return added + self._event("response.content_part.added", **self._where(item),
                                   content_index=0, part=part)

    def reasoning(self, item: OutputReasoning, delta: str) -> bytes:
        item.content[0].text += delta
        return self._event("response.reasoning_text.delta", **self._where(item),
                           content_index=0, delta=delta)

    def text(self, item: OutputMessage, delta: str,
             logprobs: list[ChatCompletionTokenLogprob] | None) -> bytes:
        part = item.content[0]
        part.text += delta
        if logprobs is not None:  # (extended, not copied: a token at a time)
            if part.logprobs is None:
                part.logprobs = []
            part.logprobs.extend(logprobs)
        return self._event("response.output_text.delta", **self._where(item), content_index=0,
                           delta=delta, logprobs=[lp.model_dump() for lp in logprobs or ()])

    def arguments(self, item: OutputFunctionCall, delta: str) -> bytes:
        item.arguments += delta
        return self._event("response.function_call_arguments.delta", **self._where(item),
                           delta=delta)

    def close(self, item: OutputItem, status: ItemStatus) -> bytes:
        """The item's text or arguments done, then the item, in its final status."""
        item.status, where = status, self._where(item)
        if isinstance(item, OutputMessage):
            part = item.content[0]
            logprobs = [lp.model_dump() for lp in part.logprobs or ()]
            done = (self._event("response.output_text.done", **where, content_index=0,
                                text=part.text, logprobs=logprobs)
                    + self._event("response.content_part.done", **where, content_index=0,
                                  part=part.model_dump(mode="json")))
        elif isinstance(item, OutputReasoning):
            thought = item.content[0]
            done = (self._event("response.reasoning_text.done", **where, content_index=0,
                                text=thought.text)
                    + self._event("response.content_part.done", **where, content_index=0,
                                  part=thought.model_dump(mode="json")))
        else:
            done = self._event("response.function_call_arguments.done", **where,
                               name=item.name, arguments=item.arguments)
        return done + self._event("response.output_item.done",
                                  output_index=where["output_index"],
                                  item=item.model_dump(mode="json"))

    def whole(self, item: OutputItem, status: ItemStatus) -> bytes:
        """A finished item's events at once: added, its text or arguments, done. The item
        is emptied and refilled through the events, so that what they carry and the item in
        the final response are one."""
        if isinstance(item, OutputMessage):
            part = item.content[0]
            text, logprobs = part.text, part.logprobs
            part.text, part.logprobs = "", None
            frames = self.open(item) + (self.text(item, text, logprobs) if text else b"")
        elif isinstance(item, OutputReasoning):
            text, item.content[0].text = item.content[0].text, ""
            frames = self.open(item) + self.reasoning(item, text)
        else:
            arguments, item.arguments = item.arguments, ""
            frames = self.open(item) + self.arguments(item, arguments)
        return frames + self.close(item, status)
