"""The bridge hub: agents register here and model requests are routed to them.

Peers reach the hub over a :class:`~trioprovider.bridge.streams.MessageStream`: a WebSocket
(``serve_bridge``) or, for the embedded provider and embedded agents, in process. The embedded
provider does not even need a stream: it calls :meth:`BridgeHub.start_call` directly.
"""

from __future__ import annotations

import hmac
import itertools
import logging
from dataclasses import dataclass, field
from functools import partial

from typing import Any

import trio

from trioprovider.bridge.calls import (
    Call,
    CallTable,
    Delivery,
    NoAgent,
    Overloaded,
    QueuedWait,
    Resolution,
    iso_time,
    resolve,
)
from trioprovider.audit import AuditLog
from trioprovider.bridge.streams import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    LocalMessageStream,
    MessageStream,
    PeerClosed,
    PeerMisbehaved,
    cancel_when_silent,
)
from trioprovider.logs import about
from trioprovider.protocol import (
    PROTOCOL_VERSION,
    AgentHello,
    AgentInfo,
    Catalog,
    HelloAck,
    HelloReject,
    Message,
    ModelCancel,
    ModelError,
    ModelInvoke,
    ModelResult,
    ModelStreamChunk,
    ProviderHello,
)

log = logging.getLogger(__name__)

_connection_ids = itertools.count(1)


@dataclass(eq=False)
class AgentLink:
    """One connected agent, as the hub tracks it."""

    hello: AgentHello
    stream: MessageStream
    calls: CallTable = field(default_factory=CallTable)
    connection_id: int = field(default_factory=lambda: next(_connection_ids))
    #: The agent said it is stopping (it refused a request with ``shutdown``): it finishes what
    #: it has, and no new request is routed to it.
    stopping: bool = False

    @property
    def has_capacity(self) -> bool:
        return len(self.calls) < self.hello.max_concurrency

    def serves(self, model: str) -> bool:
        return any(card.id == model for card in self.hello.models)

    def info(self) -> AgentInfo:
        return AgentInfo(
            agent_id=self.hello.agent_id,
            models=self.hello.models,
            max_concurrency=self.hello.max_concurrency,
            in_flight=len(self.calls),
        )


