"""ClientWatch: noticing that the HTTP client of a model request has left, and stopping it.

ASGI tells an app that its client left by one message, ``http.disconnect``, from ``receive()``;
someone must be waiting in ``receive()`` for it to arrive. A task per request that does nothing
else was ~7 % of an unstreamed request's instructions (a task and a nursery), so the request
waits there itself whenever it can:

- an unstreamed request, while the agent writes its answer, has nothing to do but wait: it
  waits on the client (:meth:`ClientWatch.until_left`) in a cancel scope that the agent's next
  reply cancels (:meth:`~trioprovider.bridge.calls.Call.wake_on_arrival`);
- a request waiting for something else (an agent to connect, a slot in a queue) has a task
  watch meanwhile (:meth:`ClientWatch.watched`);
- a streamed request, which writes while it waits, runs :meth:`ClientWatch.until_left` in a
  task beside the stream for as long as the stream lasts.

Whichever notices, the request's cancel scope is cancelled: the agent gets ``model_cancel``,
what the request held is released.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio
from hypercorn.typing import ASGIReceiveCallable


class ClientWatch:
    """The client of one HTTP request, and the cancel scope of that request."""

    def __init__(self, receive: ASGIReceiveCallable, request: trio.CancelScope) -> None:
        self._receive = receive
        self._request = request
        #: The client is gone (its ``http.disconnect`` was read).
        self.left = False

    async def until_left(self) -> NoReturn:
        """Return only by cancellation: wait for the client to leave, then cancel the request
        (the caller, inside it, gets ``trio.Cancelled`` at once).

        Every message after the request body is the disconnect; its wait is cancelled cleanly
        (a message is taken or it is not), so a caller may stop waiting at any time.
        """
        while not self.left:
            if (await self._receive())["type"] == "http.disconnect":
                self.left = True
        self._request.cancel()
        await trio.lowlevel.checkpoint()
        raise AssertionError("the request's scope has exited: until_left was awaited outside it")

    async def watched(self, wait: Callable[[], Awaitable[object]]) -> None:
        """Await ``wait()`` (a wait for something other than the client: a queue, an agent to
        connect) with a task watching the client meanwhile."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.until_left)
            await wait()
            nursery.cancel_scope.cancel()


async def watched(client: ClientWatch | None, wait: Callable[[], Awaitable[object]]) -> None:
    """``client.watched(wait)``, or just ``wait()`` when there is no client to watch."""
    if client is None:
        await wait()
    else:
        await client.watched(wait)
