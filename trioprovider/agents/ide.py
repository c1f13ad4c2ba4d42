"""The Cursor IDE agent: bridge requests wait on a board until the IDE agent's tool calls answer them.

Two sides share one :class:`IdeAgent` in one process. The bridge side is :meth:`IdeAgent.answer`
(run by :func:`~trioprovider.agents.runner.serve_agent`, one task per request): it posts the
request, waits for it to be picked up, then streams what the tools push until a submit or a
fail. The tool side is :meth:`wait_for_request`, :meth:`send_chunk`, :meth:`submit_response` and
:meth:`fail_request`, called by the MCP shell (:mod:`trioprovider.agents.mcp_stdio`); a call
that cannot act raises :class:`Refusal` with a sentence for the IDE agent.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from trioprovider.agents.board import Ending, RequestBoard, render_request
from trioprovider.agents.runner import AgentFailure, AnswerStream, text_choice, usage_of
from trioprovider.protocol import Delta, ModelCard, ModelInvoke, ModelResult
from trioprovider.tokens import estimate_prompt_tokens, tokens_for_chars

#: The longest ``wait_for_request`` long-poll: Cursor gives up on a tool call after 60 s.
MAX_WAIT = 50.0
#: Replies a tool may queue for one request before it waits for the client to read.
REPLY_BUFFER = 16

#: Called while ``wait_for_request`` waits: (seconds waited, seconds it will wait, message).
Progress = Callable[[float, float, str], Awaitable[None]]


class Refusal(Exception):
    """A tool call that cannot act on its request; ``str()`` tells the IDE agent why."""


@dataclass(slots=True)
class _Reply:
    kind: Literal["picked_up", "chunk", "submit", "fail"]
    text: str = ""


class IdeAgent:
    """An :class:`~trioprovider.agents.runner.Agent` whose answers come from MCP tool calls."""

    def __init__(
        self,
        *,
        models: list[str] | None = None,
        pickup_timeout: float = 20.0,
        wait_timeout: float = 25.0,
        max_concurrency: int = 4,
        progress_interval: float = 5.0,
        agent_id: str = "cursor-ide",
    ) -> None:
        self.agent_id = agent_id
        self.models = [
            ModelCard(id=name, context_window=200_000, supports_tools=False, supports_fim=True)
            for name in (models or ["cursor-ide"])
        ]
        self.max_concurrency = max_concurrency
        self.wait_timeout = min(wait_timeout, MAX_WAIT)
        self.progress_interval = progress_interval
        self.board = RequestBoard(pickup_timeout)
        self._replies: dict[str, trio.MemorySendChannel[_Reply]] = {}
        # Replaced each time it is set: waiters hold the one that was current when they looked.
        self._posted = trio.Event()
        #: Set when the bridge connection has failed for good: every wait_for_request says so.
        self.bridge_problem: str | None = None

    # -- the bridge side ---------------------------------------------------------------------

    def bridge_failed(self, problem: str) -> None:
        """The bridge connection has failed for good: every ``wait_for_request`` says ``problem``."""
        self.bridge_problem = problem
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._posted.set()
        self._posted = trio.Event()

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        send, receive = trio.open_memory_channel[_Reply](REPLY_BUFFER)
        posting = self.board.post(invoke, trio.current_time())
        self._replies[invoke.id] = send
        self._wake_waiters()
        try:
            picked_up = False
            with trio.move_on_at(posting.pickup_deadline):
                await receive.receive()  # picked_up: nothing else can arrive before it
                picked_up = True
            if not picked_up and self.board.expire_unclaimed(invoke.id):
                raise AgentFailure(
                    "pickup_timeout",
                    f"the Cursor IDE agent did not pick up the request within {self.board.pickup_timeout:g} s; "
                    "is Cursor's agent serving (the trioprovider-serve rule, calling wait_for_request in a loop)?",
                    retryable=True,
                )
            # An empty chunk tells the provider the request is being worked on, so its
            # first-token deadline does not cut off an IDE agent that is still thinking.
            await out.send(Delta())
            return await self._relay(invoke, receive, out)
        finally:
            # All synchronous: no tool call can take the request between these lines.
            self.board.abandon(invoke.id)
            del self._replies[invoke.id]
            receive.close()

    async def _relay(
        self, invoke: ModelInvoke, receive: trio.MemoryReceiveChannel[_Reply], out: AnswerStream
    ) -> ModelResult:
        parts: list[str] = []
        async for reply in receive:
            if reply.kind == "fail":
                raise AgentFailure("ide_agent_failed", f"the Cursor IDE agent failed the request: {reply.text}")
            if reply.text:
                parts.append(reply.text)
                await out.text(reply.text)
            if reply.kind == "submit":
                return _result(invoke, "".join(parts))
        raise AssertionError("the reply channel closed while its request was open")  # pragma: no cover

    # -- the tool side -----------------------------------------------------------------------

    async def wait_for_request(self, timeout_s: float | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """The next pending request (rendered), or ``{"status": "idle"}`` after ``timeout_s``."""
        timeout = self.wait_timeout if timeout_s is None or math.isnan(timeout_s) else timeout_s
        timeout = max(0.0, min(timeout, MAX_WAIT))
        started = trio.current_time()
        deadline = started + timeout
        # At least a few reports, even in a short wait: the caller sees it is alive.
        interval = min(self.progress_interval, timeout / 4)
        while True:
            if self.bridge_problem is not None:
                raise Refusal(self.bridge_problem)
            posted = self._posted
            posting = self.board.take(trio.current_time())
            if posting is not None:
                self._replies[posting.request_id].send_nowait(_Reply("picked_up"))
                return render_request(posting.invoke)
            now = trio.current_time()
            if now >= deadline:
                return {"status": "idle", "waited_s": round(now - started, 1)}
            with trio.move_on_at(min(deadline, now + interval)):
                await posted.wait()
            if progress is not None and not posted.is_set():
                waited = trio.current_time() - started
                await progress(waited, timeout, f"waiting for a request ({waited:.0f} of {timeout:g} s)")

    async def send_chunk(self, request_id: str, text: str) -> dict[str, Any]:
        refusal = self.board.refusal(request_id)
        if refusal is not None:
            raise Refusal(refusal)
        await self._deliver(request_id, _Reply("chunk", text))
        return {"status": "sent", "request_id": request_id, "chars": len(text)}

    async def submit_response(self, request_id: str, text: str) -> dict[str, Any]:
        await self._end(request_id, Ending.SUBMITTED, _Reply("submit", text))
        return {"status": "submitted", "request_id": request_id}

    async def fail_request(self, request_id: str, message: str) -> dict[str, Any]:
        await self._end(request_id, Ending.FAILED, _Reply("fail", message))
        return {"status": "failed", "request_id": request_id}

    async def _end(self, request_id: str, how: Ending, reply: _Reply) -> None:
        # Ended on the board at once, so a call racing this one is told the request is finished.
        refusal = self.board.end(request_id, how)
        if refusal is not None:
            raise Refusal(refusal)
        channel = self._replies[request_id]
        try:
            await self._deliver(request_id, reply, channel)
        except Refusal:
            self.board.cancelled_late(request_id)
            raise Refusal(self.board.refusal(request_id) or "") from None

    async def _deliver(
        self, request_id: str, reply: _Reply, channel: trio.MemorySendChannel[_Reply] | None = None
    ) -> None:
        channel = channel or self._replies[request_id]
        try:
            # Waits while the reply buffer is full: a slow client slows its IDE agent down.
            await channel.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The answer task ended while this call waited: it was cancelled.
            raise Refusal(
                self.board.refusal(request_id) or f"request {request_id} was cancelled while this call waited"
            ) from None


def _result(invoke: ModelInvoke, text: str) -> ModelResult:
    prompt_tokens = estimate_prompt_tokens(invoke.messages, invoke.prompt)
    completion_tokens = tokens_for_chars(len(text))
    return ModelResult(id=invoke.id, choices=[text_choice(invoke, text)], usage=usage_of(prompt_tokens, completion_tokens))
