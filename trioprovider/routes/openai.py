"""The OpenAI-compatible routes under ``/v1``: the model list (Quart) and the two model routes
(plain functions served by :mod:`trioprovider.model_routes`)."""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, jsonify

from trioprovider.app import current_provider
from trioprovider.auth import Principal
from trioprovider.bridge.calls import catalog
from trioprovider.errors import model_not_found
from trioprovider.incoming import Incoming
from trioprovider.provider import Provider, current_incoming
from trioprovider.routes.model_requests import Reply, defaults, open_scope, respond
from trioprovider.wire.openai import (
    ChatCompletionRequest,
    ChatStreamEncoder,
    CompletionRequest,
    CompletionStreamEncoder,
    chat_completion,
    chat_invoke,
    completion_invoke,
    normalize_messages,
    parse_request,
    text_completion,
)

blueprint = Blueprint("openai", __name__)


def _model_entries(provider: Provider) -> list[dict[str, Any]]:
    agents = provider.bridge.agents()
    owners = {card.id: agent.agent_id for agent in agents for card in agent.models}
    created = int(provider.started_at)
    return [
        {
            "id": card.id,
            "object": "model",
            "created": created,
            "owned_by": owners.get(card.id, "trioprovider"),
            **card.model_dump(exclude={"id"}, exclude_none=True),
        }
        for card in catalog(agents, provider.settings.provider.model_name)
    ]


@blueprint.get("/v1/models")
async def list_models() -> Response:
    provider = current_provider()
    provider.authenticate(current_incoming())
    return jsonify({"object": "list", "data": _model_entries(provider)})


@blueprint.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    provider = current_provider()
    provider.authenticate(current_incoming())
    for entry in _model_entries(provider):
        if entry["id"] == model_id:
            return jsonify(entry)
    raise model_not_found(model_id, [entry["id"] for entry in _model_entries(provider)])


async def chat_completions(provider: Provider, incoming: Incoming, principal: Principal, body: Any) -> Reply:
    """``POST /v1/chat/completions``."""
    chat: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
    request_id = incoming.request_id
    messages = normalize_messages(body["messages"], supports_vision=lambda: provider.supports_vision(chat.model))
    invoke = chat_invoke(chat, messages, request_id=request_id, session_id="", defaults=defaults(provider))
    scope, headers = await open_scope(provider, incoming, principal, invoke, heartbeat=chat.stream)
    completion_id, created = f"chatcmpl-{request_id}", int(time.time())
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    return await respond(
        scope,
        headers,
        stream=chat.stream,
        encoder=lambda: ChatStreamEncoder(completion_id, created, chat.model, include_usage),
        content_type="text/event-stream",
        whole=lambda answer: chat_completion(answer, completion_id, created, chat.model),
    )


async def completions(provider: Provider, incoming: Incoming, principal: Principal, body: Any) -> Reply:
    """``POST /v1/completions``: legacy completions, and fill-in-the-middle when a ``suffix``
    is sent (VoidEditor's FIM)."""
    completion: CompletionRequest = parse_request(CompletionRequest, body)
    request_id = incoming.request_id
    invoke = completion_invoke(completion, request_id=request_id, session_id="", defaults=defaults(provider))
    scope, headers = await open_scope(provider, incoming, principal, invoke, heartbeat=completion.stream)
    completion_id, created = f"cmpl-{request_id}", int(time.time())
    include_usage = bool(completion.stream_options and completion.stream_options.include_usage)
    return await respond(
        scope,
        headers,
        stream=completion.stream,
        encoder=lambda: CompletionStreamEncoder(completion_id, created, completion.model, include_usage),
        content_type="text/event-stream",
        whole=lambda answer: text_completion(answer, completion_id, created, completion.model),
    )
