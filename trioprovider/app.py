"""The HTTP application: the Quart-Trio app, the state its routes share, and its error shapes."""

from __future__ import annotations

import json
import re
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from trioprovider.admission import Admission, Gate
from trioprovider.auth import KeyRing, Principal
from trioprovider.bridge.calls import Bridge, Resolution
from trioprovider.config import Settings
from trioprovider.origins import host_allowed, origin_allowed
from trioprovider.errors import ApiError, invalid_request, model_not_found, no_agent, unauthorized
from trioprovider.scope import RequestScope

#: Admissions taken while handling the current HTTP request (see :class:`RequestGuard`).
#: Bound on finishing an HTTP exchange once its last byte is ready.
CLOSE_TIMEOUT = 5.0

_admissions: ContextVar[list[Admission] | None] = ContextVar("trioprovider_admissions", default=None)


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

    # ScopeObserver: the open scopes are what a leak check counts.
    def scope_opened(self, scope: RequestScope) -> None:
        self.scopes.add(scope)

    def scope_closed(self, scope: RequestScope) -> None:
        self.scopes.discard(scope)

    def on_keyless_listener(self) -> bool:
        server = request.scope.get("server")
        return self.keyless_port is not None and server is not None and server[1] == self.keyless_port

    def authenticate(self) -> Principal:
        if self.on_keyless_listener():
            # VoidEditor's Ollama provider cannot send a key; this listener is loopback-only and
            # checks Host and Origin instead (see guard_keyless_listener).
            return Principal("ollama-listener", request.remote_addr or "unknown")
        label = self.keys.check(request.headers.get("Authorization"))
        if label is None:
            raise unauthorized()
        return Principal(label, request.remote_addr or "unknown")

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

    def admit(self, principal: Principal, tokens: int) -> Admission:
        admission = self.gate.admit(
            principal, request.headers.get("X-Session-Id"), tokens, trio.current_time()
        )
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
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid_request(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None


def error_response(error: ApiError) -> Response:
    body = error.ollama_body() if request.path.startswith("/api/") else error.openai_body()
    response = Response(json.dumps(body), status=error.status, mimetype="application/json")
    response.headers.update(error.headers)
    return response


class RequestGuard:
    """ASGI wrapper around the Quart app that makes each HTTP request end cleanly.

    - Releases the admissions a request took, whatever happened: a RequestScope releases its
      admission when it closes, but a client can leave after the view returned and before the
      body was entered, and then no scope ever opens (release is idempotent).
    - Shields the last body message. Hypercorn handles it by finishing the HTTP exchange, which
      tells the app ``http.disconnect``; quart-trio reacts by cancelling the request's nursery,
      which would cancel that very send halfway: the connection was then neither closed (for
      ``Connection: close``) nor put back to idle, and shutdown waited out its whole timeout.
    """

    def __init__(self, app: Quart) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "//" in scope["path"]:
            # A base URL typed with a trailing slash gives '//v1/...': serve it as '/v1/...'.
            path = re.sub("/{2,}", "/", scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await send(message)
            else:
                await send(message)

        held: list[Admission] = []
        token = _admissions.set(held)
        try:
            await self.app(scope, receive, send_last_shielded)
        finally:
            _admissions.reset(token)
            now = trio.current_time()
            for admission in held:
                admission.release(now)


def create_app(provider: Provider) -> QuartTrio:
    from trioprovider.routes import health, ollama, openai

    app = QuartTrio("trioprovider")
    app.config["PROVIDER"] = provider
    app.config["MAX_CONTENT_LENGTH"] = provider.settings.provider.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(health.blueprint)
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(ollama.blueprint)

    @app.before_request
    async def assign_request_id() -> None:
        request.request_id = new_request_id()  # type: ignore[attr-defined]

    @app.before_request
    async def guard_keyless_listener() -> None:
        if not provider.on_keyless_listener():
            return
        assert provider.keyless_port is not None
        if not host_allowed(request.headers.get("Host"), provider.keyless_port):
            raise ApiError(403, "Host must be a loopback name (127.0.0.1, localhost, [::1]).", code="forbidden_host")
        if not origin_allowed(request.headers.get("Origin"), provider.settings.security.allowed_origins):
            raise ApiError(403, "This Origin is not allowed (security.allowed_origins).", code="forbidden_origin")

    @app.after_request
    async def tag_response(response: Response) -> Response:
        response.headers.setdefault("X-Request-Id", getattr(request, "request_id", ""))
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
        }.get(status, error.description or error.name)
        return error_response(ApiError(status, message, code=error.name.lower().replace(" ", "_")))

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=error)
        return error_response(ApiError(500, "Internal error in trioprovider (see its log).", code="internal_error"))

    return app
