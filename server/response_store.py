"""The Responses API's stored responses (`--responses-store N`): the last N, in this process's
memory, for `previous_response_id` and GET / DELETE /v1/responses/{id}.

Each response keeps its own turn only (its input items and its output, as items); a
conversation is rebuilt by following `previous_response_id` back, so a long chain costs
memory in proportion to its length, not its square. N counts turns: a conversation of more
than N turns cannot be continued (its oldest turn goes first). Besides the count, the text
held is capped (TEXT_BUDGET): a turn's input may be megabytes. Replicas behind a load
balancer each keep their own: a chain continues only on the replica that holds it. Used from
the event loop only: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from server.protocol.responses_api import InputItem, ResponseObject

TEXT_BUDGET = 256 * 2**20  # characters of the stored items' JSON, in all, whatever N


class ResponseNotFound(LookupError):
    """A response id this server does not hold (HTTP 404); `param` names the field, `code`
    is OpenAI's for an unknown previous_response_id."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = "previous_response_not_found" if param == "previous_response_id" else None


def _text_size(item: InputItem) -> int:
    return len(item.model_dump_json())


@dataclass(slots=True)
class StoredResponse:
    """A finished response and its turn as the next one reads it (its input items, then its
    output as items); and its request's input, as sent (GET .../input_items)."""

    response: ResponseObject
    items: list[InputItem]
    inputs: list[InputItem] = field(default_factory=list)  # (items' objects, but a continued
    # answer's begun message: that one is merged into the output's)
    size: int = field(init=False)  # characters held, for TEXT_BUDGET

    def __post_init__(self) -> None:
        self.size = sum(map(_text_size, self.items)) + len(self.response.model_dump_json())


class ResponseStore:
    """The last `capacity` responses stored (and at most TEXT_BUDGET characters of them), the
    least recently used dropped first."""

    def __init__(self, capacity: int, text_budget: int = TEXT_BUDGET) -> None:
        if capacity < 1:
            raise ValueError(f"a response store holds at least 1 response, got {capacity}")
        self.capacity, self.text_budget = capacity, text_budget
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._responses)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._responses

    def put(self, stored: StoredResponse) -> None:
        """Keep a response (ids are unique: the caller names them so), dropping the least
        recently used beyond the count or the text budget (never the one just put)."""
        response_id = stored.response.id
        if response_id in self._responses:
            raise ValueError(f"response {response_id!r} is stored already")
        self._responses[response_id] = stored
        self._size += stored.size
        while len(self._responses) > 1 and (len(self._responses) > self.capacity
                                            or self._size > self.text_budget):
            _, dropped = self._responses.popitem(last=False)
            self._size -= dropped.size

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        stored = self._responses.get(response_id)
        if stored is None:
            raise ResponseNotFound(f"Response with id {response_id!r} not found (deleted, or "
                                   f"dropped: this server keeps the last {self.capacity}).",
                                   param)
        self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self._size -= self.get(response_id).size
        del self._responses[response_id]

    def conversation(self, response_id: str, param: str) -> list[InputItem]:
        """The items of the response's turn and of every turn before it, oldest first; the
        turns are then the most recently used, the oldest first (so that, dropped, a chain
        loses its first turn, not a middle one)."""
        chain = [self.get(response_id, param)]
        while (previous := chain[-1].response.previous_response_id) is not None:
            if previous not in self._responses:
                raise ResponseNotFound(
                    f"Response {response_id!r} continues {previous!r}, which is no longer "
                    f"stored (deleted, or dropped: this server keeps the last "
                    f"{self.capacity} turns): send the conversation as input instead", param)
            chain.append(self._responses[previous])
        for stored in reversed(chain):
            self._responses.move_to_end(stored.response.id)
        return [item for stored in reversed(chain) for item in stored.items]
