"""Requests in flight over one peer connection, multiplexed by request id."""

from __future__ import annotations

import datetime as dt
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import trio

from trioprovider.protocol import (
    AgentInfo,
    ModelCard,
    ModelError,
    ModelInvoke,
    ModelResult,
    Reply,
)

#: Replies buffered per request before the connection's reader has to wait for the requester.
#: Bounded, so a slow client cannot grow memory; large enough that a momentary backlog (a busy
#: CPU) never makes the reader wait, since while it waits every request on the connection does.
REPLY_BUFFER = 256


#: How a request waits while queued for an agent (see Bridge.start_call): it is handed the wait.
QueuedWait = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]


class Delivery(enum.Enum):
    DELIVERED = "delivered"
    UNKNOWN = "unknown"  # no such request in flight (already finished, cancelled, or never sent)
    STALLED = "stalled"  # the requester stopped reading; the request was dropped


class NoAgent(Exception):
    """No connected agent serves this model (or the bridge is unreachable)."""


class Overloaded(Exception):
    """Every agent for this model is at its ``max_concurrency`` and the queue is full."""


class Call:
    """One model request in flight: its agent's replies and a way to cancel it.

    Iterating yields replies until one ends the request. If the agent goes away first, the last
    reply is a synthetic ``model_error`` with code ``agent_disconnected``, so a requester never
    waits on a reply that cannot come.

    The replies wait in a deque (at most :data:`REPLY_BUFFER`, see :meth:`CallTable.deliver`)
    rather than a memory channel: every streamed token passes here, and a channel's send,
    receive and empty-handed ``receive_nowait`` (an exception) cost more than the rest of the
    hand-over. One requester reads; the connection's reader (or an in-process agent's task)
    puts.
    """

    def __init__(self, request_id: str, cancel: Callable[[str, str], Awaitable[None]]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        #: The requester is done: it took the reply that ended the answer, or cancelled.
        self.finished = False
        self._replies: deque[Reply] = deque()
        #: No more replies will be put (the answer ended, or the agent left).
        self._closed = False
        self._arrival = trio.lowlevel.ParkingLot()  # the requester, waiting for a reply
        self._space = trio.lowlevel.ParkingLot()  # deliverers, waiting for the requester
        self._wake: Callable[[], None] | None = None
        self._interrupted = False

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Reply:
        if self.finished:
            raise StopAsyncIteration
        if self._replies or self._closed:
            await trio.lowlevel.checkpoint()
        while not (self._replies or self._closed or self.finished):
            await self._arrival.park()
        if self.finished:  # cancelled meanwhile (from another task)
            raise StopAsyncIteration
        return self._next()

    async def receive_batch(self) -> list[Reply]:
        """The next replies: at least one, and every one that has arrived by then (several
        chunks can then share one write to the client); empty once the answer has ended, or
        when :meth:`interrupt` ended the wait first."""
        if self._replies or self._closed:
            await trio.lowlevel.checkpoint()
        while not (self._replies or self._closed or self.finished or self._interrupted):
            await self._arrival.park()
        self._interrupted = False
        return self.ready()

    def interrupt(self) -> None:
        """End the requester's wait in :meth:`receive_batch` (now, or its next one) with what
        has arrived, even nothing: it has something else to do (a heartbeat is due). One timer
        in another task that calls this costs less than a timeout on every wait for a token."""
        self._interrupted = True
        if self._arrival:
            self._arrival.unpark()

    def ready(self) -> list[Reply]:
        """The replies that have arrived, without waiting: empty when none has (or the answer
        has ended). A reader that finds some needs no schedule point or timeout to take them."""
        batch: list[Reply] = []
        while not self.finished and (self._replies or self._closed):
            batch.append(self._next())
        if batch:
            self._interrupted = False  # what is taken now goes out: no need to interrupt a wait
        return batch

    def wake_on_arrival(self, wake: Callable[[], None] | None) -> None:
        """Call ``wake`` (once, in the deliverer's task) when the next reply arrives or no more
        can come; None: forget it. For a requester that waits on something else meanwhile
        (its client, see :mod:`trioprovider.client_watch`) and takes the replies with
        :meth:`ready` once woken."""
        self._wake = wake

    def _next(self) -> Reply:
        if self._replies:
            reply = self._replies.popleft()
            if self._space:
                self._space.unpark()
        else:
            reply = self._agent_left()
        if isinstance(reply, (ModelResult, ModelError)):
            self._done()
        return reply

    def _done(self) -> None:
        self.finished = True
        self._replies.clear()
        self._space.unpark_all()  # a deliverer waiting for room: nobody will read
        self._arrived()  # a reader waiting (cancel() called from another task): nothing comes

    def _agent_left(self) -> ModelError:
        return ModelError(
            id=self.request_id,
            code="agent_disconnected",
            message="the agent disconnected before finishing the answer",
            retryable=True,
        )

    async def cancel(self, reason: str) -> None:
        """Tell the agent to stop (once; a no-op after the answer ended)."""
        if not self.finished:
            self._done()
            await self._cancel(self.request_id, reason)

    # -- the agent's side (see CallTable) ---------------------------------------------------

    async def _offer(self, reply: Reply, stall_timeout: float) -> bool:
        """Put ``reply``, waiting up to ``stall_timeout`` for room; False if there was none
        (the requester stopped reading). Dropped if the call was let go meanwhile."""
        if self._put_nowait(reply):
            return True
        with trio.move_on_after(stall_timeout):
            while len(self._replies) >= REPLY_BUFFER and not (self.finished or self._closed):
                await self._space.park()
        if self._closed:
            return True  # let go meanwhile (cancelled, or its agent left)
        return self._put_nowait(reply)

    def _put_nowait(self, reply: Reply) -> bool:
        """Put ``reply`` if there is room (True), else False. Dropped (True) if the requester
        has already left."""
        if self.finished:
            return True
        if len(self._replies) >= REPLY_BUFFER:
            return False
        self._replies.append(reply)
        self._arrived()
        return True

    def _close(self) -> None:
        """No more replies will come (after the last one, if any, has been taken)."""
        if not self._closed:
            self._closed = True
            self._space.unpark_all()  # a deliverer waiting for room: the call is let go
            self._arrived()

    def _arrived(self) -> None:
        if self._arrival:
            self._arrival.unpark()
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake()


class CallTable:
    """The requests in flight on one connection, by request id."""

    def __init__(self) -> None:
        self._open: dict[str, Call] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._open

    def open(self, request_id: str, cancel: Callable[[str, str], Awaitable[None]]) -> Call:
        """A new call; ``cancel(request_id, reason)`` tells the agent to stop."""
        if request_id in self._open:
            raise ValueError(f"request id {request_id!r} is already in flight")
        call = self._open[request_id] = Call(request_id, cancel)
        return call

    def close(self, request_id: str) -> bool:
        """Forget a request; True if it was in flight (so the caller owns telling the agent)."""
        call = self._open.pop(request_id, None)
        if call is None:
            return False
        call._close()
        return True

    def close_all(self) -> None:
        for call in self._open.values():
            call._close()
        self._open.clear()

    def deliver_nowait(self, reply: Reply) -> Delivery | None:
        """:meth:`deliver` when there is room for the reply, with no wait (every token passes
        here); None when its call's buffer is full: then await :meth:`deliver`."""
        call = self._open.get(reply.id)
        if call is None:
            return Delivery.UNKNOWN
        if not call._put_nowait(reply):
            return None
        if isinstance(reply, (ModelResult, ModelError)):
            del self._open[reply.id]
            call._close()
        return Delivery.DELIVERED

    async def deliver(self, reply: Reply, stall_timeout: float) -> Delivery:
        call = self._open.get(reply.id)
        if call is None:
            return Delivery.UNKNOWN
        terminal = isinstance(reply, (ModelResult, ModelError))
        if terminal:
            del self._open[reply.id]
        try:
            # One stalled client must not stall every other request on this connection for
            # long: its call waits a bounded time for room, then the request is dropped.
            if not await call._offer(reply, stall_timeout):
                self._open.pop(reply.id, None)
                call._close()
                return Delivery.STALLED
        finally:
            if terminal:
                call._close()
        return Delivery.DELIVERED


class Resolution(enum.Enum):
    SERVED = "served"
    UNKNOWN_MODEL = "unknown_model"
    NO_AGENTS = "no_agents"


def resolve(model: str, served: Sequence[Iterable[ModelCard]], default_model: str) -> Resolution:
    """Whether a model can be served by the connected agents (``served``: each agent's models).

    The configured default model is served by any agent when none advertises it by name.
    """
    if not served:
        return Resolution.NO_AGENTS
    if model == default_model or any(card.id == model for cards in served for card in cards):
        return Resolution.SERVED
    return Resolution.UNKNOWN_MODEL


def catalog(agents: list[AgentInfo], default_model: str) -> list[ModelCard]:
    """Every model the agents advertise, once each, plus the default model."""
    cards: dict[str, ModelCard] = {}
    for agent in agents:
        for card in agent.models:
            cards.setdefault(card.id, card)
    if default_model not in cards:
        # The default borrows the capabilities of whatever agent would serve it.
        first = next(iter(cards.values()), None)
        cards[default_model] = (
            first.model_copy(update={"id": default_model}) if first else ModelCard(id=default_model)
        )
    return list(cards.values())


class Bridge(Protocol):
    """What the provider needs of the bridge, embedded (:class:`BridgeHub`) or remote."""

    def agents(self) -> list[AgentInfo]:
        ...

    def resolve(self, model: str) -> Resolution:
        ...

    async def wait_for_agents(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for at least one agent; True if there is one."""
        ...

    def saturated(self, model: str) -> bool:
        """True if a request for ``model`` would be refused as overloaded right now."""
        ...

    async def start_call(self, invoke: ModelInvoke, *, queued: QueuedWait | None = None) -> Call:
        """Send a request to an agent that serves its model; raises NoAgent or Overloaded.

        If the request has to wait in the queue for a free agent, the wait goes through
        ``queued(wait)`` (the requester's way to keep watching its client meanwhile)."""
        ...

    async def aclose(self) -> None:
        """Close every bridge connection with a proper close handshake (shutdown)."""
        ...

    def connection(self) -> dict[str, Any]:
        """The bridge link for ``/health``: ``status``, ``last_ping`` (ISO time or None), more."""
        ...


def iso_time(timestamp: float | None) -> str | None:
    """A wall-clock timestamp as ISO 8601 UTC (milliseconds), for ``/health``."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")
