"""The state of one running provider, and the decisions every route shares about a request:
whether its Host and Origin may be served, who sent it, and whether it may run now."""

from __future__ import annotations

import logging
import random
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial

import trio

from trioprovider.admission import Admission, Gate
from trioprovider.audit import AuditLog
from trioprovider.auth import KeyMatch, KeyRing, Principal, presented_prefix
from trioprovider.bridge.calls import Bridge, Resolution, catalog
from trioprovider.client_watch import ClientWatch, watched
from trioprovider.config import Settings
from trioprovider.errors import ApiError, model_not_found, no_agent, unauthorized
from trioprovider.incoming import Incoming
from trioprovider.metrics import Live, Metrics
from trioprovider.origins import host_allowed, origin_allowed
from trioprovider.scope import RequestScope

log = logging.getLogger(__name__)

#: The principal of requests on the key-less Ollama listener.
KEYLESS_LABEL = "ollama-listener"

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
request_admissions: ContextVar[list[Admission] | None] = ContextVar("trioprovider_admissions", default=None)


@dataclass
class Exchange:
    """What the metrics learn about one HTTP request while it runs (see :class:`RequestGuard`)."""

    #: The route template (``/admin/sessions/<session_id>``), None if no route matched.
    route: str | None = None
    status: int | None = None
    #: When the client's disconnect reached the app (trio time), if it came.
    disconnected_at: float | None = None
    #: Who notices the client leaving a model request (set by the model routes).
    client: ClientWatch | None = None


request_exchange: ContextVar[Exchange | None] = ContextVar("trioprovider_exchange", default=None)


def current_exchange() -> Exchange | None:
    return request_exchange.get()


def current_client() -> ClientWatch | None:
    """The client of the model request being handled, if the model routes are watching it."""
    exchange = request_exchange.get()
    return exchange.client if exchange is not None else None


#: The HTTP request being handled (set around each request by :class:`~trioprovider.guard.RequestGuard`).
request_incoming: ContextVar[Incoming] = ContextVar("trioprovider_incoming")


def current_incoming() -> Incoming:
    return request_incoming.get()


def new_request_id() -> str:
    """24 hex digits. Not a secret (clients see it, logs carry it): a fast PRNG will do."""
    return f"{random.getrandbits(96):024x}"


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
        exchange = request_exchange.get()
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

    def violation(self, incoming: Incoming, kind: str, detail: str) -> None:
        """Audit a refused request that looked hostile (bad Host or Origin, oversize, ...)."""
        self.audit.record(
            "security_violation",
            kind=kind,
            detail=detail,
            client=incoming.client,
            method=incoming.method,
            path=incoming.path,
            request_id=incoming.request_id,
        )

    def check_host_and_origin(self, incoming: Incoming) -> None:
        """403 unless Host is a name this server answers to and Origin (if any) is allowed.

        Loopback is reachable from every page in the user's browser: a hostile name that
        resolves to 127.0.0.1 (DNS rebinding) shows in Host, a cross-site request in Origin.
        """
        security = self.settings.security
        if not host_allowed(incoming.header("host"), incoming.server_port, security.allowed_hosts):
            host = incoming.original_host or incoming.header("host") or ""
            self.violation(incoming, "bad_host", f"Host {host[:100]!r}")
            raise ApiError(
                403,
                "Host must be a loopback name (127.0.0.1, localhost, [::1]) or one of security.allowed_hosts.",
                code="forbidden_host",
            )
        origin = incoming.header("origin")
        if not origin_allowed(origin, security.allowed_origins):
            self.violation(incoming, "bad_origin", f"Origin {origin[:100]!r}" if origin else "Origin")
            raise ApiError(403, "This Origin is not allowed (security.allowed_origins).", code="forbidden_origin")

    def cors_headers(self, incoming: Incoming) -> dict[str, str]:
        """What an answer to an allowed browser Origin carries (nothing for other clients)."""
        origin = incoming.header("origin")
        if origin and origin_allowed(origin, self.settings.security.allowed_origins):
            return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Vary": "Origin"}
        return {}

    def on_keyless_listener(self, incoming: Incoming) -> bool:
        return self.keyless_port is not None and incoming.server_port == self.keyless_port

    def authenticate(self, incoming: Incoming) -> Principal:
        """Who is asking: the key's label (401 without a valid key), audited either way."""
        client = incoming.client
        authorization = incoming.header("authorization")
        if self.on_keyless_listener(incoming):
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
            path=incoming.path,
            request_id=incoming.request_id,
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
            # Waiting for an agent to connect: watch the client meanwhile (it may give up).
            await watched(current_client(), partial(self.bridge.wait_for_agents, self.settings.mcp.agent_wait_timeout))
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

    async def admit(self, incoming: Incoming, principal: Principal, tokens: int) -> Admission:
        """A concurrency slot, a session and a rate reservation for one model request, or a
        503 (no slot within ``queue_timeout``) or 429 (rate or session limits)."""
        if self.draining:
            raise ApiError(503, "The server is shutting down; retry when it is back.", code="shutdown", headers={"Retry-After": "5"})
        slot = object()  # the borrower: the slot is released by whoever ends the request
        try:
            self.capacity.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            acquired = False

            async def acquire() -> None:
                nonlocal acquired
                await self.capacity.acquire_on_behalf_of(slot)
                acquired = True

            try:
                with trio.move_on_after(self.settings.performance.queue_timeout) as waited:
                    # Queued: watch the client meanwhile, so one that leaves leaves the queue.
                    await watched(current_client(), acquire)
            except BaseException:
                # The client left just as the slot came (the watcher's exit is a checkpoint).
                if acquired:
                    self.capacity.release_on_behalf_of(slot)
                raise
            # (The queue timeout may also strike just as the slot came: then it is served.)
            if waited.cancelled_caught and not acquired:
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
                principal, incoming.header("x-session-id"), tokens, trio.current_time()
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
                    request_id=incoming.request_id,
                )
            raise
        admission.on_release = lambda: self.capacity.release_on_behalf_of(slot)
        held = request_admissions.get()
        if held is not None:
            held.append(admission)
        return admission

    def response_headers(self, request_id: str, admission: Admission) -> dict[str, str]:
        headers = self.gate.limiter.headers(admission.principal.owner, trio.current_time())
        headers["X-Request-Id"] = request_id
        headers["X-Session-Id"] = admission.session.id
        return headers


