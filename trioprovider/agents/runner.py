"""The agent side of the bridge protocol, shared by every agent.

An agent implements :class:`Agent` (``answer`` one request, streaming through an
:class:`AnswerStream`); :func:`serve_agent` does the rest: hello, one task per request,
``max_concurrency``, ``model_cancel`` (cancels that task), and turning failures into
``model_error``. :func:`run_agent` connects over WebSocket and reconnects. An agent with start-up
work or resources to hold while it serves (an HTTP client, a model list to fetch) has a
``running()`` async context manager; whoever runs the agent enters it first (:func:`lifetime`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio
import trio_websocket

from trioprovider.bridge.streams import (
    LocalMessageStream,
    MessageStream,
    PeerClosed,
    WebSocketMessageStream,
    cancel_when_silent,
)
from trioprovider.logs import about, current_request_id
from trioprovider.protocol import (
    PROTOCOL_VERSION,
    AgentHello,
    Chunk,
    Delta,
    HelloAck,
    HelloReject,
    Message,
    ModelCancel,
    ModelCard,
    ModelError,
    ModelInvoke,
    ModelResult,
    ModelStreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

#: ``ModelStreamChunk.model_validate`` without its options (see AnswerStream._send_fields).
_validate_chunk: Callable[[dict[str, Any]], ModelStreamChunk] = ModelStreamChunk.__pydantic_validator__.validate_python


class AgentFailure(Exception):
    """Raised by an agent to end a request with a ``model_error``."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class AgentRejected(Exception):
    """The bridge refused this agent's hello (bad token, unsupported version)."""


class AgentStartError(Exception):
    """An agent cannot start (its upstream is unreachable, say); ``str()`` is one line saying why."""


class AnswerStream:
    """Where an agent streams one answer."""

    def __init__(self, request_id: str, stream: MessageStream) -> None:
        self._id = request_id
        self._stream = stream

    async def send(self, delta: Delta, finish_reason: str | None = None) -> None:
        chunk = Chunk(delta=delta, finish_reason=finish_reason)
        await self._stream.send(
            ModelStreamChunk(id=self._id, chunk=chunk, finished=finish_reason is not None)
        )

    async def text(self, content: str) -> None:
        await self._send_fields({"content": content})

    async def reasoning(self, text: str) -> None:
        await self._send_fields({"reasoning_content": text})

    async def _send_fields(self, delta: dict[str, Any]) -> None:
        # Once a token: the frame is validated once, from plain values, rather than as three
        # models each validated on its own (Delta, Chunk, the frame), and by the model's own
        # validator: model_validate passes it seven keyword options, all unset, which in
        # pydantic 2.13 doubles the cost (3.2 against 1.6 us).
        await self._stream.send(_validate_chunk({"id": self._id, "chunk": {"delta": delta}}))

    async def tool_call_fragment(self, fragment: dict[str, Any]) -> None:
        await self.send(Delta(tool_calls=[fragment]))


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def text_choice(invoke: ModelInvoke, text: str, finish_reason: str = "stop") -> dict[str, Any]:
    """The one choice of a text answer, in the shape of the request's kind."""
    if invoke.kind == "chat":
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "finish_reason": finish_reason}


class Agent(Protocol):
    agent_id: str
    models: list[ModelCard]
    max_concurrency: int

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        """Answer one request, streaming through ``out``; the result carries the usage.

        Cancellation (``model_cancel``) arrives as ``trio.Cancelled``: stop and let it propagate.
        """
        ...


def lifetime(agent: Agent) -> AbstractAsyncContextManager[object]:
    """The agent's ``running()`` context if it has one, else an empty one. Enter it before
    serving, and serve inside it; it may raise :class:`AgentStartError`."""
    running = getattr(agent, "running", None)
    return running() if callable(running) else contextlib.nullcontext()


class InFlight:
    """The requests an agent is answering, each with the cancel scope of its task."""

    def __init__(self) -> None:
        self._scopes: dict[str, trio.CancelScope] = {}
        self._emptied = trio.Event()

    def __len__(self) -> int:
        return len(self._scopes)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._scopes

    def add(self, request_id: str, scope: trio.CancelScope) -> None:
        self._scopes[request_id] = scope

    def pop(self, request_id: str) -> trio.CancelScope | None:
        scope = self._scopes.pop(request_id, None)
        if not self._scopes:
            self._emptied.set()
        return scope

    def discard(self, request_id: str, scope: trio.CancelScope) -> None:
        """Forget ``request_id`` if ``scope`` is still its task's (not a newer request's)."""
        if self._scopes.get(request_id) is scope:
            self.pop(request_id)

    async def wait_empty(self) -> None:
        while self._scopes:
            self._emptied = trio.Event()
            await self._emptied.wait()


