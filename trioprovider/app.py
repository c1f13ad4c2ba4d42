"""The HTTP application: the Quart-Trio app, the state its routes share, and its error shapes."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, ASGISendEvent, HTTPScope, Scope
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from trioprovider.admission import Admission, Gate
from trioprovider.audit import AuditLog
from trioprovider.auth import KeyMatch, KeyRing, Principal, presented_prefix
from trioprovider.bridge.calls import Bridge, Resolution, catalog
from trioprovider.config import Settings
from trioprovider.logs import access_fields, access_message, current_request_id
from trioprovider.metrics import Live, Metrics
from trioprovider.origins import host_allowed, origin_allowed
from trioprovider.errors import ApiError, invalid_request, model_not_found, no_agent, unauthorized
from trioprovider.scope import RequestScope

log = logging.getLogger(__name__)

#: The principal of requests on the key-less Ollama listener.
KEYLESS_LABEL = "ollama-listener"

#: Bound on finishing an HTTP exchange once its last byte is ready.
CLOSE_TIMEOUT = 5.0
#: Headers a browser page may read from our answers (CORS).
EXPOSED_HEADERS = ", ".join(
    [
        "X-Request-Id",
        "X-Session-Id",
        "Retry-After",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ]
)

#: Admissions taken while handling the current HTTP request (see :class:`RequestGuard`).
_admissions: ContextVar[list[Admission] | None] = ContextVar("trioprovider_admissions", default=None)


@dataclass
class Exchange:
    """What the metrics learn about one HTTP request while it runs (see :class:`RequestGuard`)."""

    #: The route template (``/admin/sessions/<session_id>``), None if no route matched.
    route: str | None = None
    status: int | None = None
    #: When the client's disconnect reached the app (trio time), if it came.
    disconnected_at: float | None = None


_exchange: ContextVar[Exchange | None] = ContextVar("trioprovider_exchange", default=None)


def current_exchange() -> Exchange | None:
    return _exchange.get()


@dataclass(eq=False)
class Provider:
    """The state of one running provider, shared by every route."""

    settings: Settings
    bridge: Bridge
    keys: KeyRing
    gate: Gate
    bridge_url: str
    started_at: float = field(default_factory=time.time)
    scopes: set[RequestScope] = field(default_factory=set)
    draining: bool = False
    #: Port of the key-less Ollama listener (``ollama.listen``), once it is bound.
    keyless_port: int | None = None
    audit: AuditLog = field(default_factory=AuditLog.disabled)
    #: ``performance.max_concurrent_requests``: model requests running at once.
    capacity: trio.CapacityLimiter = field(init=False)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.capacity = trio.CapacityLimiter(self.settings.performance.max_concurrent_requests)
        self.metrics = Metrics(self.live)

    def live(self) -> Live:
        """What this provider holds right now (for metrics, read at scrape time)."""
        sessions = self.gate.sessions
        return Live(
            sessions_active=len(sessions),
            sessions_created=sessions.total_created,
            sessions_expired=sessions.total_expired,
            active_requests=len(self.scopes),
            active_streams=sum(1 for scope in self.scopes if scope.invoke.stream),
            agents=self.bridge.agents(),
        )

    # ScopeObserver: the open scopes are what a leak check counts.
    def scope_opened(self, scope: RequestScope) -> None:
        self.scopes.add(scope)

    def scope_closed(self, scope: RequestScope) -> None:
        self.scopes.discard(scope)
        exchange = _exchange.get()
        self.metrics.model_request_ended(
            scope,
            route=exchange.route if exchange else None,
            disconnected_at=exchange.disconnected_at if exchange else None,
        )
        admission = scope.admission
        # The usage the client was told when the answer finished, else our own count so far.
        usage = scope.usage
        prompt_tokens = usage.prompt_tokens if usage else scope.translator.prompt_tokens
        completion_tokens = usage.completion_tokens if usage else scope.translator.completion_tokens
        duration_ms = round(((scope.finished_at or scope.started_at) - scope.started_at) * 1000, 1)
        log.debug(
            "model request: %s %s %s, %d+%d tokens, %.1f ms",
            scope.invoke.model,
            scope.invoke.kind,
            scope.outcome,
            prompt_tokens,
            completion_tokens,
            duration_ms,
        )
        self.audit.record(
            "model_request",
            request_id=scope.invoke.id,
            model=scope.invoke.model,
            kind=scope.invoke.kind,
            stream=scope.invoke.stream,
            key=admission.principal.key_label if admission else None,
            client=admission.principal.client if admission else None,
            session_id=scope.invoke.session_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            outcome=scope.outcome,
            error=scope.error_code,
            duration_ms=duration_ms,
        )

    def violation(self, kind: str, detail: str) -> None:
        """Audit a refused request that looked hostile (bad Host or Origin, oversize, ...)."""
        self.audit.record(
            "security_violation",
            kind=kind,
            detail=detail,
            client=request.remote_addr,
            method=request.method,
            path=request.path,
            request_id=getattr(request, "request_id", None),
        )

    def on_keyless_listener(self) -> bool:
        server = request.scope.get("server")
        return self.keyless_port is not None and server is not None and server[1] == self.keyless_port

    def authenticate(self) -> Principal:
        """Who is asking: the key's label (401 without a valid key), audited either way."""
        client = request.remote_addr or "unknown"
        authorization = request.headers.get("Authorization")
        if self.on_keyless_listener():
            # VoidEditor's Ollama provider cannot send a key; this listener is loopback-only and
            # checks Host and Origin instead (see check_host_and_origin).
            match: KeyMatch | None = KeyMatch(KEYLESS_LABEL, "")
        else:
            match = self.keys.identify(authorization)
        self.audit.record(
            "authentication",
            success=match is not None,
            key=match.label if match else None,
            key_prefix=(match.prefix if match else presented_prefix(authorization)) or None,
            client=client,
            path=request.path,
            request_id=getattr(request, "request_id", None),
        )
        if match is None:
            raise unauthorized()
        return Principal(match.label, client)

    def supports_vision(self, model: str) -> bool:
        """Whether an agent serving ``model`` advertises image input."""
        cards = catalog(self.bridge.agents(), self.settings.provider.model_name)
        return any(card.id == model and card.supports_vision for card in cards)

    async def require_model(self, model: str) -> None:
        """Return if ``model`` can be served now; 404 if unknown, 503 if no agent turns up."""
        resolution = self.bridge.resolve(model)
        if resolution is Resolution.NO_AGENTS:
            await self.bridge.wait_for_agents(self.settings.mcp.agent_wait_timeout)
            resolution = self.bridge.resolve(model)
        if resolution is Resolution.NO_AGENTS:
            raise no_agent(model, self.bridge_url)
        if resolution is Resolution.UNKNOWN_MODEL:
            available = sorted({card.id for agent in self.bridge.agents() for card in agent.models})
            raise model_not_found(model, [self.settings.provider.model_name, *available])
        if self.bridge.saturated(model):
            # Said now, before a stream's 200 goes out, so clients see a retryable 503.
            raise ApiError(
                503,
                f"Every agent for {model!r} is busy and the queue is full; retry shortly.",
                code="overloaded",
                headers={"Retry-After": "1"},
            )

    async def admit(self, principal: Principal, tokens: int) -> Admission:
        """A concurrency slot, a session and a rate reservation for one model request, or a
        503 (no slot within ``queue_timeout``) or 429 (rate or session limits)."""
        if self.draining:
            raise ApiError(503, "The server is shutting down; retry when it is back.", code="shutdown", headers={"Retry-After": "5"})
        slot = object()  # the borrower: the slot is released by whoever ends the request
        try:
            self.capacity.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            with trio.move_on_after(self.settings.performance.queue_timeout) as waited:
                await self.capacity.acquire_on_behalf_of(slot)
            if waited.cancelled_caught:
                raise ApiError(
                503,
                f"{self.capacity.total_tokens} requests are running (performance.max_concurrent_requests); "
                "retry shortly.",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        if self.draining:
            # It waited for its slot while the server began to drain: it would start a stream
            # after the in-flight ones were told to stop, and be cut off without a last record.
            self.capacity.release_on_behalf_of(slot)
            raise ApiError(503, "The server is shutting down; retry when it is back.", code="shutdown", headers={"Retry-After": "5"})
        try:
            admission = self.gate.admit(
                principal, request.headers.get("X-Session-Id"), tokens, trio.current_time()
            )
        except ApiError as error:
            self.capacity.release_on_behalf_of(slot)
            if error.status == 429:
                self.audit.record(
                    "rate_limit_exceeded",
                    key=principal.key_label,
                    client=principal.client,
                    limit=error.code,
                    retry_after=error.headers.get("Retry-After"),
                    request_id=getattr(request, "request_id", None),
                )
            raise
        admission.on_release = lambda: self.capacity.release_on_behalf_of(slot)
        held = _admissions.get()
        if held is not None:
            held.append(admission)
        return admission

    def response_headers(self, request_id: str, admission: Admission) -> dict[str, str]:
        headers = self.gate.limiter.headers(admission.principal.owner, trio.current_time())
        headers["X-Request-Id"] = request_id
        headers["X-Session-Id"] = admission.session.id
        return headers


def current_provider() -> Provider:
    from quart import current_app

    return current_app.config["PROVIDER"]


def new_request_id() -> str:
    return secrets.token_hex(12)


async def read_json() -> Any:
    """The request body as JSON: 413 past the size limit (checked before parsing), else 400."""
    try:
        data = await request.get_data(cache=False, as_text=False)
    except RequestEntityTooLarge:
        limit = current_provider().settings.provider.max_body_bytes
        raise ApiError(413, f"The request body is larger than {limit} bytes.", code="request_too_large") from None
    assert isinstance(data, bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("The request body is not valid UTF-8.") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid_request(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    try:
        lone_surrogate = "\\u" in text and _has_lone_surrogate(body)
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    if lone_surrogate:
        # JSON may escape half a UTF-16 pair ("\ud800"); such a string is not text, cannot be
        # sent on to an agent as UTF-8, and would fail later as a 5xx.
        raise invalid_request("The request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def error_response(error: ApiError) -> Response:
    body = error.ollama_body() if request.path.startswith("/api/") else error.openai_body()
    response = Response(json.dumps(body), status=error.status, mimetype="application/json")
    response.headers.update(error.headers)
    if error.status in (408, 413):
        # The unread rest of the body would otherwise be taken for the next request: close, and
        # say so, so that clients do not send their next request on this connection.
        response.headers["Connection"] = "close"
    return response


class RequestGuard:
    """ASGI wrapper around the Quart app that makes each HTTP request end cleanly.

    - Releases the admissions a request took, whatever happened: a RequestScope releases its
      admission when it closes, but a client can leave after the view returned and before the
      body was entered, and then no scope ever opens (release is idempotent).
    - Tells the provider's metrics the request's route, status and duration, and notes when
      the client's disconnect arrived (the start of a cancellation's journey to the agent).
    - Shields the last body message. Hypercorn handles it by finishing the HTTP exchange, which
      tells the app ``http.disconnect``; quart-trio reacts by cancelling the request's nursery,
      which would cancel that very send halfway: the connection was then neither closed (for
      ``Connection: close``) nor put back to idle, and shutdown waited out its whole timeout.
    - Gives the request its id (``X-Request-Id``) in :data:`~trioprovider.logs.current_request_id`,
      which every task the request starts inherits: its log lines carry the id.
    - Writes the request's access line, with that id, to ``access_log`` (if any).
    """

    def __init__(self, app: Quart, access_log: logging.Logger | None = None) -> None:
        self.app = app
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

        scope = _with_safe_host(scope)
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
        token = _admissions.set(held)
        exchange_token = _exchange.set(exchange)
        # Set here, around the whole request, so every line logged about it carries its id.
        request_id = new_request_id()
        id_token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive_noting_disconnect, send_last_shielded)
        finally:
            current_request_id.reset(id_token)
            _admissions.reset(token)
            _exchange.reset(exchange_token)
            now = trio.current_time()
            for admission in held:
                admission.release(now)
            provider: Provider | None = self.app.config.get("PROVIDER")
            if provider is not None:
                provider.metrics.http_finished(scope["method"], exchange.route, exchange.status, now - started)
            if self.access_log is not None:
                fields = access_fields(scope, exchange.status, now - started, request_id, complete)
                self.access_log.info(access_message(fields), extra=fields)


#: Where :func:`_with_safe_host` keeps a Host header it had to replace.
ORIGINAL_HOST = "trioprovider.original_host"
#: What replaces it: a name that can never be served (RFC 2606), so the app refuses it with 403.
UNSERVABLE_HOST = b"unservable-host.invalid"


def _with_safe_host(scope: HTTPScope) -> HTTPScope:
    """Werkzeug's URL map raises (a 500 outside any handler) on a Host it cannot IDNA-encode,
    such as ``.`` or ``a..b``. Such a Host is never allowed anyway: swap it for a name that
    fails the Host check in the usual way (403, audited with the original)."""
    headers = scope["headers"]
    host = next((value for name, value in headers if name == b"host"), None)
    if host is None:
        return scope
    try:
        name = host.decode("ascii").rsplit(":", 1)[0] if not host.startswith(b"[") else "ipv6"
        name.encode("idna")
    except UnicodeError:
        replaced = [(key, UNSERVABLE_HOST if key == b"host" else value) for key, value in headers]
        return cast(HTTPScope, {**scope, "headers": replaced, ORIGINAL_HOST: host.decode("latin-1")})
    return scope


def _preflight(origin: str) -> Response:
    """The answer to a CORS preflight from an allowed origin (any route, any method we serve)."""
    response = Response("", status=204)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, DELETE, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", "Authorization, Content-Type"
    )[:1000]
    response.headers["Access-Control-Max-Age"] = "600"
    response.vary.add("Origin")
    return response


def create_app(provider: Provider) -> QuartTrio:
    from trioprovider.routes import admin, health, metrics, ollama, openai

    app = QuartTrio("trioprovider")
    app.config["PROVIDER"] = provider
    app.config["MAX_CONTENT_LENGTH"] = provider.settings.provider.max_body_bytes
    # A body slower than this gets 408; its connection's task is the only one it holds up.
    app.config["BODY_TIMEOUT"] = provider.settings.provider.body_timeout or None
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(health.blueprint)
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(ollama.blueprint)
    app.register_blueprint(admin.blueprint)
    app.register_blueprint(metrics.blueprint)

    @app.before_request
    async def note_route() -> None:
        # First of the hooks: a request refused by the next ones is still counted by its route.
        exchange = _exchange.get()
        if exchange is not None and request.url_rule is not None:
            exchange.route = request.url_rule.rule

    @app.before_request
    async def assign_request_id() -> None:
        request.request_id = current_request_id.get() or new_request_id()  # type: ignore[attr-defined]

    @app.before_request
    async def check_host_and_origin() -> Response | None:
        # Loopback is reachable from every page in the user's browser: a hostile name that
        # resolves to 127.0.0.1 (DNS rebinding) shows in Host, a cross-site request in Origin.
        server = request.scope.get("server")
        port = (server[1] if server else None) or 0
        if not host_allowed(request.headers.get("Host"), port, provider.settings.security.allowed_hosts):
            host = str(request.scope.get(ORIGINAL_HOST) or request.headers.get("Host", ""))
            provider.violation("bad_host", f"Host {host[:100]!r}")
            raise ApiError(
                403,
                "Host must be a loopback name (127.0.0.1, localhost, [::1]) or one of security.allowed_hosts.",
                code="forbidden_host",
            )
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, provider.settings.security.allowed_origins):
            provider.violation("bad_origin", f"Origin {origin[:100]!r}" if origin else "Origin")
            raise ApiError(403, "This Origin is not allowed (security.allowed_origins).", code="forbidden_origin")
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            return _preflight(origin)
        return None

    @app.after_request
    async def tag_response(response: Response) -> Response:
        response.headers.setdefault("X-Request-Id", getattr(request, "request_id", ""))
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin, provider.settings.security.allowed_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            response.vary.add("Origin")
        return response

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = {
            404: f"Unknown route {request.method} {request.path}.",
            405: f"Method {request.method} is not allowed on {request.path}.",
            408: "The request body did not arrive in time (provider.body_timeout).",
        }.get(status, error.description or error.name)
        return error_response(ApiError(status, message, code=error.name.lower().replace(" ", "_")))

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=error)
        return error_response(ApiError(500, "Internal error in trioprovider (see its log).", code="internal_error"))

    return app
