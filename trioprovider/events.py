"""The internal event stream of one model request, between the agent and the wire formats.

An agent's replies (``model_stream_chunk``, ``model_result``, ``model_error``) become these
events in :class:`ReplyTranslator`; each wire format (OpenAI SSE, Ollama NDJSON, a single JSON
answer) only ever sees events. Pure: no I/O, no clocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from trioprovider.errors import ApiError
from trioprovider.protocol import Delta, ModelError, ModelResult, ModelStreamChunk, Reply, Usage
from trioprovider.tokens import tokens_for_chars


@dataclass(slots=True)
class DeltaEvent:
    """New output: text, reasoning or tool-call fragments (OpenAI delta shape)."""

    delta: Delta


@dataclass(slots=True)
class Finished:
    finish_reason: str
    usage: Usage


@dataclass(slots=True)
class Failed:
    error: ApiError


@dataclass(slots=True)
class Heartbeat:
    """The agent has been silent for a while; wire formats that can, say so to keep the line alive."""


Event = Union[DeltaEvent, Finished, Failed, Heartbeat]


def delta_tokens(delta: Delta) -> int:
    """Estimated completion tokens in one delta (for metering while the answer streams)."""
    size = len(delta.content or "") + len(delta.reasoning_content or "")
    for call in delta.tool_calls or ():
        function = call.get("function") or {}
        size += len(function.get("name") or "") + len(function.get("arguments") or "")
    return tokens_for_chars(size)


class ReplyTranslator:
    """Turns one request's agent replies into events.

    A streamed answer's ``model_result`` repeats the text the chunks carried, so it only
    contributes its usage and finish reason; an agent that did not stream sends everything in
    the result, which then becomes one delta.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.streamed = False
        self.saw_tool_calls = False
        self._finish_reason: str | None = None

    def feed(self, reply: Reply) -> list[Event]:
        if isinstance(reply, ModelStreamChunk):
            return self._chunk(reply)
        if isinstance(reply, ModelResult):
            return self._result(reply)
        if isinstance(reply, ModelError):
            return [Failed(ApiError.from_agent(reply))]
        raise TypeError(f"not a reply: {type(reply).__name__}")

    def _chunk(self, reply: ModelStreamChunk) -> list[Event]:
        if reply.chunk.finish_reason:
            self._finish_reason = reply.chunk.finish_reason
        delta = reply.chunk.delta
        if not (delta.content or delta.reasoning_content or delta.tool_calls):
            return []
        self.streamed = True
        if delta.tool_calls:
            self.saw_tool_calls = True
            # Clients (Void among them) key fragments by index; agents may leave it out.
            for fragment in delta.tool_calls:
                fragment.setdefault("index", 0)
        self.completion_tokens += delta_tokens(delta)
        return [DeltaEvent(delta)]

    def _result(self, reply: ModelResult) -> list[Event]:
        events: list[Event] = []
        choice: dict[str, Any] = reply.choices[0] if reply.choices else {}
        if not self.streamed:
            delta = _delta_of_choice(choice)
            if delta.content or delta.reasoning_content or delta.tool_calls:
                self.saw_tool_calls = bool(delta.tool_calls)
                self.completion_tokens += delta_tokens(delta)
                events.append(DeltaEvent(delta))
        finish_reason = (
            choice.get("finish_reason")
            or self._finish_reason
            or ("tool_calls" if self.saw_tool_calls else "stop")
        )
        usage = reply.usage or Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )
        events.append(Finished(finish_reason, usage))
        return events


def _delta_of_choice(choice: dict[str, Any]) -> Delta:
    """The whole answer of a non-streamed choice (chat ``message`` or completion ``text``)."""
    message = choice.get("message") or {}
    tool_calls = message.get("tool_calls")
    fragments = None
    if tool_calls:
        fragments = []
        for index, call in enumerate(tool_calls):
            function = call.get("function") or {}
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments if arguments is not None else {})
            fragments.append(
                {
                    "index": index,
                    "id": call.get("id") or f"call_{index}",
                    "type": "function",
                    "function": {"name": function.get("name", ""), "arguments": arguments},
                }
            )
    content = message.get("content")
    if content is None:
        content = choice.get("text")
    return Delta(
        content=content if isinstance(content, str) and content else None,
        reasoning_content=message.get("reasoning_content") or None,
        tool_calls=fragments,
    )