async def serve_agent(agent: Agent, stream: MessageStream, token: str, *, stopping: trio.Event | None = None) -> None:
    """Serve requests from the bridge on ``stream`` until either side closes it.

    Once ``stopping`` is set (the agent's process was asked to stop), new requests are refused
    with a retryable ``shutdown`` error, the answers in flight run to their end, and then it
    returns (whoever opened the connection closes it, as :func:`run_agent` does).
    """
    await stream.send(
        AgentHello(
            id=f"hello-{agent.agent_id}",
            protocol_version=PROTOCOL_VERSION,
            agent_id=agent.agent_id,
            token=token,
            models=agent.models,
            max_concurrency=agent.max_concurrency,
        )
    )
    reply = await stream.receive()
    if isinstance(reply, HelloReject):
        raise AgentRejected(reply.reason)
    if not isinstance(reply, HelloAck):
        raise AgentRejected(f"expected hello_ack, got {reply.type}")
    log.info("agent %r registered with the bridge (%s)", agent.agent_id, stream.peer)

    in_flight = InFlight()
    async with trio.open_nursery() as nursery:

        async def refuse(invoke: ModelInvoke, code: str, why: str) -> None:
            with contextlib.suppress(PeerClosed):  # the reader hears of it too
                await stream.send(ModelError(id=invoke.id, code=code, message=f"agent {agent.agent_id!r} {why}", retryable=True))

        async def take(message: Message) -> None:
            if isinstance(message, ModelInvoke):
                if stopping is not None and stopping.is_set():
                    await refuse(message, "shutdown", "is stopping")
                elif message.id in in_flight or len(in_flight) >= agent.max_concurrency:
                    await refuse(message, "overloaded", "is at max_concurrency")
                else:
                    scope = trio.CancelScope()
                    in_flight.add(message.id, scope)
                    nursery.start_soon(_answer, agent, stream, message, scope, in_flight)
            elif isinstance(message, ModelCancel):
                # Forget it now, not when its task winds down, so its slot is free for the
                # request the bridge may send right behind this cancel.
                cancelled = in_flight.pop(message.id)
                if cancelled is not None:
                    log.debug("agent: request %s cancelled (%s)", message.id, message.reason, extra=about(message.id))
                    cancelled.cancel()
            else:
                log.debug("agent: ignoring %s", message.type)

        if stopping is not None:
            nursery.start_soon(_close_when_drained, agent, stopping, in_flight, nursery.cancel_scope)

        if isinstance(stream, LocalMessageStream):
            # In process, the bridge's messages are taken in the sender's task as it sends
            # them: a request starts its answer at once, not one scheduling pass per message
            # behind every other request's (at 500 streams the last one waited seconds).
            stream.inbox = take
        try:
            while True:
                try:
                    message = await stream.receive()
                except PeerClosed:
                    break
                await take(message)
        finally:
            if isinstance(stream, LocalMessageStream):
                stream.inbox = None
            nursery.cancel_scope.cancel()


async def _close_when_drained(agent: Agent, stopping: trio.Event, in_flight: InFlight, connection: trio.CancelScope) -> None:
    await stopping.wait()
    log.info("agent %r stopping: finishing %d answer(s) in flight, taking no new ones", agent.agent_id, len(in_flight))
    await in_flight.wait_empty()
    # Every answer's last message is out: stop reading, and serve_agent returns.
    connection.cancel()


async def _answer(
    agent: Agent,
    stream: MessageStream,
    invoke: ModelInvoke,
    scope: trio.CancelScope,
    in_flight: InFlight,
) -> None:
    # This task's own context: what the agent logs while answering carries the request id.
    current_request_id.set(invoke.id)
    try:
        with scope:
            try:
                result = await agent.answer(invoke, AnswerStream(invoke.id, stream))
            except AgentFailure as failure:
                await stream.send(
                    ModelError(
                        id=invoke.id,
                        code=failure.code,
                        message=failure.message,
                        retryable=failure.retryable,
                    )
                )
            except PeerClosed:
                raise
            except Exception as error:
                log.exception("agent %r failed on request %s", agent.agent_id, invoke.id)
                await stream.send(
                    ModelError(id=invoke.id, code="agent_error", message=f"agent error: {error}")
                )
            else:
                result.id = invoke.id
                await stream.send(result)
    except PeerClosed:
        pass
    finally:
        in_flight.discard(invoke.id, scope)


async def run_agent(
    agent: Agent,
    url: str,
    token: str,
    *,
    reconnect_delay: float = 2.0,
    reconnect_attempts: int | None = None,
    max_frame_bytes: int = 8 * 1024 * 1024,
    heartbeat_interval: float = 30.0,
    stopping: trio.Event | None = None,
) -> None:
    """Connect to the bridge at ``url`` and serve; reconnect after a lost connection.

    ``reconnect_attempts`` bounds consecutive failed connects (None: keep trying). A rejected
    hello is final: retrying with the same token cannot succeed. Once ``stopping`` is set, the
    answers in flight finish (see :func:`serve_agent`) and it returns instead of reconnecting.
    """
    if stopping is None:
        stopping = trio.Event()
    failures = 0
    while not stopping.is_set():
        try:
            async with trio_websocket.open_websocket_url(
                url, max_message_size=max_frame_bytes, connect_timeout=10, disconnect_timeout=2
            ) as ws:
                failures = 0
                stream = WebSocketMessageStream(ws)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_silent, stream, heartbeat_interval, nursery.cancel_scope)
                    await serve_agent(agent, stream, token, stopping=stopping)
                    nursery.cancel_scope.cancel()
            if stopping.is_set():
                return
            log.warning("agent %r: bridge closed the connection", agent.agent_id)
        except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, PeerClosed) as error:
            if stopping.is_set():
                return
            failures += 1
            log.warning("agent %r: cannot reach the bridge at %s (%s)", agent.agent_id, url, error)
            if reconnect_attempts is not None and failures > reconnect_attempts:
                raise
        with trio.move_on_after(reconnect_delay):
            await stopping.wait()

