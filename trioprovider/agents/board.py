"""The request board of the Cursor IDE agent: pure bookkeeping, no I/O, no clock of its own.

A request the bridge hands to the IDE agent is *posted* (pending, with a pickup deadline), then
*taken* by a ``wait_for_request`` tool call (in progress), and *ended* one of four ways: submitted,
failed, expired (nobody took it in time) or cancelled (its client went away, or the bridge
connection dropped). Ended requests are remembered for a while, so that a tool call on one gets
a precise answer ("it was cancelled") instead of "unknown request".

:func:`render_request` turns a ``model_invoke`` into the JSON that ``wait_for_request`` returns.
"""

from __future__ import annotations

import enum
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from trioprovider.protocol import ModelInvoke
from trioprovider.tokens import message_text

#: How many ended requests the board remembers (oldest forgotten first).
ENDED_MEMORY = 1024


class Ending(enum.Enum):
    SUBMITTED = "submitted"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class Posting:
    """A request on the board."""

    invoke: ModelInvoke
    posted_at: float
    pickup_deadline: float

    @property
    def request_id(self) -> str:
        return self.invoke.id


class RequestBoard:
    """Pending requests (oldest first), the ones in progress, and how recent ones ended.

    Every method takes the current time from its caller, so the board can be tested without
    a clock and the async shell decides what "now" is (``trio.current_time()``).
    """

    def __init__(self, pickup_timeout: float, *, ended_memory: int = ENDED_MEMORY) -> None:
        self.pickup_timeout = pickup_timeout
        self.pending: OrderedDict[str, Posting] = OrderedDict()
        self.in_progress: dict[str, Posting] = {}
        self.ended: OrderedDict[str, Ending] = OrderedDict()
        self._ended_memory = ended_memory

    def post(self, invoke: ModelInvoke, now: float) -> Posting:
        if invoke.id in self.pending or invoke.id in self.in_progress:
            raise ValueError(f"request {invoke.id} is already on the board")
        self.ended.pop(invoke.id, None)
        posting = Posting(invoke, posted_at=now, pickup_deadline=now + self.pickup_timeout)
        self.pending[invoke.id] = posting
        return posting

    def take(self, now: float) -> Posting | None:
        """The oldest pending request still within its pickup deadline, now in progress.

        Requests whose deadline has passed are ended as expired on the way.
        """
        while self.pending:
            request_id, posting = self.pending.popitem(last=False)
            if now >= posting.pickup_deadline:
                self._end(request_id, Ending.EXPIRED)
                continue
            self.in_progress[request_id] = posting
            return posting
        return None

    def expire_unclaimed(self, request_id: str) -> bool:
        """At its pickup deadline: True if nobody took the request (it is now expired)."""
        if self.pending.pop(request_id, None) is not None:
            self._end(request_id, Ending.EXPIRED)
        return self.ended.get(request_id) is Ending.EXPIRED

    def end(self, request_id: str, how: Ending) -> str | None:
        """End an in-progress request (submit or fail); or why that is not possible."""
        refusal = self.refusal(request_id)
        if refusal is None:
            del self.in_progress[request_id]
            self._end(request_id, how)
        return refusal

    def abandon(self, request_id: str) -> None:
        """The request's answer task is gone: if the request had not ended, it was cancelled."""
        if self.pending.pop(request_id, None) is not None or self.in_progress.pop(request_id, None) is not None:
            self._end(request_id, Ending.CANCELLED)

    def cancelled_late(self, request_id: str) -> None:
        """An ending that the answer task could no longer deliver: it was cancelled first."""
        self.in_progress.pop(request_id, None)
        self._end(request_id, Ending.CANCELLED)

    def refusal(self, request_id: str) -> str | None:
        """None if a tool may answer ``request_id`` now; else a sentence saying why not."""
        if request_id in self.in_progress:
            return None
        if request_id in self.pending:
            return f"request {request_id} has not been picked up yet: call wait_for_request first"
        ending = self.ended.get(request_id)
        if ending is Ending.CANCELLED:
            return (
                f"request {request_id} was cancelled (its client disconnected or its time ran out); "
                "stop working on it and call wait_for_request for the next one"
            )
        if ending is Ending.EXPIRED:
            return (
                f"request {request_id} expired: nobody picked it up within {self.pickup_timeout:g} s, "
                "and its client got an error"
            )
        if ending is not None:
            return f"request {request_id} is already finished ({ending.value}); call wait_for_request for the next one"
        return f"there is no request {request_id!r}; call wait_for_request for the next one"

    def _end(self, request_id: str, how: Ending) -> None:
        self.ended[request_id] = how
        self.ended.move_to_end(request_id)
        while len(self.ended) > self._ended_memory:
            self.ended.popitem(last=False)


HOW_TO_ANSWER = {
    "chat": (
        "You are the model. Write the assistant's next message for this conversation. Stream it with "
        "send_chunk(request_id, text) if it is long, and end it with submit_response(request_id, text) "
        "(the last part, may be empty); or fail_request(request_id, message) if you cannot answer."
    ),
    "completion": (
        "You are a code completion model. Write only the text that goes between prompt and suffix "
        "(no explanations, no code fences) and send it with submit_response(request_id, text); or "
        "fail_request(request_id, message) if you cannot."
    ),
}


def render_request(invoke: ModelInvoke) -> dict[str, Any]:
    """What ``wait_for_request`` returns for a request: readable, and complete enough to answer."""
    rendered: dict[str, Any] = {
        "status": "request",
        "request_id": invoke.id,
        "model": invoke.model,
        "kind": invoke.kind,
    }
    if invoke.kind == "chat":
        rendered["conversation"] = [render_message(message) for message in invoke.messages or []]
    else:
        rendered["prompt"] = invoke.prompt or ""
        rendered["suffix"] = invoke.suffix or ""
    parameters = {
        "max_tokens": invoke.max_tokens,
        "temperature": invoke.temperature,
        "top_p": invoke.top_p,
        "stop": invoke.stop,
        "stream": invoke.stream,
    }
    rendered["parameters"] = {name: value for name, value in parameters.items() if value is not None}
    rendered["how_to_answer"] = HOW_TO_ANSWER[invoke.kind]
    return rendered


def render_message(message: dict[str, Any]) -> dict[str, Any]:
    """One chat message as ``{"role", "content"}`` text, with tool calls and results spelled out."""
    rendered: dict[str, Any] = {"role": str(message.get("role", "user"))}
    name = message.get("name")
    if name:
        rendered["name"] = name
    rendered["content"] = message_text(message)
    if message.get("tool_call_id"):
        rendered["tool_call_id"] = message["tool_call_id"]
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append({"id": call.get("id"), "name": function.get("name"), "arguments": arguments})
    if calls:
        rendered["tool_calls"] = calls
    return rendered
