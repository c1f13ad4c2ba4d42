"""RequestScope: one model request, from admission to its last byte, run in the request's task.

Streamed or not, the agent stream runs in the task that answers the HTTP request: start the
call, translate replies into events, enforce the deadlines, hand the events on, and on any way
out send model_cancel (shielded, bounded). A streamed answer adds two tasks::

    RequestScope.stream nursery
    ├── (request task)   agent stream: all the replies that have arrived, translated, to one
    │                    write; a Heartbeat while the agent is silent (streaming formats only)
    ├── stall watch      a write that does not finish within CLIENT_STALL_TIMEOUT means the
    │                    client stopped reading: release what the request holds, model_cancel
    └── hang-up watch    ClientWatch.until_left: the client left, cancel the request

An answer that is not streamed adds none: while it waits for the agent's replies the request
task waits on its client instead (:mod:`trioprovider.client_watch`), and the next reply's
arrival ends that wait.

Neither the rate meter nor the session watchdog is a task: the agent stream charges the meter
per delta and the scope settles it when it closes (``settle`` refunds the unused reservation),
and the session calls the scope's :meth:`~RequestScope.cancel` when it expires or is revoked
(a watcher registered for as long as the agent stream runs). Neither needs scheduling.

There is no task between the agent's replies and the client's socket: the replies wait in the
call (:class:`~trioprovider.bridge.calls.Call`) while the previous write goes out, and the next write takes all of them
(chunks that are ready together share a write; a lone chunk is written at once).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from trioprovider.admission import Admission
from trioprovider.bridge.calls import Bridge, Call, NoAgent, Overloaded, QueuedWait
from trioprovider.client_watch import ClientWatch
from trioprovider.errors import ApiError
from trioprovider.events import (
    DeltaEvent,
    Event,
    Failed,
    Finished,
    Heartbeat,
    ReplyTranslator,
)
from trioprovider.protocol import ModelInvoke, Usage

log = logging.getLogger(__name__)

#: Bound on every cleanup step that runs while cancelled.
CLEANUP_TIMEOUT = 1.0
#: Seconds one write to the client may take (the client left the answer unread, its socket
#: buffers full) before the request is stopped. Hypercorn's socket writes cannot be timed out
#: from the app, so the request is stopped from this side: the agent gets model_cancel, the
#: admission is released.
CLIENT_STALL_TIMEOUT = 30.0


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
    """Where the agent stream puts events: the client's connection, or a list."""

    async def put(self, events: list[Event]) -> None:
        ...