@dataclass(eq=False)
class _Relay:
    """A request relayed for a remote provider: the scope to cancel it and why."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: str = "client_disconnected"


class BridgeHub:
    """Routes model requests to registered agents; an implementation of ``Bridge``."""

    def __init__(
        self,
        *,
        token: str,
        default_model: str,
        queue_limit: int = 64,
        heartbeat_interval: float = 30.0,
        hello_timeout: float = 10.0,
        stall_timeout: float = 1.0,
        audit: AuditLog | None = None,
    ) -> None:
        if not token:
            raise ValueError("the bridge needs a token: any local user could otherwise register")
        self._token = token.encode()
        self.default_model = default_model
        self.queue_limit = queue_limit
        self.heartbeat_interval = heartbeat_interval
        self.hello_timeout = hello_timeout
        self.stall_timeout = stall_timeout
        self._links: list[AgentLink] = []
        self._queued = 0
        # Replaced on every change, so a waiter waits on the one current when it looked.
        self._capacity_changed = trio.Event()
        self._membership_changed = trio.Event()
        self.rejected_hellos = 0
        self.audit = audit or AuditLog.disabled()
        #: Every connection past its hello (agents and providers), for a clean shutdown.
        self._peers: set[MessageStream] = set()

    # -- what the provider asks -------------------------------------------------------------

    def agents(self) -> list[AgentInfo]:
        return [link.info() for link in self._links]

    def resolve(self, model: str) -> Resolution:
        # From the links' hellos: self.agents() would describe every agent on each request.
        return resolve(model, [link.hello.models for link in self._links], self.default_model)

    def in_flight(self) -> int:
        return sum(len(link.calls) for link in self._links)

    @property
    def queued(self) -> int:
        return self._queued

    async def wait_for_agents(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not self._links:
                await self._membership_changed.wait()
        return bool(self._links)

    async def start_call(self, invoke: ModelInvoke, *, queued: QueuedWait | None = None) -> Call:
        link = await self._claim(invoke.model, queued)
        call = link.calls.open(invoke.id, partial(self._cancel, link))
        try:
            await link.stream.send(invoke)
        except PeerClosed:
            link.calls.close(invoke.id)
            raise NoAgent(f"agent {link.hello.agent_id!r} disconnected") from None
        except BaseException:
            with trio.move_on_after(1, shield=True):
                await call.cancel("client_disconnected")
            raise
        return call

    def _candidates(self, model: str) -> list[AgentLink]:
        routable = [link for link in self._links if not link.stopping]
        candidates = [link for link in routable if link.serves(model)]
        if not candidates and model == self.default_model:
            candidates = routable
        return candidates

    def saturated(self, model: str) -> bool:
        """True if a request for ``model`` now would be refused as Overloaded."""
        if self._queued < self.queue_limit:  # asked on every request: the cheap test first
            return False
        candidates = self._candidates(model)
        return bool(candidates) and not any(link.has_capacity for link in candidates)

    async def _claim(self, model: str, queued_wait: QueuedWait | None = None) -> AgentLink:
        """An agent for ``model`` with a free slot, waiting (bounded by the queue) for one."""
        queued = False
        try:
            while True:
                candidates = self._candidates(model)
                if not candidates:
                    raise NoAgent(f"no connected agent serves model {model!r}")
                free = [link for link in candidates if link.has_capacity]
                if free:
                    return min(free, key=lambda link: len(link.calls))
                if not queued:
                    if self._queued >= self.queue_limit:
                        raise Overloaded(
                            f"every agent for {model!r} is busy and {self._queued} requests wait"
                        )
                    self._queued += 1
                    queued = True
                if queued_wait is None:
                    await self._capacity_changed.wait()
                else:
                    await queued_wait(self._capacity_changed.wait)
        finally:
            if queued:
                self._queued -= 1

    async def _cancel(self, link: AgentLink, request_id: str, reason: str) -> None:
        if link.calls.close(request_id):
            self._capacity_freed()
            try:
                await link.stream.send(ModelCancel(id=request_id, reason=reason))
            except PeerClosed:
                pass

    def _capacity_freed(self) -> None:
        if self._queued:
            self._capacity_changed.set()
            self._capacity_changed = trio.Event()

    def _membership_changed_now(self) -> None:
        self._membership_changed.set()
        self._membership_changed = trio.Event()
        self._capacity_changed.set()
        self._capacity_changed = trio.Event()

    # -- peers --------------------------------------------------------------------------------

    async def accept(self, stream: MessageStream) -> None:
        """Serve one peer for as long as it stays: hello first, then agent or provider traffic."""
        try:
            with trio.fail_after(self.hello_timeout):
                hello = await stream.receive()
        except PeerClosed as closed:
            self._audit_closed(stream, closed)
            await stream.aclose(CLOSE_POLICY, "no hello")
            return
        except trio.TooSlowError:
            await stream.aclose(CLOSE_POLICY, "no hello")
            return
        reason = self._check_hello(hello)
        if reason is not None:
            self.rejected_hellos += 1
            log.warning("bridge: rejected %s: %s", stream.peer, reason)
            self.audit.record("security_violation", kind="bridge_hello", detail=reason, client=stream.peer)
            try:
                await stream.send(HelloReject(id=getattr(hello, "id", "hello"), reason=reason))
            except PeerClosed:
                pass
            await stream.aclose(CLOSE_POLICY, reason[:120])
            return
        self._peers.add(stream)
        try:
            if isinstance(hello, AgentHello):
                await self._serve_agent(hello, stream)
            else:
                await stream.send(HelloAck(id=hello.id))
                await self._serve_provider(stream)
        except PeerClosed:
            pass
        finally:
            self._peers.discard(stream)
            await stream.aclose()

    def _audit_closed(self, stream: MessageStream, closed: PeerClosed) -> None:
        """Audit a connection that ended because its peer broke the rules."""
        if isinstance(closed, PeerMisbehaved):
            self.audit.record("security_violation", kind="bridge_invalid_frame", detail=str(closed)[:200], client=stream.peer)
        elif closed.code == CLOSE_TOO_BIG:
            self.audit.record("security_violation", kind="bridge_oversize_frame", detail="frame over mcp.max_frame_bytes", client=stream.peer)

    def connection(self) -> dict[str, Any]:
        # Embedded: the provider reaches the hub in-process; what matters is who is attached.
        seen = [link.stream.last_seen for link in self._links if link.stream.last_seen is not None]
        return {
            "status": "embedded",
            "agents": len(self._links),
            "peers": len(self._peers),
            "last_ping": iso_time(max(seen, default=None)),
        }

    async def aclose(self) -> None:
        """Say goodbye (1001, going away) to every peer at once, while their connections can
        still complete the close handshake: at shutdown, before the listener is cancelled."""
        async with trio.open_nursery() as nursery:
            for stream in list(self._peers):
                nursery.start_soon(stream.aclose, 1001, "bridge shutting down")

    def _check_hello(self, hello: object) -> str | None:
        if not isinstance(hello, (AgentHello, ProviderHello)):
            return "the first message must be agent_hello or provider_hello"
        if hello.protocol_version != PROTOCOL_VERSION:
            return (
                f"protocol_version {hello.protocol_version} is not supported; "
                f"this bridge speaks version {PROTOCOL_VERSION}"
            )
        if not hmac.compare_digest(hello.token.encode(), self._token):
            return "invalid bridge token (set LOCAL_PROVIDER_BRIDGE_TOKEN or mcp.token)"
        return None

    async def _serve_agent(self, hello: AgentHello, stream: MessageStream) -> None:
        link = AgentLink(hello, stream)
        self._links.append(link)
        self._membership_changed_now()
        log.info(
            "bridge: agent %r connected from %s serving %s",
            hello.agent_id,
            stream.peer,
            ", ".join(card.id for card in hello.models),
        )
        if isinstance(stream, LocalMessageStream):
            # An in-process agent's replies go to their calls in the agent's own task, as it
            # sends them: no hop through the reader task (one scheduling pass per message,
            # serialised over every request of the connection). Same delivery, same bounds.
            stream.inbox = partial(self._take, link)
        try:
            # Registered before the ack: once the agent hears it is in, it is routable.
            await stream.send(HelloAck(id=hello.id))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_silent, stream, self.heartbeat_interval, nursery.cancel_scope)
                await self._read_agent(link)
                nursery.cancel_scope.cancel()
        finally:
            if isinstance(stream, LocalMessageStream):
                stream.inbox = None
            self._links.remove(link)
            # Every request it held ends now with agent_disconnected (see Call).
            link.calls.close_all()
            self._membership_changed_now()
            log.info("bridge: agent %r disconnected", hello.agent_id)

    async def _read_agent(self, link: AgentLink) -> None:
        while True:
            try:
                message = await link.stream.receive()
            except PeerClosed as closed:
                self._audit_closed(link.stream, closed)
                return
            await self._take(link, message)

    async def _take(self, link: AgentLink, message: Message) -> None:
        """Hand one message from an agent to its call (in the reader task, or the agent's own
        for an in-process agent). Waits only while that call's buffer is full, up to the stall
        timeout; a peer gone while we answer it is the reader's to notice."""
        if isinstance(message, (ModelStreamChunk, ModelResult, ModelError)):
            outcome = link.calls.deliver_nowait(message)
            if outcome is None:  # its buffer is full: wait for room, a bounded time
                outcome = await link.calls.deliver(message, self.stall_timeout)
            if outcome is Delivery.STALLED:
                log.warning("bridge: request %s dropped: its client stopped reading", message.id, extra=about(message.id))
                self._capacity_freed()
                try:
                    await link.stream.send(ModelCancel(id=message.id, reason="client_too_slow"))
                except PeerClosed:
                    pass
            elif outcome is Delivery.UNKNOWN:
                # Normal just after a cancel crosses an answer; otherwise the agent answered
                # a request it was not given, which is dropped either way.
                log.debug("bridge: %s for request %s not in flight", message.type, message.id, extra=about(message.id))
            elif not isinstance(message, ModelStreamChunk):
                self._capacity_freed()
            if isinstance(message, ModelError) and message.code == "shutdown" and not link.stopping:
                link.stopping = True
                log.info("bridge: agent %r is stopping; new requests go to other agents", link.hello.agent_id)
        else:
            log.warning(
                "bridge: agent %r sent %s, which agents may not send; ignored",
                link.hello.agent_id,
                message.type,
            )

    async def _serve_provider(self, stream: MessageStream) -> None:
        relays: dict[str, _Relay] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_catalog, stream)
            nursery.start_soon(cancel_when_silent, stream, self.heartbeat_interval, nursery.cancel_scope)
            while True:
                try:
                    message = await stream.receive()
                except PeerClosed as closed:
                    self._audit_closed(stream, closed)
                    break
                if isinstance(message, ModelInvoke):
                    if message.id in relays:
                        try:
                            await stream.send(
                                ModelError(
                                    id=message.id, code="duplicate_id", message="request id in use"
                                )
                            )
                        except PeerClosed:
                            break
                        continue
                    relays[message.id] = _Relay()
                    nursery.start_soon(self._relay, stream, message, relays)
                elif isinstance(message, ModelCancel):
                    relay = relays.get(message.id)
                    if relay is not None:
                        relay.reason = message.reason
                        relay.scope.cancel()
                else:
                    log.warning("bridge: provider sent %s; ignored", message.type)
            nursery.cancel_scope.cancel()

    async def _publish_catalog(self, stream: MessageStream) -> None:
        while True:
            changed = self._membership_changed
            try:
                await stream.send(Catalog(id="catalog", agents=self.agents()))
            except PeerClosed:
                return  # the reader sees the same and ends the connection
            await changed.wait()

    async def _relay(
        self, stream: MessageStream, invoke: ModelInvoke, relays: dict[str, _Relay]
    ) -> None:
        relay = relays[invoke.id]
        try:
            with relay.scope:
                try:
                    call = await self.start_call(invoke)
                except (NoAgent, Overloaded) as error:
                    code = "no_agent" if isinstance(error, NoAgent) else "overloaded"
                    await stream.send(
                        ModelError(id=invoke.id, code=code, message=str(error), retryable=True)
                    )
                    return
                try:
                    async for reply in call:
                        await stream.send(reply)
                finally:
                    with trio.move_on_after(1, shield=True):
                        await call.cancel(relay.reason)
        except PeerClosed:
            pass
        finally:
            del relays[invoke.id]

