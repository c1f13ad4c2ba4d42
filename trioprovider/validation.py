"""Size bounds on a model request, checked on its ``model_invoke`` (both wire formats)."""

from __future__ import annotations

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
