"""Message streams: what carries protocol messages between two peers.

Everything above this module talks in :mod:`trioprovider.protocol` messages; only here do they
become WebSocket frames. An embedded agent or provider uses :func:`local_stream_pair`, which
hands message objects across memory channels: the same protocol with no socket and no JSON.
The reader of a local end may even take its peer's messages in the sender's own task
(:attr:`LocalMessageStream.inbox`), saving the hop through a reader task per message.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio
import trio_websocket

from trioprovider import protocol
from trioprovider.protocol import Message

log = logging.getLogger(__name__)

#: Seconds a peer may leave one frame unread before its connection is dropped.
SEND_TIMEOUT = 10.0

#: WebSocket close codes (RFC 6455) we send.
CLOSE_POLICY = 1008  # bad token, bad hello, unknown version
CLOSE_PROTOCOL = 1002  # a frame that is not a valid message


#: The close code for a frame over ``max_frame_bytes`` (trio-websocket closes with it itself).
CLOSE_TOO_BIG = 1009


class PeerClosed(Exception):
    """The other side went away (closed, crashed, or stopped answering pings).

    ``code`` is the WebSocket close code when there was one (1009: it sent an oversize frame).
    """

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PeerMisbehaved(PeerClosed):
    """The other side sent something that is not a valid message; the stream is now closed."""


class MessageStream(Protocol):
    """A bidirectional stream of protocol messages to one peer."""

    @property
    def peer(self) -> str:
        """Who is on the other side, for logs."""
        ...

    #: Wall-clock time the peer was last heard from (a message or a pong); None: never.
    last_seen: float | None

    async def send(self, message: Message) -> None:
        """Send one message; raises :class:`PeerClosed` if the peer is gone."""
        ...

    async def receive(self) -> Message:
        """The next message; raises :class:`PeerClosed` when there is none to come."""
        ...

    async def watch_liveness(self, interval: float) -> None:
        """Return when the peer stops answering (checked every ``interval`` seconds)."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        ...


class WebSocketMessageStream:
    """Protocol messages as JSON text frames on a trio-websocket connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self.last_seen: float | None = None
        remote = ws.remote
        self.peer = (
            f"{remote.address}:{remote.port}" if isinstance(remote, trio_websocket.Endpoint) else str(remote)
        )

    async def send(self, message: Message) -> None:
        # Shielded: a write cancelled halfway would leave part of a frame on a connection that
        # many requests share. Bounded: a peer that stops reading loses the connection instead.
        with trio.move_on_after(SEND_TIMEOUT, shield=True) as waited:
            try:
                await self._ws.send_message(protocol.encode(message))
            except trio_websocket.ConnectionClosed as closed:
                raise PeerClosed(str(closed.reason)) from None
        if waited.cancelled_caught:
            await self.aclose(1001, "peer stopped reading")
            raise PeerClosed("peer stopped reading")
        await trio.lowlevel.checkpoint_if_cancelled()

    async def receive(self) -> Message:
        try:
            frame = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as closed:
            raise PeerClosed(str(closed.reason), closed.reason.code if closed.reason else None) from None
        self.last_seen = time.time()
        try:
            return protocol.decode(frame)
        except protocol.ProtocolError as error:
            log.warning("bridge: invalid frame from %s: %s", self.peer, error)
            await self.aclose(CLOSE_PROTOCOL, f"invalid frame: {error}"[:120])
            raise PeerMisbehaved(str(error)) from None

    async def watch_liveness(self, interval: float) -> None:
        # A ping is answered by the peer's WebSocket library, not its application code, so a
        # missing pong means a dead process or a dead network path, not a busy agent.
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as waited:
                try:
                    await self._ws.ping()
                except trio_websocket.ConnectionClosed:
                    return
            if waited.cancelled_caught:
                log.warning("bridge: %s missed a ping for %.1fs; dropping it", self.peer, interval)
                await self.aclose(1001, "ping timeout")
                return
            self.last_seen = time.time()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        # Bounded and shielded: closing is cleanup and must finish even while we are cancelled.
        with trio.move_on_after(1, shield=True):
            await self._ws.aclose(code, reason)


class LocalMessageStream:
    """One end of an in-process message stream (see :func:`local_stream_pair`)."""

    def __init__(
        self,
        peer: str,
        outgoing: trio.MemorySendChannel[Message],
        incoming: trio.MemoryReceiveChannel[Message],
    ) -> None:
        self.peer = peer
        self._outgoing = outgoing
        self._incoming = incoming
        self.last_seen: float | None = None
        self._closed = False
        #: The other end of the pair (set by :func:`local_stream_pair`).
        self._other: LocalMessageStream | None = None
        #: Set by this end's reader to take the peer's messages in the peer's own task, as
        #: the peer sends them, instead of from :meth:`receive`. It must not block for long
        #: (the sender waits for it) and may raise nothing but ``trio.Cancelled``.
        self.inbox: Callable[[Message], Awaitable[None]] | None = None

    async def send(self, message: Message) -> None:
        other = self._other
        if other is not None and other.inbox is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed or other._closed:
                raise PeerClosed("local peer closed")
            other.last_seen = time.time()
            await other.inbox(message)
            # A schedule point per message, as a channel send has: a sender in a loop still
            # lets everyone else run.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        try:
            await self._outgoing.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerClosed("local peer closed") from None

    async def receive(self) -> Message:
        try:
            message = await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise PeerClosed("local peer closed") from None
        self.last_seen = time.time()
        return message

    async def watch_liveness(self, interval: float) -> None:
        # An in-process peer cannot vanish without closing its channel ends.
        await trio.sleep(math.inf)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self._closed = True
        self.inbox = None
        self._outgoing.close()
        self._incoming.close()


async def cancel_when_silent(stream: MessageStream, interval: float, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (the peer's connection) once the peer stops answering pings."""
    await stream.watch_liveness(interval)
    scope.cancel()


def local_stream_pair(
    name_a: str = "local", name_b: str = "local", buffer: int = 64
) -> tuple[LocalMessageStream, LocalMessageStream]:
    """Two connected in-process message streams, bounded by ``buffer`` messages each way."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[Message](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[Message](buffer)
    a = LocalMessageStream(name_b, a_to_b_send, b_to_a_receive)
    b = LocalMessageStream(name_a, b_to_a_send, a_to_b_receive)
    a._other, b._other = b, a
    return a, b
