"""The ``openai`` agent: forwards each request to an OpenAI-compatible server.

Ollama, llama.cpp, vLLM, LM Studio or a hosted API answer; this agent only carries requests
there and chunks back, through pooled ``httpx.AsyncClient`` connections (httpx runs on Trio through
anyio; see :class:`ClientShards` for why several clients).
A ``model_cancel`` cancels the request's task, which leaves ``client.stream(...)`` and so closes
the upstream response mid-answer: the upstream sees its client go and stops writing.
The translation is pure, in :mod:`trioprovider.agents.upstream_wire`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Generic, TypeVar

import httpx

from trioprovider.agents.runner import AgentFailure, AgentStartError, AnswerStream
from trioprovider.agents.upstream_wire import (
    MAX_EVENT_CHARS,
    SseDecoder,
    UpstreamStream,
    api_root,
    bad_response,
    error_detail,
    model_cards,
    status_failure,
    upstream_model,
    upstream_request,
    whole_answer,
)
from trioprovider.protocol import Delta, ModelCard, ModelInvoke, ModelResult, Usage

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection, whatever ``timeout`` says: a server that is there accepts
#: at once, and a dead address should not hold a request for minutes.
CONNECT_TIMEOUT = 10.0
#: Requests (and so connections) at once on one HTTP client; see ClientShards.
CONNECTIONS_PER_CLIENT = 8

Client = TypeVar("Client")


class ClientShards(Generic[Client]):
    """HTTP clients of at most ``per_client`` requests at once each, made as needed.

    httpcore's connection pool looks at every connection it holds whenever a request starts or
    ends, and asks the OS whether each idle one was closed: one pool of 20 connections was a
    tenth of this agent's CPU at 20 requests at once, and the cost grows with the pool. Spread
    over small pools, each request pays for a few. A request takes the first client with room
    (so idle connections gather in the first clients), or a new client when all are full.
    """

    def __init__(self, make: Callable[[], Client], per_client: int = CONNECTIONS_PER_CLIENT) -> None:
        self._make = make
        self.per_client = per_client
        self.clients: list[Client] = []
        self._busy: list[int] = []

    def take(self) -> int:
        """The index of a client with room for one more request, which it now counts."""
        for index, busy in enumerate(self._busy):
            if busy < self.per_client:
                self._busy[index] += 1
                return index
        self.clients.append(self._make())
        self._busy.append(1)
        return len(self.clients) - 1

    def give_back(self, index: int) -> None:
        self._busy[index] -= 1

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Client]:
        index = self.take()
        try:
            yield self.clients[index]
        finally:
            self.give_back(index)


class UpstreamAgent:
    """Serves the upstream's models by forwarding to its ``/v1`` API."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str = "",
        models: list[str] | None = None,
        timeout: float = 300.0,
        max_concurrency: int = 8,
        agent_id: str = "openai",
    ) -> None:
        self.agent_id = agent_id
        self.root = api_root(base_url)
        self.api_key = api_key
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        #: Empty until :meth:`running` has asked the upstream, when none are configured.
        self.models = [ModelCard(id=name, supports_tools=True) for name in models or ()]
        self._clients: ClientShards[httpx.AsyncClient] | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Hold the HTTP clients while serving; learn the models first if none were configured."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout))
        # Pooled connections stay open for reuse; the shards see to it that no client is
        # asked for more at once than it holds.
        limits = httpx.Limits(max_connections=CONNECTIONS_PER_CLIENT, max_keepalive_connections=CONNECTIONS_PER_CLIENT)
        # One TLS context for all the clients, as each would make by default (loading the CA store).
        tls = httpx.create_ssl_context(trust_env=False)
        async with AsyncExitStack() as stack:

            def make() -> httpx.AsyncClient:
                client = httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits, trust_env=False, verify=tls)
                stack.push_async_callback(client.aclose)
                return client

            self._clients = ClientShards(make, CONNECTIONS_PER_CLIENT)
            try:
                if not self.models:
                    async with self._clients.lease() as client:
                        self.models = await self._discover_models(client)
                    log.info("agent %r: upstream %s serves %s", self.agent_id, self.root, ", ".join(card.id for card in self.models))
                yield
            finally:
                self._clients = None

    async def _discover_models(self, client: httpx.AsyncClient) -> list[ModelCard]:
        url = f"{self.root}/models"
        advice = "start it, or name its models (--model NAME, agents.openai.models)"
        try:
            response = await client.get(url)
        except httpx.HTTPError as error:
            raise AgentStartError(f"agent openai: cannot list the upstream's models at {url}: {_describe(error)}; {advice}") from None
        if response.status_code != 200:
            raise AgentStartError(
                f"agent openai: listing the upstream's models at {url} got HTTP {response.status_code}: "
                f"{error_detail(response.content)}; {advice}"
            )
        try:
            cards = model_cards(response.content)
        except ValueError as error:
            raise AgentStartError(f"agent openai: {url}: {error}") from None
        if not cards:
            raise AgentStartError(f"agent openai: the upstream at {url} lists no models; {advice}")
        return cards

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        if self._clients is None:
            raise RuntimeError("UpstreamAgent.answer called outside its running() context")
        path, body = upstream_request(invoke, upstream_model(invoke.model, [card.id for card in self.models]))
        if not invoke.stream:
            # An unstreamed upstream says nothing until its answer is whole, which may take
            # longer than the provider's first-reply deadline: say now that the request is in
            # the upstream's hands. Its silence is bounded by our own ``timeout`` instead.
            await out.send(Delta())
        try:
            async with self._clients.lease() as client, client.stream("POST", self.root + path, json=body) as response:
                if response.status_code >= 300:
                    raise status_failure(response.status_code, await _read_bounded(response), self.root)
                content_type = response.headers.get("content-type", "")
                if content_type.startswith("application/json"):
                    choices, usage = whole_answer(await _read_bounded(response), self.root)
                elif content_type.startswith("text/html"):
                    # A web page where the API should be: most likely a wrong base URL.
                    raise bad_response(self.root, f"a web page ({content_type}), not an event stream; is the base URL right?")
                else:
                    choices, usage = await self._forward_stream(invoke, response, out)
        except httpx.TimeoutException as error:
            raise AgentFailure("timeout", f"upstream {self.root}: {_describe(error)}", retryable=True) from None
        except httpx.HTTPError as error:
            code = "upstream_unreachable" if isinstance(error, httpx.ConnectError) else "upstream_error"
            raise AgentFailure(code, f"upstream {self.root}: {_describe(error)}", retryable=True) from None
        return ModelResult(id=invoke.id, choices=choices, usage=usage)

    async def _forward_stream(
        self, invoke: ModelInvoke, response: httpx.Response, out: AnswerStream
    ) -> tuple[list[dict[str, Any]], Usage | None]:
        decoder = SseDecoder()
        stream = UpstreamStream(invoke.kind, self.root)
        # Read on after [DONE] to the body's end, so the connection can be reused.
        async for data in response.aiter_bytes():
            try:
                events = decoder.feed(data)
            except ValueError as error:
                raise bad_response(self.root, str(error)) from None
            for event in events:
                for chunk in stream.feed(event):
                    # Not streamed (an upstream that streams anyway): the answer goes whole in
                    # the result, one message rather than one per chunk.
                    if invoke.stream:
                        await out.send(chunk.delta, chunk.finish_reason)
        stream.end()
        return stream.result()


async def _read_bounded(response: httpx.Response, limit: int = MAX_EVENT_CHARS) -> bytes:
    """The response body, cut at ``limit`` bytes (an error page need not be read whole)."""
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _describe(error: httpx.HTTPError) -> str:
    """A one-line account of a transport failure: what failed, and the OS's words."""
    kinds: dict[type[httpx.HTTPError], str] = {
        httpx.ConnectTimeout: "no connection in time",
        httpx.ReadTimeout: "it stayed silent longer than the timeout (agents.openai.timeout)",
        httpx.WriteTimeout: "sending the request timed out",
        httpx.PoolTimeout: "no free connection in time",
        httpx.ConnectError: "cannot connect",
        httpx.RemoteProtocolError: "the connection broke mid-answer",
        httpx.ReadError: "the connection broke mid-answer",
    }
    kind = kinds.get(type(error), type(error).__name__)
    detail = str(error).strip()
    return f"{kind} ({detail})" if detail else kind
