"""The Responses API's stored responses (`--responses-store N`): the last N, in this process's
memory, for `previous_response_id` and GET / DELETE /v1/responses/{id}.

Each response keeps its own turn only (its input items and its output, as items); a
conversation is rebuilt by following `previous_response_id` back, so a long chain costs
memory in proportion to its length, not its square. Replicas behind a load balancer each keep
their own: a chain continues only on the replica that holds it (route by session). Used from
the event loop only: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.protocol.responses_api import InputItem, ResponseObject


class ResponseNotFound(LookupError):
    """A response id this server does not hold (HTTP 404); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class StoredResponse:
    response: ResponseObject
    items: list[InputItem]  # this turn: its input, then its output as the next turn sees it


class ResponseStore:
    """The last `capacity` responses stored, the least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a response store holds at least 1 response, got {capacity}")
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.response.id] = stored
        self._responses.move_to_end(stored.response.id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        stored = self._responses.get(response_id)
        if stored is None:
            raise ResponseNotFound(f"Response with id {response_id!r} not found (this server "
                                   f"keeps the last {self.capacity}).", param)
        self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._responses[response_id]

    def conversation(self, response_id: str, param: str) -> list[InputItem]:
        """The items of the response's turn and of every turn before it, oldest first."""
        turns: list[list[InputItem]] = []
        seen: set[str] = set()
        next_id: str | None = response_id
        while next_id is not None:
            if next_id in seen:  # a response named after a repeated X-Request-Id
                raise ResponseNotFound(f"Response {response_id!r}'s conversation loops back to "
                                       f"{next_id!r} (a repeated X-Request-Id)", param)
            seen.add(next_id)
            try:
                stored = self.get(next_id, param)
            except ResponseNotFound:
                if not turns:
                    raise
                raise ResponseNotFound(
                    f"Response {response_id!r} continues {next_id!r}, which is no longer "
                    f"stored (this server keeps the last {self.capacity}): send the "
                    "conversation as input instead", param) from None
            turns.append(stored.items)
            next_id = stored.response.previous_response_id
        return [item for turn in reversed(turns) for item in turn]
