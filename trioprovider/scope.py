"""RequestScope: the nursery that owns one model request, and the response body that holds it.

One scope per model request, streaming or not::

    RequestScope nursery
    ├── agent stream   start the call, translate replies into events, enforce the deadlines,
    │                  and on any way out send model_cancel (shielded, bounded)
    └── heartbeat      a Heartbeat event while the agent is silent (streaming wire formats only)

Neither the rate meter nor the session watchdog is a task: the agent stream charges the meter
per delta and the scope settles it when it closes (``settle`` refunds the unused reservation),
and the session calls the scope's :meth:`~RequestScope.cancel` when it expires or is revoked
(a watcher registered for as long as the agent stream runs). Neither needs scheduling.

An answer that is not streamed needs no nursery: :meth:`RequestScope.run_to_end` runs the agent
stream in the request's own task and gathers its events in a list.

For a streamed answer the route returns before the answer streams: the HTTP layer
(:mod:`trioprovider.model_routes`) enters the scope around sending the body, in the request
task. Nothing yields from inside a nursery: events cross to the body through a bounded
memory channel.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import trio

from trioprovider.bridge.calls import Bridge, Call, NoAgent, Overloaded
from trioprovider.errors import ApiError
from trioprovider.events import DeltaEvent, Event, Failed, Finished, Heartbeat, ReplyTranslator
from trioprovider.protocol import ModelInvoke, Usage
from trioprovider.admission import Admission

log = logging.getLogger(__name__)

#: Events buffered between the agent stream and the client. Small on purpose: a slow client
#: slows its agent stream (and, beyond the bridge's stall timeout, is dropped).
EVENT_BUFFER = 16
#: How many ready events one write may carry: coalescing saves a send per chunk under load.
MAX_BATCH = 64
#: Bound on every cleanup step that runs while cancelled.
CLEANUP_TIMEOUT = 1.0
#: Seconds a client may leave the answer unread (socket and event buffers full) before the
#: request is stopped. Hypercorn's socket writes cannot be timed out from the app, so the
#: request is stopped from this side: the agent gets model_cancel, the admission is released.
CLIENT_STALL_TIMEOUT = 30.0


class ClientStalled(Exception):
    """The client stopped reading the answer."""

_FAILURE_BY_REASON = {
    "session_revoked": ApiError(409, "The session was revoked; the request was stopped.", code="session_revoked"),
    "session_expired": ApiError(409, "The session expired; the request was stopped.", code="session_expired"),
    "session_idle": ApiError(409, "The session ended; the request was stopped.", code="session_expired"),
    "shutdown": ApiError(503, "The server is shutting down.", code="shutdown"),
}


@dataclass(frozen=True)
class Deadlines:
    """``first_event``: seconds until the agent's first reply; ``total``: the whole answer."""

    first_event: float = math.inf
    total: float = math.inf


class EventSink(Protocol):
    """Where the agent stream puts events: the channel to the response body, or a list."""

    def send_nowait(self, event: Event) -> None:
        ...

    async def send(self, event: Event) -> None:
        ...

    def close(self) -> None:
        ...


