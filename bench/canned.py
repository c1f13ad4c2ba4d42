"""The answers every benchmark target gives: the same bytes from the mock upstream (the floor)
and the bare Hypercorn-Trio app (the ceiling), and the same text as the echo agent's.

The echo agent answers ``hello`` with ``hello`` repeated to its token count; the canned answers
are that text, whole (``chat.completion``) or one SSE record per token (``chat.completion.chunk``).
Three models select the pace of a streamed answer, so that proxies in front of the mock (which
pass the model name through) can be driven the same way:

- ``bench``: every token at once (throughput, latency, streaming);
- ``bench-slow``: one token every :data:`SLOW_TOKEN_DELAY` seconds (cancellation probes);
- ``bench-hold``: the first token, then nothing until the client leaves (idle streams, memory).
"""

from __future__ import annotations

import json
from typing import Any

TOKENS = 100
PROMPT = "hello"
SLOW_TOKEN_DELAY = 0.05
MODELS = ("bench", "bench-slow", "bench-hold")
CREATED = 1_700_000_000


def answer_tokens(count: int = TOKENS) -> list[str]:
    return [PROMPT if i == 0 else " " + PROMPT for i in range(count)]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def completion_body(model: str, count: int = TOKENS) -> bytes:
    """The non-streamed answer."""
    text = "".join(answer_tokens(count))
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1},
        }
    )


def _record(model: str, delta: dict[str, Any], finish_reason: str | None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + _dumps(chunk) + b"\n\n"


def stream_records(model: str, count: int = TOKENS) -> list[bytes]:
    """The streamed answer: one SSE record per token, then the finish record and ``[DONE]``."""
    records = []
    for i, token in enumerate(answer_tokens(count)):
        delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
        records.append(_record(model, delta, None))
    records.append(_record(model, {}, "stop") + b"data: [DONE]\n\n")
    return records


def models_body() -> bytes:
    return _dumps(
        {"object": "list", "data": [{"id": name, "object": "model", "created": CREATED, "owned_by": "bench"} for name in MODELS]}
    )


def chat_request(model: str, *, stream: bool, content: str = PROMPT) -> bytes:
    """The request body every client sends (``content`` carries a probe's marker)."""
    return _dumps({"model": model, "messages": [{"role": "user", "content": content}], "stream": stream})
