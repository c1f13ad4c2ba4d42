"""Gathering a whole answer from its events, for clients that asked for no stream."""

from __future__ import annotations

from typing import Any

from trioprovider.errors import ApiError
from trioprovider.events import DeltaEvent, Event, Failed, Finished
from trioprovider.protocol import Usage


class Answer:
    """Everything a request's events said, joined: text, reasoning, tool calls, end."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.error: ApiError | None = None

    def feed(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DeltaEvent):
                delta = event.delta
                if delta.content:
                    self._content.append(delta.content)
                if delta.reasoning_content:
                    self._reasoning.append(delta.reasoning_content)
                for fragment in delta.tool_calls or ():
                    self._merge_tool_call(fragment)
            elif isinstance(event, Finished):
                self.finish_reason = event.finish_reason
                self.usage = event.usage
            elif isinstance(event, Failed):
                self.error = event.error

    def _merge_tool_call(self, fragment: dict[str, Any]) -> None:
        # OpenAI streams a call as fragments with one index: id and name once, arguments in
        # pieces to concatenate.
        call = self._tool_calls.setdefault(
            fragment.get("index", 0),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if fragment.get("id"):
            call["id"] = fragment["id"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [self._tool_calls[index] for index in sorted(self._tool_calls)]