class _Gathered:
    """The events of a request run to its end in the caller's task (see ``run_to_end``)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def send_nowait(self, event: Event) -> None:
        self.events.append(event)

    async def send(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class ScopeObserver(Protocol):
    """Who wants to know when scopes open and close (leak counts, metrics, audit)."""

    def scope_opened(self, scope: RequestScope) -> None:
        ...

    def scope_closed(self, scope: RequestScope) -> None:
        ...


class RequestScope:
    """Owns one model request from admission to its last byte; an async context manager.

    ``async with scope:`` starts the tasks; :meth:`receive_batch` hands out events until the
    request ends; leaving the block cancels whatever still runs and releases the session and
    the rate reservation, whichever way the request ended.
    """

    def __init__(
        self,
        bridge: Bridge,
        invoke: ModelInvoke,
        *,
        prompt_tokens: int,
        admission: Admission | None = None,
        deadlines: Deadlines = Deadlines(),
        heartbeat_interval: float | None = None,
        observer: ScopeObserver | None = None,
    ) -> None:
        self.bridge = bridge
        self.invoke = invoke
        self.admission = admission
        self.reservation = admission.reservation if admission is not None else None
        self.deadlines = deadlines
        self.heartbeat_interval = heartbeat_interval
        self._observer = observer
        self.translator = ReplyTranslator(prompt_tokens)
        #: Events on their way to the response body; opened by ``__aenter__`` (a request run
        #: to its end in one task needs none).
        self._receive: trio.MemoryReceiveChannel[Event] | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._agent_scope = trio.CancelScope()
        self._guard_scope = trio.CancelScope()
        #: Why the request is being stopped, once something decides to stop it.
        self.cancel_reason: str | None = None
        self.started_at = 0.0
        self.first_event_at: float | None = None
        self.finished_at: float | None = None
        #: "completed", "failed", "cancelled" (client went away), or a cancel reason.
        self.outcome = "cancelled"
        #: The error code the client was given, if the request failed.
        self.error_code: str | None = None
        #: When something first decided to stop the request, and when its model_cancel went out
        #: (metrics: how fast a stop reaches the agent).
        self.stopping_at: float | None = None
        self.cancel_sent_at: float | None = None
        #: The usage the client was told, once the answer finished.
        self.usage: Usage | None = None
        self._last_event_at = 0.0
        self._closed = False

    # -- lifetime ----------------------------------------------------------------------------

    def _open(self) -> None:
        self.started_at = self._last_event_at = trio.current_time()
        self._agent_scope.deadline = self.started_at + min(
            self.deadlines.first_event, self.deadlines.total
        )
        if self._observer is not None:
            self._observer.scope_opened(self)

    async def run_to_end(self) -> list[Event]:
        """Run the request to its end in the calling task and return all its events.

        For an answer that is not streamed (no heartbeats): nothing reaches the client before
        the end, so the agent stream needs no task of its own and no channel. The same
        deadlines, session watch, model_cancel on the way out and release as ``async with``.
        """
        gathered = _Gathered()
        self._open()
        try:
            await self._agent_stream(gathered)
        finally:
            self.release()
        return gathered.events

    async def __aenter__(self) -> RequestScope:
        manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        # No checkpoint from here to the return: the nursery is either fully set up or never
        # entered, so __aexit__ (which closes it) always matches.
        self._nursery_manager, self._nursery = manager, nursery
        self._open()
        send, self._receive = trio.open_memory_channel[Event](EVENT_BUFFER)
        nursery.start_soon(self._agent_stream, send.clone())
        if self.heartbeat_interval:
            nursery.start_soon(self._heartbeat, send.clone(), self.heartbeat_interval)
        send.close()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            self.release()

    def release(self) -> None:
        """Release what the request held; synchronous, so it cannot be cancelled halfway."""
        if self._closed:
            return
        self._closed = True
        if self._receive is not None:
            self._receive.close()
        now = trio.current_time()
        if self.finished_at is None:
            self.finished_at = now
        if self.admission is not None:
            self.admission.release(now)
        if self._observer is not None:
            self._observer.scope_closed(self)

    def cancel(self, reason: str) -> None:
        """Stop the request for ``reason``; the client gets a terminal record saying why."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.stopping_at is None:
            self.stopping_at = trio.current_time()
        self._agent_scope.cancel()

    # -- what the response reads -------------------------------------------------------------

    async def receive_batch(self) -> list[Event]:
        """The next events (at least one, all that are ready); ``StopAsyncIteration`` at the end."""
        assert self._receive is not None, "receive_batch needs `async with scope`"
        try:
            batch = [await self._receive.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    # -- tasks -------------------------------------------------------------------------------

    async def _agent_stream(self, events: EventSink) -> None:
        call: Call | None = None
        session = self.admission.session if self.admission is not None else None
        if session is not None:
            # Before the first checkpoint: a session that ends from here on stops the request.
            session.watch(self.cancel)
        try:
            try:
                failure: ApiError | None = None
                try:
                    with self._agent_scope:
                        try:
                            call = await self.bridge.start_call(self.invoke)
                        except NoAgent as error:
                            failure = ApiError(503, str(error), code="no_agent")
                        except Overloaded as error:
                            failure = ApiError(503, str(error), code="overloaded")
                        else:
                            await self._relay(call, events)
                    if self._agent_scope.cancelled_caught:
                        failure = self._stopped_failure()
                except ClientStalled:
                    self._client_stalled()
                    return
                except Exception:
                    # Headers may be out already: an error here must become a terminal record,
                    # not an exception that truncates the client's chunked response.
                    log.exception("request %s: internal error", self.invoke.id)
                    failure = ApiError(500, "Internal error in trioprovider (see its log).", code="internal_error")
                if failure is not None:
                    self.outcome = self.cancel_reason or "failed"
                    self.error_code = failure.code
                    try:
                        # Bounded like every event: a client that stopped reading must not keep
                        # the request's slot, session and budget for as long as it stays connected.
                        await self._deliver(events, Failed(failure))
                    except ClientStalled:
                        self._client_stalled()
            finally:
                events.close()
        finally:
            if call is not None and not call.finished:
                if self.stopping_at is None:
                    self.stopping_at = trio.current_time()
                with trio.move_on_after(CLEANUP_TIMEOUT, shield=True) as sending:
                    await call.cancel(self.cancel_reason or "client_disconnected")
                if not sending.cancelled_caught:
                    self.cancel_sent_at = trio.current_time()
            self.finished_at = trio.current_time()
            # The answer is complete: the session and the heartbeat have nothing left to guard.
            # (Not the nursery's own scope: the request task reading the events runs inside it
            # until __aexit__, and cancelling it would cut off the events still buffered.)
            if session is not None:
                session.unwatch(self.cancel)
            self._guard_scope.cancel()

    async def _relay(self, call: Call, events: EventSink) -> None:
        async for reply in call:
            if self.first_event_at is None:
                self.first_event_at = trio.current_time()
                self._agent_scope.deadline = self.started_at + self.deadlines.total
            for event in self.translator.feed(reply):
                if isinstance(event, DeltaEvent) and self.reservation is not None:
                    # Prompt and output so far: what is charged if the request ends early.
                    self.reservation.used = self.translator.prompt_tokens + self.translator.completion_tokens
                elif isinstance(event, Finished):
                    self.outcome = "completed"
                    self.usage = event.usage
                    if self.reservation is not None:
                        self.reservation.used = event.usage.total_tokens
                elif isinstance(event, Failed):
                    self.outcome = "failed"
                    self.error_code = event.error.code
                self._last_event_at = trio.current_time()
                await self._deliver(events, event)

    @staticmethod
    async def _deliver(events: EventSink, event: Event) -> None:
        """Pass ``event`` on to the client's side; :class:`ClientStalled` if it stays unread."""
        try:
            # Room in the buffer is the usual case: no timeout scope, no extra schedule point
            # (receiving the agent's reply was one) for each chunk.
            events.send_nowait(event)
        except trio.WouldBlock:
            with trio.move_on_after(CLIENT_STALL_TIMEOUT) as waited:
                await events.send(event)
            if waited.cancelled_caught:
                raise ClientStalled from None

    def _client_stalled(self) -> None:
        """The client stopped reading: give back what the request holds (its connection is
        Hypercorn's to drop; the agent gets model_cancel as the stream task ends)."""
        self.outcome = "client_too_slow"
        self.cancel_reason = self.cancel_reason or "client_too_slow"
        log.warning("request %s: client stopped reading; stopped", self.invoke.id)
        if self.admission is not None:
            self.admission.release(trio.current_time())

    def _stopped_failure(self) -> ApiError:
        reason = self.cancel_reason
        if reason is None:
            self.cancel_reason = "deadline"
            which = "first token" if self.first_event_at is None else "whole answer"
            return ApiError(504, f"The agent did not answer in time ({which} deadline).", code="timeout")
        return _FAILURE_BY_REASON.get(reason) or ApiError(503, f"Request stopped: {reason}.", code=reason)

    async def _heartbeat(self, events: trio.MemorySendChannel[Event], interval: float) -> None:
        async with events:
            with self._guard_scope:
                while True:
                    await trio.sleep_until(self._last_event_at + interval)
                    if trio.current_time() - self._last_event_at >= interval:
                        self._last_event_at = trio.current_time()
                        await events.send(Heartbeat())


class WireEncoder(Protocol):
    """Turns a request's events into the bytes of one wire format."""

    def encode(self, events: list[Event]) -> bytes:
        ...
