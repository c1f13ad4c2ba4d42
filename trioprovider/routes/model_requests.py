"""What every model route does once its request is parsed: admit it, give it a RequestScope,
and answer as a stream or as one body. Shared by the OpenAI and Ollama surfaces.

Nothing here knows a web framework: a model route returns a :class:`Reply` and
:mod:`trioprovider.model_routes` puts it on the wire.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trioprovider.auth import Principal
from trioprovider.errors import ApiError
from trioprovider.incoming import Incoming
from trioprovider.protocol import ModelInvoke
from trioprovider.provider import Provider, current_client, current_exchange
from trioprovider.scope import Deadlines, RequestScope, WireEncoder
from trioprovider.tokens import estimate_prompt_tokens
from trioprovider.validation import SizeLimits, check_sizes
from trioprovider.wire.answer import Answer
from trioprovider.wire.openai import Defaults

#: Prompts are logged here only when ``logging.log_prompts`` is true (never by default).
prompt_log = logging.getLogger("trioprovider.prompts")


def defaults(provider: Provider) -> Defaults:
    model = provider.settings.model
    return Defaults(max_tokens=model.max_tokens, temperature=model.temperature, top_p=model.top_p)


def _deadlines(provider: Provider) -> Deadlines:
    performance = provider.settings.performance

    def seconds(value: float) -> float:
        return value if value > 0 else math.inf

    return Deadlines(first_event=seconds(performance.request_timeout), total=seconds(performance.response_timeout))


@dataclass
class WholeReply:
    """An answer sent at once: a JSON body."""

    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StreamReply:
    """An answer streamed as the agent writes it: the scope's events through ``encoder``."""

    scope: RequestScope
    encoder: WireEncoder
    headers: dict[str, str]
    content_type: str


Reply = WholeReply | StreamReply


async def open_scope(
    provider: Provider, incoming: Incoming, principal: Principal, invoke: ModelInvoke, *, heartbeat: bool
) -> tuple[RequestScope, dict[str, str]]:
    """Admit a fully validated request; its scope and the headers every answer carries.

    Validation comes first, in the caller: a bad request changes no budget and no session.
    """
    security = provider.settings.security
    check_sizes(invoke, SizeLimits(security.max_messages, security.max_content_bytes, security.max_total_content_bytes))
    prompt_tokens = estimate_prompt_tokens(invoke.messages, invoke.prompt)
    try:
        await provider.require_model(invoke.model)
        admission = await provider.admit(incoming, principal, prompt_tokens + (invoke.max_tokens or 0))
    except ApiError as error:
        exchange = current_exchange()
        provider.metrics.model_request_refused(
            invoke.model, error.status, error.code, route=exchange.route if exchange else None, request_id=invoke.id
        )
        raise
    invoke.session_id = admission.session.id
    if provider.settings.logging.log_prompts:
        text = invoke.messages if invoke.messages is not None else {"prompt": invoke.prompt, "suffix": invoke.suffix}
        prompt_log.info("request %s prompt: %s", invoke.id, json.dumps(text, ensure_ascii=False))
    scope = RequestScope(
        provider.bridge,
        invoke,
        prompt_tokens=prompt_tokens,
        admission=admission,
        deadlines=_deadlines(provider),
        heartbeat_interval=provider.settings.performance.heartbeat_interval if heartbeat else None,
        observer=provider,
        client=current_client(),
    )
    return scope, provider.response_headers(invoke.id, admission)


async def gather(scope: RequestScope) -> Answer:
    """Run a request to its end and join its events (no stream: nothing to send until then)."""
    answer = Answer()
    answer.feed(await scope.run_to_end())
    return answer


async def respond(
    scope: RequestScope,
    headers: dict[str, str],
    *,
    stream: bool,
    encoder: Callable[[], WireEncoder],
    content_type: str,
    whole: Callable[[Answer], dict[str, Any]],
) -> Reply:
    """A stream of ``encoder()``'s records, or (no stream) the request run to its end as ``whole``."""
    if stream:
        return StreamReply(scope, encoder(), {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, content_type)
    answer = await gather(scope)
    if answer.error is not None:
        raise answer.error.with_headers(headers)
    return WholeReply(whole(answer), headers)
