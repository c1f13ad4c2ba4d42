"""The four model routes on plain ASGI, in front of the Quart app that serves everything else.

Every model request passes here, and a framework's request and response objects, hooks, URL map
and per-request tasks cost more than the rest of the request (bench/results/profile-*.txt:
with Quart, a request that does nothing at all ran at 0.4 of bare Hypercorn). The routes
themselves (:mod:`trioprovider.routes.openai`, :mod:`trioprovider.routes.ollama`) are plain
functions that return a :class:`~trioprovider.routes.model_requests.Reply`; this module asks the
provider's questions in the same order as the Quart hooks (Host and Origin, key, body) and puts
the reply on the wire.

One request::

    ModelRoutes.__call__           Host/Origin (403), method (405), key (401), body (413, 408, 400)
    └── cancel scope               cancelled when the client leaves (ClientWatch: the request
        │                          task waits on its client while it has nothing else to do,
        │                          a task watches while it waits in a queue or streams)
        └── (this task)            the route, then the answer: one body, or the agent's replies
                                   encoded and written as they come (RequestScope.stream), all
                                   that arrived during the previous write in the next one
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from trioprovider.auth import Principal
from trioprovider.client_watch import ClientWatch
from trioprovider.errors import ApiError, request_too_large
from trioprovider.events import Event
from trioprovider.incoming import Incoming
from trioprovider.origins import preflight_headers
from trioprovider.provider import Provider, current_exchange, current_incoming
from trioprovider.routes import ollama, openai
from trioprovider.routes.model_requests import Reply, StreamReply
from trioprovider.validation import parse_json
from trioprovider.wire.framing import dumps

log = logging.getLogger(__name__)

ModelRoute = Callable[[Provider, Incoming, Principal, Any], Awaitable[Reply]]

ROUTES: dict[str, ModelRoute] = {
    "/v1/chat/completions": openai.chat_completions,
    "/v1/completions": openai.completions,
    "/api/chat": ollama.chat,
    "/api/generate": ollama.generate,
}

ALLOWED_METHODS = "OPTIONS, POST"


def _body_too_slow() -> ApiError:
    return ApiError(408, "The request body did not arrive in time (provider.body_timeout).", code="request_timeout")


class ClientLeft(Exception):
    """The client hung up before its request body was complete."""


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class ModelRoutes:
    """ASGI app: the model routes here, every other request to ``fallback`` (the Quart app).

    Runs inside :class:`~trioprovider.guard.RequestGuard`, which has read the request into
    :func:`~trioprovider.provider.current_incoming` and releases what it took.
    """

    def __init__(self, provider: Provider, fallback: ASGIFramework) -> None:
        self.provider = provider
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.fallback(scope, receive, send)
            return
        incoming = current_incoming()
        exchange = current_exchange()
        if exchange is not None:
            exchange.route = incoming.path
        try:
            await self._serve(route, incoming, receive, send)
        except ApiError as error:
            await self._send_error(send, incoming, error)
        except ClientLeft:
            pass
        except Exception:
            log.exception("unhandled error")
            if exchange is None or exchange.status is None:  # else the answer has begun: too late
                await self._send_error(send, incoming, ApiError(500, "Internal error in trioprovider (see its log).", code="internal_error"))

    async def _serve(self, route: ModelRoute, incoming: Incoming, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        provider = self.provider
        provider.check_host_and_origin(incoming)
        if incoming.method != "POST":
            await self._answer_other_method(send, incoming)
            return
        principal = provider.authenticate(incoming)
        body_timeout = provider.settings.provider.body_timeout or math.inf
        # One scope for the whole request: while the body arrives its deadline is the body
        # timeout (a scope of its own for that cost as much as the route's own work); after,
        # only the client leaving cancels it (the agent gets model_cancel).
        with trio.CancelScope(deadline=trio.current_time() + body_timeout) as request:
            raw_body = await self._read_body(incoming, receive)
            if request.cancel_called:
                # The deadline passed in the same instant the body's end was taken: the scope
                # is cancelled for good, and the answer would never go out.
                raise _body_too_slow()
            request.deadline = math.inf
            body = parse_json(raw_body)
            exchange = current_exchange()
            if exchange is not None:
                exchange.client = ClientWatch(receive, request)
            reply = await route(provider, incoming, principal, body)
            if isinstance(reply, StreamReply):
                await self._stream(send, incoming, reply)
            else:
                await self._send_whole(send, incoming, 200, reply.headers, dumps(reply.body))
        if request.cancelled_caught and request.deadline != math.inf:
            raise _body_too_slow()

    async def _read_body(self, incoming: Incoming, receive: ASGIReceiveCallable) -> bytes:
        """The whole body: 413 past ``provider.max_body_bytes`` (by its Content-Length before
        reading a byte). The caller bounds the wait (``provider.body_timeout``)."""
        limit = self.provider.settings.provider.max_body_bytes
        declared = incoming.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise request_too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft
            chunk = cast(bytes, message.get("body", b""))
            size += len(chunk)
            if size > limit:
                raise request_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _stream(self, send: ASGISendCallable, incoming: Incoming, reply: StreamReply) -> None:
        headers = {"Content-Type": reply.content_type, **self._common_headers(incoming, reply.headers)}
        await send({"type": "http.response.start", "status": 200, "headers": _header_list(headers)})
        encoder = reply.encoder

        async def write(events: list[Event]) -> None:
            data = encoder.encode(events)
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})

        await reply.scope.stream(write)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _answer_other_method(self, send: ASGISendCallable, incoming: Incoming) -> None:
        """A CORS preflight (Host and Origin already allowed), OPTIONS, or 405."""
        origin = incoming.header("origin")
        if incoming.method == "OPTIONS" and origin and "access-control-request-method" in incoming.headers:
            headers = preflight_headers(origin, incoming.header("access-control-request-headers"))
            await self._send_whole(send, incoming, 204, headers, b"")
        elif incoming.method == "OPTIONS":
            await self._send_whole(send, incoming, 200, {"Allow": ALLOWED_METHODS}, b"")
        else:
            error = ApiError(405, f"Method {incoming.method} is not allowed on {incoming.path}.", code="method_not_allowed")
            await self._send_error(send, incoming, error.with_headers({"Allow": ALLOWED_METHODS}))

    async def _send_error(self, send: ASGISendCallable, incoming: Incoming, error: ApiError) -> None:
        status, headers, body = error.answer(incoming.path)
        await self._send_whole(send, incoming, status, headers, body)

    async def _send_whole(self, send: ASGISendCallable, incoming: Incoming, status: int, headers: dict[str, str], body: bytes) -> None:
        headers = {"Content-Type": "application/json", **self._common_headers(incoming, headers)}
        headers["Content-Length"] = str(len(body))
        await send({"type": "http.response.start", "status": status, "headers": _header_list(headers)})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _common_headers(self, incoming: Incoming, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with what every answer carries: its request id, and CORS for browsers."""
        return {**headers, "X-Request-Id": headers.get("X-Request-Id", incoming.request_id), **self.provider.cors_headers(incoming)}
