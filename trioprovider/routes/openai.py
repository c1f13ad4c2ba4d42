"""The OpenAI-compatible routes under ``/v1``."""

from __future__ import annotations

import math
import time
from quart import Blueprint, Response, jsonify, request

from trioprovider.app import current_provider, read_json
from trioprovider.bridge.calls import catalog
from trioprovider.scope import Deadlines, RequestScope, StreamingBody
from trioprovider.tokens import estimate_prompt_tokens
from trioprovider.wire.answer import Answer
from trioprovider.wire.openai import (
    ChatCompletionRequest,
    ChatStreamEncoder,
    Defaults,
    chat_completion,
    chat_invoke,
    parse_request,
)

blueprint = Blueprint("openai", __name__)


@blueprint.get("/v1/models")
async def list_models() -> Response:
    provider = current_provider()
    provider.authenticate()
    owners = {card.id: agent.agent_id for agent in provider.bridge.agents() for card in agent.models}
    created = int(provider.started_at)
    models = catalog(provider.bridge.agents(), provider.settings.provider.model_name)
    return jsonify(
        {
            "object": "list",
            "data": [
                {
                    "id": card.id,
                    "object": "model",
                    "created": created,
                    "owned_by": owners.get(card.id, "trioprovider"),
                    **card.model_dump(exclude={"id"}, exclude_none=True),
                }
                for card in models
            ],
        }
    )


def _deadlines() -> Deadlines:
    performance = current_provider().settings.performance

    def seconds(value: float) -> float:
        return value if value > 0 else math.inf

    return Deadlines(first_event=seconds(performance.request_timeout), total=seconds(performance.response_timeout))


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    provider = current_provider()
    principal = provider.authenticate()
    body = await read_json()
    chat: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
    model_settings = provider.settings.model
    defaults = Defaults(
        max_tokens=model_settings.max_tokens,
        temperature=model_settings.temperature,
        top_p=model_settings.top_p,
    )
    request_id: str = request.request_id  # type: ignore[attr-defined]
    completion_id = f"chatcmpl-{request_id}"
    # Validate fully before taking anything: a bad request changes no budget and no session.
    invoke = chat_invoke(chat, body["messages"], request_id=request_id, session_id="", defaults=defaults)
    await provider.require_model(chat.model)
    prompt_tokens = estimate_prompt_tokens(invoke.messages)
    admission = provider.admit(principal, prompt_tokens + (invoke.max_tokens or 0))
    invoke.session_id = admission.session.id
    scope = RequestScope(
        provider.bridge,
        invoke,
        prompt_tokens=prompt_tokens,
        admission=admission,
        deadlines=_deadlines(),
        heartbeat_interval=provider.settings.performance.heartbeat_interval if chat.stream else None,
        observer=provider,
    )
    headers = provider.response_headers(request_id, admission)
    created = int(time.time())
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        encoder = ChatStreamEncoder(completion_id, created, chat.model, include_usage)
        response = Response(
            StreamingBody(scope, encoder),
            mimetype="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # Quart's RESPONSE_TIMEOUT would otherwise cut a long answer off silently.
        response.timeout = None
        return response
    answer = await _gather(scope)
    if answer.error is not None:
        raise answer.error.with_headers(headers)
    response = jsonify(chat_completion(answer, completion_id, created, chat.model))
    response.headers.update(headers)
    return response


async def _gather(scope: RequestScope) -> Answer:
    """Run a request to its end and join its events (no stream: nothing to send until then)."""
    answer = Answer()
    async with scope:
        while True:
            try:
                batch = await scope.receive_batch()
            except StopAsyncIteration:
                break
            answer.feed(batch)
    return answer
