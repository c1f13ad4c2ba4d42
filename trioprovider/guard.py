"""RequestGuard: the ASGI layer around every HTTP request, whichever app answers it."""

from __future__ import annotations

import functools
import logging
import re
from typing import cast

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)

from trioprovider.admission import Admission
from trioprovider.incoming import Incoming
from trioprovider.logs import access_fields, access_message, current_request_id
from trioprovider.provider import (
    Exchange,
    Provider,
    new_request_id,
    request_admissions,
    request_exchange,
    request_incoming,
)

#: Bound on finishing an HTTP exchange once its last byte is ready.
CLOSE_TIMEOUT = 5.0


class RequestGuard:
    """ASGI wrapper around the provider's apps that makes each HTTP request end cleanly.

    - Reads the request once into an :class:`~trioprovider.incoming.Incoming` (with its id,
      ``X-Request-Id``) for every route to share, folds ``//`` in paths, and keeps Hosts that
      Werkzeug cannot handle away from it.
    - Releases the admissions a request took, whatever happened: a RequestScope releases its
      admission when it closes, but a client can leave after admission and before the answer
      began, and then no scope ever opens (release is idempotent).
    - Tells the provider's metrics the request's route, status and duration, and notes when
      the client's disconnect arrived (the start of a cancellation's journey to the agent).
    - Shields the last body message. Hypercorn handles it by finishing the HTTP exchange, which
      tells the app ``http.disconnect``; the apps react by cancelling the request, which would
      cancel that very send halfway: the connection was then neither closed (for
      ``Connection: close``) nor put back to idle, and shutdown waited out its whole timeout.
    - Puts the request id in :data:`~trioprovider.logs.current_request_id`, which every task the
      request starts inherits: its log lines carry the id.
    - Writes the request's access line, with that id, to ``access_log`` (if any).
    """

    def __init__(self, app: ASGIFramework, provider: Provider, access_log: logging.Logger | None = None) -> None:
        self.app = app
        self.provider = provider
        #: Where the access line of each request goes (None: nowhere).
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "//" in scope["path"]:
            # A base URL typed with a trailing slash gives '//v1/...': serve it as '/v1/...'.
            path = re.sub("/{2,}", "/", scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}
        scope, original_host = _with_safe_host(scope)
        # Set here, around the whole request, so every line logged about it carries its id.
        request_id = new_request_id()
        incoming = Incoming.from_scope(scope, request_id, original_host)
        exchange = Exchange()
        started = trio.current_time()
        complete = False  # the last byte of the answer went out

        async def receive_noting_disconnect() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] == "http.disconnect" and exchange.disconnected_at is None:
                exchange.disconnected_at = trio.current_time()
            return message

        async def send_last_shielded(message: ASGISendEvent) -> None:
            nonlocal complete
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await send(message)
                    complete = True
            else:
                await send(message)

        held: list[Admission] = []
        admissions_token = request_admissions.set(held)
        exchange_token = request_exchange.set(exchange)
        incoming_token = request_incoming.set(incoming)
        id_token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive_noting_disconnect, send_last_shielded)
        finally:
            current_request_id.reset(id_token)
            request_incoming.reset(incoming_token)
            request_admissions.reset(admissions_token)
            request_exchange.reset(exchange_token)
            now = trio.current_time()
            for admission in held:
                admission.release(now)
            self.provider.metrics.http_finished(scope["method"], exchange.route, exchange.status, now - started)
            if self.access_log is not None:
                fields = access_fields(scope, exchange.status, now - started, request_id, complete)
                self.access_log.info(access_message(fields), extra=fields)


#: What replaces a Host Werkzeug cannot handle: a name that can never be served (RFC 2606),
#: so the request is refused with 403 like any other bad Host.
UNSERVABLE_HOST = b"unservable-host.invalid"


def _with_safe_host(scope: HTTPScope) -> tuple[HTTPScope, str | None]:
    """Werkzeug's URL map raises (a 500 outside any handler) on a Host it cannot IDNA-encode,
    such as ``.`` or ``a..b``. Such a Host is never allowed anyway: swap it for a name that
    fails the Host check in the usual way (403, audited with the original, returned here)."""
    headers = scope["headers"]
    host = next((value for name, value in headers if name == b"host"), None)
    if host is None:
        return scope, None
    if not _routable_host(host):
        replaced = [(key, UNSERVABLE_HOST if key == b"host" else value) for key, value in headers]
        return cast(HTTPScope, {**scope, "headers": replaced}), host.decode("latin-1")
    return scope, None


@functools.lru_cache(maxsize=256)
def _routable_host(host: bytes) -> bool:
    """Whether Werkzeug can IDNA-encode ``host``. Remembered (bounded): clients send the same
    few Hosts on every request, and the codec cost a few microseconds each time."""
    try:
        name = host.decode("ascii").rsplit(":", 1)[0] if not host.startswith(b"[") else "ipv6"
        name.encode("idna")
    except UnicodeError:
        return False
    return True
