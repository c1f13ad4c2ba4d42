"""The provider's link to an external bridge (``mcp.embedded_bridge = false``).

Connects as a provider peer, learns the agents from ``catalog`` messages, multiplexes requests
by id over the one connection, and reconnects after losing it. Implements ``Bridge``.
"""

from __future__ import annotations

import logging
from functools import partial

from typing import Any

import trio
import trio_websocket

from trioprovider.bridge.calls import Call, CallTable, Delivery, NoAgent, QueuedWait, Resolution, iso_time, resolve
from trioprovider.bridge.streams import (
    MessageStream,
    PeerClosed,
    WebSocketMessageStream,
    cancel_when_silent,
)
from trioprovider.protocol import (
    PROTOCOL_VERSION,
    AgentInfo,
    Catalog,
    HelloAck,
    HelloReject,
    ModelCancel,
    ModelError,
    ModelInvoke,
    ModelResult,
    ModelStreamChunk,
    ProviderHello,
)

log = logging.getLogger(__name__)


class BridgeRejected(Exception):
    """The bridge refused our hello (wrong token or version): retrying cannot help."""


class RemoteBridge:
    def __init__(
        self,
        *,
        url: str,
        token: str,
        provider_id: str,
        default_model: str,
        connection_timeout: float = 30.0,
        heartbeat_interval: float = 30.0,
        reconnect_attempts: int = 5,
        reconnect_delay: float = 5.0,
        max_frame_bytes: int = 8 * 1024 * 1024,
        stall_timeout: float = 1.0,
    ) -> None:
        self.url = url
        self._token = token
        self.provider_id = provider_id
        self.default_model = default_model
        self.connection_timeout = connection_timeout
        self.heartbeat_interval = heartbeat_interval
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.max_frame_bytes = max_frame_bytes
        self.stall_timeout = stall_timeout
        self._stream: MessageStream | None = None
        self._agents: list[AgentInfo] = []
        self._calls = CallTable()
        self._changed = trio.Event()
        #: Why the link is down, for error messages; None while connected.
        self.problem: str | None = "not connected yet"

    # -- Bridge ------------------------------------------------------------------------------

    def agents(self) -> list[AgentInfo]:
        return list(self._agents)

    def resolve(self, model: str) -> Resolution:
        return resolve(model, [agent.models for agent in self._agents], self.default_model)

    def in_flight(self) -> int:
        return len(self._calls)

    def saturated(self, model: str) -> bool:
        # The bridge's queue is not visible from here; it answers 'overloaded' itself.
        return False

    async def wait_for_agents(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not self._agents:
                await self._changed.wait()
        return bool(self._agents)

    async def start_call(self, invoke: ModelInvoke, *, queued: QueuedWait | None = None) -> Call:
        # Nothing queues here: the bridge process queues a request its agents cannot take yet,
        # while the requester waits for replies (watching its client as it does).
        stream = self._stream
        if stream is None:
            raise NoAgent(f"the bridge at {self.url} is unreachable ({self.problem})")
        call = self._calls.open(invoke.id, partial(self._cancel, stream))
        try:
            await stream.send(invoke)
        except PeerClosed:
            self._calls.close(invoke.id)
            raise NoAgent(f"lost the bridge at {self.url}") from None
        except BaseException:
            with trio.move_on_after(1, shield=True):
                await call.cancel("client_disconnected")
            raise
        return call

    async def _cancel(self, stream: MessageStream, request_id: str, reason: str) -> None:
        if self._calls.close(request_id):
            try:
                await stream.send(ModelCancel(id=request_id, reason=reason))
            except PeerClosed:
                pass

    # -- the connection ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected; ``task_status`` is signalled after the first attempt, good or bad."""
        failures = 0
        started = _Once(task_status)
        while True:
            try:
                async with trio_websocket.open_websocket_url(
                    self.url,
                    max_message_size=self.max_frame_bytes,
                    connect_timeout=self.connection_timeout,
                    disconnect_timeout=2,
                ) as ws:
                    failures = 0
                    await self._serve(WebSocketMessageStream(ws), started)
                self.problem = "the bridge closed the connection"
            except BridgeRejected as rejected:
                self.problem = f"the bridge refused this provider: {rejected}"
                log.error("%s", self.problem)
                started()
                return
            except (
                OSError,
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                trio.TooSlowError,
                PeerClosed,
            ) as error:
                failures += 1
                self.problem = f"cannot connect: {error}"
            finally:
                self._lost()
            log.warning("bridge link: %s (%s)", self.problem, self.url)
            started()
            if failures == self.reconnect_attempts + 1:
                # Keep trying (a restarted bridge should be found again without restarting
                # the provider), but slower, and say so loudly once.
                log.error(
                    "bridge link: %d attempts failed; requests get 503 until it is back",
                    failures - 1,
                )
            slow_down = 1 if failures <= self.reconnect_attempts else 4
            await trio.sleep(self.reconnect_delay * slow_down)

    async def _serve(self, stream: MessageStream, started: _Once) -> None:
        with trio.fail_after(self.connection_timeout):
            await stream.send(
                ProviderHello(
                    id=f"hello-{self.provider_id}",
                    protocol_version=PROTOCOL_VERSION,
                    provider_id=self.provider_id,
                    token=self._token,
                )
            )
            reply = await stream.receive()
        if isinstance(reply, HelloReject):
            raise BridgeRejected(reply.reason)
        if not isinstance(reply, HelloAck):
            raise BridgeRejected(f"expected hello_ack, got {reply.type}")
        self._stream = stream
        self.problem = None
        log.info("bridge link: connected to %s", self.url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_silent, stream, self.heartbeat_interval, nursery.cancel_scope)
            while True:
                try:
                    message = await stream.receive()
                except PeerClosed:
                    break
                if isinstance(message, Catalog):
                    self._agents = message.agents
                    self._changed.set()
                    self._changed = trio.Event()
                    started()
                elif isinstance(message, (ModelStreamChunk, ModelResult, ModelError)):
                    if await self._calls.deliver(message, self.stall_timeout) is Delivery.STALLED:
                        try:
                            await stream.send(ModelCancel(id=message.id, reason="client_too_slow"))
                        except PeerClosed:
                            break
            nursery.cancel_scope.cancel()

    def connection(self) -> dict[str, Any]:
        stream = self._stream
        return {
            "status": "connected" if stream is not None else "disconnected",
            "url": self.url,
            "last_ping": iso_time(stream.last_seen if stream is not None else None),
            "problem": self.problem,
        }

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose(1001, "provider shutting down")

    def _lost(self) -> None:
        self._stream = None
        self._agents = []
        # Every request in flight ends with agent_disconnected (see Call).
        self._calls.close_all()
        self._changed.set()
        self._changed = trio.Event()


class _Once:
    """Signal a ``task_status`` the first time it is called; later calls do nothing."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status: trio.TaskStatus[None] | None = task_status

    def __call__(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None
