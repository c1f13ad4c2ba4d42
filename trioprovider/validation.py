"""Checks on a request body before anything acts on it: that it is JSON text, and the size
bounds of a model request (on its ``model_invoke``, both wire formats)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trioprovider.errors import invalid_request
from trioprovider.protocol import ModelInvoke


@dataclass(frozen=True)
class SizeLimits:
    """``security.max_messages``, ``max_content_bytes`` and ``max_total_content_bytes``."""

    max_messages: int
    max_content_bytes: int
    max_total_bytes: int


def _text_bytes(content: Any) -> int:
    """UTF-8 bytes of the text in a content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    if isinstance(content, list):
        return sum(_text_bytes(part.get("text")) for part in content if isinstance(part, dict))
    return 0


def check_sizes(invoke: ModelInvoke, limits: SizeLimits) -> None:
    """Raise a 400 naming the field if the request is beyond ``limits``; the text is not touched."""
    total = 0

    def count(size: int, field: str) -> None:
        nonlocal total
        if size > limits.max_content_bytes:
            raise invalid_request(
                f"{field} is {size} bytes; the limit is {limits.max_content_bytes} "
                "(security.max_content_bytes).",
                param=field,
            )
        total += size

    if invoke.messages is not None:
        if len(invoke.messages) > limits.max_messages:
            raise invalid_request(
                f"messages has {len(invoke.messages)} entries; the limit is {limits.max_messages} "
                "(security.max_messages).",
                param="messages",
            )
        for index, message in enumerate(invoke.messages):
            count(_text_bytes(message.get("content")), f"messages.{index}.content")
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    arguments = function.get("arguments")
                    count(_text_bytes(arguments if isinstance(arguments, str) else str(arguments)),
                          f"messages.{index}.tool_calls")
    if invoke.prompt is not None:
        count(_text_bytes(invoke.prompt), "prompt")
    if invoke.suffix is not None:
        count(_text_bytes(invoke.suffix), "suffix")
    if total > limits.max_total_bytes:
        raise invalid_request(
            f"The request carries {total} bytes of text; the limit is {limits.max_total_bytes} "
            "(security.max_total_content_bytes).",
            param="messages" if invoke.messages is not None else "prompt",
        )


def parse_json(data: bytes) -> Any:
    """A request body as JSON, or a 400 saying what is wrong with it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("The request body is not valid UTF-8.") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid_request(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    try:
        lone_surrogate = "\\u" in text and _has_lone_surrogate(body)
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    if lone_surrogate:
        # JSON may escape half a UTF-16 pair ("\ud800"); such a string is not text, cannot be
        # sent on to an agent as UTF-8, and would fail later as a 5xx.
        raise invalid_request("The request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False
