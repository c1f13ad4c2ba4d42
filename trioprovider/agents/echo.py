"""The echo reference agent: deterministic answers for tests, demos and benchmarks.

It answers with the words of the request (the last user message, or the completion prompt)
repeated to ``tokens`` tokens, one word per stream chunk, each after ``delay`` seconds, so a test can
predict every byte with :func:`echo_text`.
"""

from __future__ import annotations

import itertools

import trio

from trioprovider.agents.runner import AnswerStream
from trioprovider.protocol import ModelCard, ModelInvoke, ModelResult, Usage
from trioprovider.tokens import estimate_prompt_tokens, message_text


def echo_source(invoke: ModelInvoke) -> str:
    """The text the echo agent repeats: the last user message, or the prompt."""
    if invoke.kind == "completion":
        return invoke.prompt or ""
    for message in reversed(invoke.messages or []):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def echo_tokens(source: str, count: int) -> list[str]:
    """The ``count`` tokens of the echo answer to ``source``: its words, cycled, space-joined."""
    words = source.split() or ["echo"]
    cycled = itertools.islice(itertools.cycle(words), count)
    return [word if i == 0 else " " + word for i, word in enumerate(cycled)]


def echo_text(source: str, count: int) -> str:
    return "".join(echo_tokens(source, count))


class EchoAgent:
    """Answers every request with :func:`echo_tokens`; honours ``max_tokens`` and cancel."""

    def __init__(
        self,
        *,
        tokens: int = 24,
        delay: float = 0.0,
        models: list[str] | None = None,
        max_concurrency: int = 16,
        agent_id: str = "echo",
    ) -> None:
        self.agent_id = agent_id
        self.tokens = tokens
        self.delay = delay
        self.models = [
            ModelCard(id=name, context_window=131_072, supports_tools=False, supports_fim=True)
            for name in (models or ["echo"])
        ]
        self.max_concurrency = max_concurrency
        #: (request id, trio.current_time()) of every request cancelled mid-answer; the event is
        #: set at the first one.
        self.cancelled: list[tuple[str, float]] = []
        self.cancel_arrived = trio.Event()

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        count = self.tokens if invoke.max_tokens is None else min(self.tokens, invoke.max_tokens)
        finish_reason = "length" if count < self.tokens else "stop"
        tokens = echo_tokens(echo_source(invoke), count)
        try:
            for token in tokens:
                if self.delay:
                    await trio.sleep(self.delay)
                await out.text(token)
        except trio.Cancelled:
            self.cancelled.append((invoke.id, trio.current_time()))
            self.cancel_arrived.set()
            raise
        text = "".join(tokens)
        prompt_tokens = estimate_prompt_tokens(invoke.messages, invoke.prompt)
        if invoke.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["finish_reason"] = finish_reason
        return ModelResult(
            id=invoke.id,
            choices=[choice],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=count,
                total_tokens=prompt_tokens + count,
            ),
        )
