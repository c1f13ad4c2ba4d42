"""The echo reference agent: deterministic answers for tests, demos and benchmarks.

It answers with the words of the request (the last user message, or the completion prompt)
repeated to ``tokens`` tokens, one word per stream chunk, each after ``delay`` seconds, so a test can
predict every byte with :func:`echo_text`. Offered tools, it calls the first one (see
:func:`wants_tool_call`), streaming the call the way OpenAI does, so clients' tool handling can be
tested end to end. When the client does not stream (``invoke.stream`` false) nothing reaches it
before the end anyway, so the agent skips the chunks (still taking ``delay`` per token) and sends
the whole answer in its ``model_result``, as the protocol allows.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import trio

from trioprovider.agents.runner import AnswerStream, text_choice, usage_of
from trioprovider.protocol import ModelCard, ModelInvoke, ModelResult
from trioprovider.tokens import estimate_prompt_tokens, message_text, tokens_for_chars


def echo_source(invoke: ModelInvoke) -> str:
    """The text the echo agent repeats: the last user (or tool result) message, or the prompt."""
    if invoke.kind == "completion":
        return invoke.prompt or ""
    for message in reversed(invoke.messages or []):
        if message.get("role") in ("user", "tool"):
            return message_text(message)
    return ""


def _echo_words(source: str, count: int) -> itertools.islice[str]:
    return itertools.islice(itertools.cycle(source.split() or ["echo"]), count)


def echo_tokens(source: str, count: int) -> list[str]:
    """The ``count`` tokens of the echo answer to ``source``: its words, cycled, space-joined."""
    return [word if i == 0 else " " + word for i, word in enumerate(_echo_words(source, count))]


def echo_text(source: str, count: int) -> str:
    """The whole echo answer: ``"".join(echo_tokens(source, count))``."""
    return " ".join(_echo_words(source, count))


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
            ModelCard(id=name, context_window=131_072, supports_tools=True, supports_fim=True)
            for name in (models or ["echo"])
        ]
        self.max_concurrency = max_concurrency
        #: (request id, trio.current_time()) of every request cancelled mid-answer; the event is
        #: set at the first one.
        self.cancelled: list[tuple[str, float]] = []
        self.cancel_arrived = trio.Event()

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        try:
            if wants_tool_call(invoke):
                return await self._call_tool(invoke, out)
            return await self._echo(invoke, out)
        except trio.Cancelled:
            self.cancelled.append((invoke.id, trio.current_time()))
            self.cancel_arrived.set()
            raise

    async def _echo(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        count = self.tokens if invoke.max_tokens is None else min(self.tokens, invoke.max_tokens)
        finish_reason = "length" if count < self.tokens else "stop"
        if invoke.stream:
            tokens = echo_tokens(echo_source(invoke), count)
            for token in tokens:
                if self.delay:
                    await trio.sleep(self.delay)
                await out.text(token)
            text = "".join(tokens)
        else:
            # Nothing reaches the client before the end: the whole text, after its tokens' time.
            for _ in range(count if self.delay else 0):
                await trio.sleep(self.delay)
            text = echo_text(echo_source(invoke), count)
        return self._result(invoke, text_choice(invoke, text, finish_reason), count)

    async def _call_tool(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        """Call the first tool offered, with ``{"text": <the user's message>}``, in fragments the
        way OpenAI streams them: id and name once, then the arguments in pieces."""
        assert invoke.tools
        name = invoke.tools[0].get("function", {}).get("name", "tool")
        arguments = json.dumps({"text": echo_source(invoke)})
        call_id = f"call_{invoke.id[-8:]}"
        if invoke.stream:
            await out.tool_call_fragment({"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
        for start in range(0, len(arguments), 8):
            if self.delay:
                await trio.sleep(self.delay)
            if invoke.stream:
                await out.tool_call_fragment({"index": 0, "function": {"arguments": arguments[start : start + 8]}})
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        choice = {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}, "finish_reason": "tool_calls"}
        return self._result(invoke, choice, tokens_for_chars(len(arguments)))

    def _result(self, invoke: ModelInvoke, choice: dict[str, Any], completion_tokens: int) -> ModelResult:
        prompt_tokens = estimate_prompt_tokens(invoke.messages, invoke.prompt)
        return ModelResult(id=invoke.id, choices=[choice], usage=usage_of(prompt_tokens, completion_tokens))


def wants_tool_call(invoke: ModelInvoke) -> bool:
    """The echo agent calls a tool when tools are offered and the user spoke last; once the
    tool's result comes back (a ``tool`` message last), it echoes that result."""
    if invoke.kind != "chat" or not invoke.tools or invoke.tool_choice == "none" or not invoke.messages:
        return False
    return invoke.messages[-1].get("role") == "user"
