"""The Ollama-compatible routes: ``/api/*`` and the ``Ollama is running`` root (Quart), and the
two model routes, ``/api/chat`` and ``/api/generate`` (plain functions served by
:mod:`trioprovider.model_routes`)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from quart import Blueprint, Response, jsonify

from trioprovider import __version__
from trioprovider.app import current_provider, read_json
from trioprovider.auth import Principal
from trioprovider.bridge.calls import catalog
from trioprovider.errors import invalid_request, model_not_found
from trioprovider.incoming import Incoming
from trioprovider.protocol import ModelCard
from trioprovider.provider import Provider, current_incoming
from trioprovider.routes.model_requests import Reply, defaults, open_scope, respond
from trioprovider.scope import RequestScope
from trioprovider.wire.ollama import (
    ROOT_TEXT,
    VERSION_PAYLOAD,
    OllamaChatEncoder,
    OllamaChatRequest,
    OllamaGenerateEncoder,
    OllamaGenerateRequest,
    Timing,
    ollama_chat_invoke,
    ollama_chat_response,
    ollama_generate_invoke,
    ollama_generate_response,
    ps_payload,
    show_payload,
    tags_payload,
)
from trioprovider.wire.openai import parse_request

blueprint = Blueprint("ollama", __name__)

NDJSON = "application/x-ndjson"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cards() -> list[ModelCard]:
    provider = current_provider()
    return catalog(provider.bridge.agents(), provider.settings.provider.model_name)


@blueprint.route("/", methods=["GET", "HEAD"])
async def root() -> Response:
    return Response(ROOT_TEXT, mimetype="text/plain")


@blueprint.get("/api/version")
async def version() -> Response:
    return jsonify({**VERSION_PAYLOAD, "trioprovider": __version__})


@blueprint.get("/api/tags")
async def tags() -> Response:
    current_provider().authenticate(current_incoming())
    return jsonify(tags_payload(_cards(), _now()))


@blueprint.get("/api/ps")
async def ps() -> Response:
    current_provider().authenticate(current_incoming())
    return jsonify(ps_payload(_cards()))


@blueprint.post("/api/show")
async def show() -> Response:
    current_provider().authenticate(current_incoming())
    body = await read_json()
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid_request("model: Field required", param="model")
    cards = _cards()
    for card in cards:
        if card.id == name:
            return jsonify(show_payload(card))
    raise model_not_found(name, [card.id for card in cards])


def _timing_of(scope: RequestScope) -> Timing:
    """Nanosecond readings of a finished scope (Trio's clock is monotonic seconds)."""

    def ns(seconds: float | None) -> int | None:
        return None if seconds is None else int(seconds * 1e9)

    return Timing(started_ns=int(scope.started_at * 1e9), first_token_ns=ns(scope.first_token_at), finished_ns=ns(scope.finished_at))


async def chat(provider: Provider, incoming: Incoming, principal: Principal, body: Any) -> Reply:
    """``POST /api/chat``."""
    chat_request: OllamaChatRequest = parse_request(OllamaChatRequest, body)
    invoke = ollama_chat_invoke(
        chat_request,
        body.get("messages") or [],
        request_id=incoming.request_id,
        session_id="",
        defaults=defaults(provider),
        supports_vision=lambda: provider.supports_vision(chat_request.model),
    )
    scope, headers = await open_scope(provider, incoming, principal, invoke, heartbeat=False)
    return await respond(
        scope,
        headers,
        stream=chat_request.stream,
        encoder=lambda: OllamaChatEncoder(chat_request.model, _now(), Timing(started_ns=time.monotonic_ns()), clock=time.monotonic_ns),
        content_type=NDJSON,
        whole=lambda answer: ollama_chat_response(answer, chat_request.model, _now(), _timing_of(scope)),
    )


async def generate(provider: Provider, incoming: Incoming, principal: Principal, body: Any) -> Reply:
    """``POST /api/generate``."""
    generate_request: OllamaGenerateRequest = parse_request(OllamaGenerateRequest, body)
    invoke = ollama_generate_invoke(
        generate_request, request_id=incoming.request_id, session_id="", defaults=defaults(provider)
    )
    scope, headers = await open_scope(provider, incoming, principal, invoke, heartbeat=False)
    return await respond(
        scope,
        headers,
        stream=generate_request.stream,
        encoder=lambda: OllamaGenerateEncoder(generate_request.model, _now(), Timing(started_ns=time.monotonic_ns()), clock=time.monotonic_ns),
        content_type=NDJSON,
        whole=lambda answer: ollama_generate_response(answer, generate_request.model, _now(), _timing_of(scope)),
    )
