"""Size bounds on a request, checked on its model_invoke (pure)."""

from __future__ import annotations

import pytest

from trioprovider.errors import ApiError
from trioprovider.protocol import ModelInvoke
from trioprovider.validation import SizeLimits, check_sizes

LIMITS = SizeLimits(max_messages=3, max_content_bytes=10, max_total_bytes=25)


def chat(*contents: object, **message: object) -> ModelInvoke:
    messages = [{"role": "user", "content": content, **message} for content in contents]
    return ModelInvoke(id="r", session_id="s", model="m", messages=messages)


@pytest.mark.parametrize(
    ("invoke", "param"),
    [
        (chat("a", "b", "c", "d"), "messages"),
        (chat("é" * 6), "messages.0.content"),  # 12 bytes of UTF-8, though 6 characters
        (chat([{"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 6}]), "messages.0.content"),
        (chat("x" * 9, "y" * 9, "z" * 9), "messages"),
        (chat("", tool_calls=[{"function": {"name": "f", "arguments": "{" + "1" * 10 + "}"}}]), "messages.0.tool_calls"),
        (ModelInvoke(id="r", session_id="s", model="m", kind="completion", prompt="p" * 11), "prompt"),
        (ModelInvoke(id="r", session_id="s", model="m", kind="completion", prompt="p" * 9, suffix="s" * 11), "suffix"),
        (ModelInvoke(id="r", session_id="s", model="m", kind="completion", prompt="p" * 10, suffix="s" * 10), None),
    ],
)
def test_each_bound_names_its_field(invoke: ModelInvoke, param: str | None) -> None:
    if param is None:
        check_sizes(invoke, LIMITS)  # 20 bytes in all, 10 each: within every bound
        return
    with pytest.raises(ApiError) as refused:
        check_sizes(invoke, LIMITS)
    assert refused.value.status == 400 and refused.value.param == param


def test_odd_shapes_are_measured_not_crashed_on() -> None:
    check_sizes(chat(None, tool_calls=True), LIMITS)
    check_sizes(chat("ok", tool_calls=[1, {"function": {"arguments": {"a": 1}}}]), LIMITS)