class _Gathered:
    """The events of a request run to its end (see ``run_to_end``)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def put(self, events: list[Event]) -> None:
        self.events += events


class _Writer:
    """The events of a streamed request, written to the client as they come (see ``stream``)."""

    def __init__(self, write: Callable[[list[Event]], Awaitable[None]]) -> None:
        self._write = write
        #: When the write in progress began (trio time), None between writes.
        self.writing_since: float | None = None

    async def put(self, events: list[Event]) -> None:
        self.writing_since = trio.current_time()
        try:
            await self._write(events)
        finally:
            self.writing_since = None


class ScopeObserver(Protocol):
    """Who wants to know when scopes open and close (leak counts, metrics, audit)."""

    def scope_opened(self, scope: RequestScope) -> None:
        ...

    def scope_closed(self, scope: RequestScope) -> None:
        ...


class RequestScope:
    """Owns one model request from admission to its last byte.

    :meth:`stream` (events written as they come) or :meth:`run_to_end` (events gathered) runs
    it once; either way the session and the rate reservation are released when it ends,
    whichever way it ended.
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
        client: ClientWatch | None = None,
    ) -> None:
        self.bridge = bridge
        #: The HTTP client, watched while the request waits (None: nobody to watch, as in
        #: tests that drive a scope directly).
        self.client = client
        self._client_watched = False  # by a task of its own (stream)
        self.invoke = invoke
        self.admission = admission
        self.reservation = admission.reservation if admission is not None else None
        self.deadlines = deadlines
        self.heartbeat_interval = heartbeat_interval
        self._observer = observer
        self.translator = ReplyTranslator(prompt_tokens)
        self._agent_scope = trio.CancelScope()
        self._call: Call | None = None
        #: Why the request is being stopped, once something decides to stop it.
        self.cancel_reason: str | None = None
        self.started_at = 0.0
        #: The agent's first reply of any kind (it is answering: the first-reply deadline is met).
        self.first_event_at: float | None = None
        #: The first output (text, reasoning or a tool call), or the end of an answer with none:
        #: time to first token. An agent may say it is answering before it has any (the openai
        #: agent does, for an upstream asked for its answer whole).
        self.first_token_at: float | None = None
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

        For an answer that is not streamed: nothing reaches the client before the end, so
        there is nothing to watch and nothing to write meanwhile (and no heartbeats: those are
        :meth:`stream`'s, timed by its timekeeper task).
        """
        gathered = _Gathered()
        self._open()
        try:
            await self._agent_stream(gathered)
        finally:
            self.release()
        return gathered.events

    async def stream(self, write: Callable[[list[Event]], Awaitable[None]]) -> None:
        """Run the request in the calling task, passing its events to ``write`` as they come:
        every event that is ready at once goes in one call. Ends after the terminal event
        (Finished or Failed) was written, or when the request is cancelled."""
        writer = _Writer(write)
        self._open()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_time, writer)
                if self.client is not None:
                    # A stream writes while it waits: its client needs a watcher of its own.
                    nursery.start_soon(self.client.until_left)
                    self._client_watched = True
                try:
                    await self._agent_stream(writer)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.release()

    def release(self) -> None:
        """Release what the request held; synchronous, so it cannot be cancelled halfway."""
        if self._closed:
            return
        self._closed = True
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

    # -- the agent stream -------------------------------------------------------------------

    async def _agent_stream(self, events: EventSink) -> None:
        session = self.admission.session if self.admission is not None else None
        if session is not None:
            # Before the first checkpoint: a session that ends from here on stops the request.
            session.watch(self.cancel)
        try:
            failure: ApiError | None = None
            try:
                with self._agent_scope:
                    try:
                        self._call = await self.bridge.start_call(self.invoke, queued=self._watch_while_queued())
                    except NoAgent as error:
                        failure = ApiError(503, str(error), code="no_agent")
                    except Overloaded as error:
                        failure = ApiError(503, str(error), code="overloaded")
                    else:
                        await self._relay(self._call, events)
                if self._agent_scope.cancelled_caught:
                    failure = self._stopped_failure()
            except Exception:
                # Headers may be out already: an error here must become a terminal record,
                # not an exception that truncates the client's chunked response.
                log.exception("request %s: internal error", self.invoke.id)
                failure = ApiError(500, "Internal error in trioprovider (see its log).", code="internal_error")
            if failure is not None and self.outcome != "client_too_slow":
                self.outcome = self.cancel_reason or "failed"
                self.error_code = failure.code
                await events.put([Failed(failure)])
        finally:
            await self._cancel_call(self.cancel_reason or "client_disconnected")
            self.finished_at = trio.current_time()
            if session is not None:
                session.unwatch(self.cancel)

    async def _relay(self, call: Call, events: EventSink) -> None:
        yielded = False  # since the last replies were taken
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            replies = call.ready()
            if replies:
                if not call.finished:
                    # Replies came during the last write: no heartbeat timeout (a cancel scope)
                    # is needed to take them. One schedule point, as a wait would have been,
                    # lets the agent add whatever else is ready now to the same write.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    replies += call.ready()
            elif call.finished:
                return
            elif self.client is not None and not self._client_watched:
                if not yielded:
                    # An agent that answers at once has its reply in by the next schedule
                    # point: one costs less than setting up the wait on the client below.
                    yielded = True
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    continue
                # Nothing to do until a reply comes: wait on the client meanwhile (it may
                # leave), and let the reply's arrival end that wait. No watcher task needed.
                with trio.CancelScope() as waiting:
                    call.wake_on_arrival(waiting.cancel)
                    try:
                        await self.client.until_left()
                    finally:
                        call.wake_on_arrival(None)
                replies = call.ready()
            else:
                replies = await call.receive_batch()
                if not replies and not call.finished:
                    # The stream's timekeeper ended the wait (see _keep_time): a heartbeat, if
                    # nothing went out for a whole interval (else it asked as a write began).
                    now = trio.current_time()
                    if self.heartbeat_interval is not None and now - self._last_event_at >= self.heartbeat_interval:
                        self._last_event_at = now
                        await events.put([Heartbeat()])
                    continue
            if not replies:
                return
            yielded = False
            now = trio.current_time()
            if self.first_event_at is None:
                self.first_event_at = now
                self._agent_scope.deadline = self.started_at + self.deadlines.total
            batch: list[Event] = []
            for reply in replies:
                for event in self.translator.feed(reply):
                    if self.first_token_at is None and isinstance(event, (DeltaEvent, Finished)):
                        self.first_token_at = now
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
                    batch.append(event)
            self._last_event_at = now
            if batch:
                await events.put(batch)

    def _watch_while_queued(self) -> QueuedWait | None:
        """How to watch the client while queued for an agent, unless a task already does."""
        return self.client.watched if self.client is not None and not self._client_watched else None

    async def _cancel_call(self, reason: str) -> None:
        """model_cancel to the agent if its answer has not ended (once; shielded, bounded)."""
        call = self._call
        if call is None or call.finished:
            return
        if self.stopping_at is None:
            self.stopping_at = trio.current_time()
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True) as sending:
            await call.cancel(reason)
        if not sending.cancelled_caught:
            self.cancel_sent_at = trio.current_time()

    async def _keep_time(self, writer: _Writer) -> None:
        """The stream's timers, in one task rather than a timeout on every wait for a token.

        - Stop the request if one write to the client takes longer than CLIENT_STALL_TIMEOUT.
          Hypercorn's socket writes cannot be timed out or cancelled from the app, so a client
          that stopped reading would hold the request task, and with it the request's slot,
          session and budget, for as long as the connection stays open: the request is let go
          from here. The agent gets model_cancel now; the request task ends once its write
          does (Hypercorn's to drop with the connection).
        - With a heartbeat interval, when the agent has been silent that long, end the relay's
          wait for its replies (it writes a heartbeat). Not during a write, nor while the
          request waits for an agent: then it looks again every quarter interval.
        """
        interval = self.heartbeat_interval
        asked_at = -math.inf  # when a heartbeat was last asked for
        while True:
            now = trio.current_time()
            began = writer.writing_since
            if began is not None and now >= began + CLIENT_STALL_TIMEOUT:
                break  # one write has lasted that long
            wake = now + CLIENT_STALL_TIMEOUT / 4 if began is None else began + CLIENT_STALL_TIMEOUT
            if interval is not None:
                due = max(self._last_event_at, asked_at) + interval
                call = self._call
                if due <= now:
                    if began is None and call is not None:
                        # Asked once an interval; the relay writes the heartbeat only if
                        # nothing else went out meanwhile.
                        asked_at = now
                        call.interrupt()
                        due = now + interval
                    else:
                        due = now + interval / 4
                wake = min(wake, due)
            await trio.sleep_until(wake)
        self.outcome = "client_too_slow"
        log.warning("request %s: client stopped reading; stopped", self.invoke.id)
        self.cancel("client_too_slow")
        if self.admission is not None:
            self.admission.release(trio.current_time())
        await self._cancel_call("client_too_slow")

    def _stopped_failure(self) -> ApiError:
        reason = self.cancel_reason
        if reason is None:
            self.cancel_reason = "deadline"
            which = "first token" if self.first_event_at is None else "whole answer"
            return ApiError(504, f"The agent did not answer in time ({which} deadline).", code="timeout")
        return _FAILURE_BY_REASON.get(reason) or ApiError(503, f"Request stopped: {reason}.", code=reason)


class WireEncoder(Protocol):
    """Turns a request's events into the bytes of one wire format."""

    def encode(self, events: list[Event]) -> bytes:
        ...
