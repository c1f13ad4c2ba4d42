"""The ``openai`` agent: forwards each request to an OpenAI-compatible server.

Ollama, llama.cpp, vLLM, LM Studio or a hosted API answer; this agent only carries requests
there and chunks back, with one shared ``httpx.AsyncClient`` (httpx runs on Trio through anyio).
A ``model_cancel`` cancels the request's task, which leaves ``client.stream(...)`` and so closes
the upstream response mid-answer: the upstream sees its client go and stops writing.
The translation is pure, in :mod:`trioprovider.agents.upstream_wire`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
        self._client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Hold the HTTP client while serving; learn the models first if none were configured."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout))
        # Pooled connections stay open for reuse; one per request in flight, plus discovery.
        limits = httpx.Limits(max_connections=self.max_concurrency + 1, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits, trust_env=False) as client:
            self._client = client
            try:
                if not self.models:
                    self.models = await self._discover_models(client)
                    log.info("agent %r: upstream %s serves %s", self.agent_id, self.root, ", ".join(card.id for card in self.models))
                yield
            finally:
                self._client = None

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
        if self._client is None:
            raise RuntimeError("UpstreamAgent.answer called outside its running() context")
        path, body = upstream_request(invoke, upstream_model(invoke.model, [card.id for card in self.models]))
        if not invoke.stream:
            # An unstreamed upstream says nothing until its answer is whole, which may take
            # longer than the provider's first-reply deadline: say now that the request is in
            # the upstream's hands. Its silence is bounded by our own ``timeout`` instead.
            await out.send(Delta())
        try:
            async with self._client.stream("POST", self.root + path, json=body) as response:
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
