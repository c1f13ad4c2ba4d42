"""The Ollama wire format: ``/api/chat`` and ``/api/generate`` in, NDJSON lines or one JSON body out.

Also the payloads of Ollama's metadata routes (``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``). Pure: the caller supplies timestamps and monotonic readings, so every byte
is reproducible in tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trioprovider.errors import invalid_request
from trioprovider.events import DeltaEvent, Event, Failed, Finished, Heartbeat
from trioprovider.protocol import Delta, ModelCard, ModelInvoke, Usage
from trioprovider.wire.answer import Answer
from trioprovider.wire.framing import ndjson_line
from trioprovider.wire.openai import Defaults, Tool, tool_dicts

#: What ``GET /api/version`` reports. Some Ollama clients gate features (tools, thinking) on the
#: server version, so we claim one recent enough to have both.
OLLAMA_VERSION = "0.9.0"
VERSION_PAYLOAD: dict[str, Any] = {"version": OLLAMA_VERSION}

#: The body of ``GET /`` — clients (and Void's auto-detection) probe for exactly this text.
ROOT_TEXT = "Ollama is running"

#: The largest ``num_predict`` we pass on; the OpenAI side caps ``max_tokens`` the same way.
MAX_TOKENS = 8192


# -- requests ----------------------------------------------------------------------------------


class Options(BaseModel):
    # Ollama has dozens of runner options (num_ctx, seed, mirostat, …); unknown ones are
    # tolerated and ignored, since the agent, not a local runner, decides them.
    model_config = ConfigDict(extra="allow")

    num_predict: int | None = None
    stop: str | list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None


class OllamaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1)]
    # Ollama sends a JSON object; a string is accepted too, for clients that copy OpenAI.
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Assistant messages that only call tools may leave content out (or send null).
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None


class OllamaChatRequest(BaseModel):
    # Unknown top-level fields are tolerated: Ollama adds fields often and clients send them.
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: Options | None = None
    tools: list[Tool] | None = None
    # Accepted and ignored: structured output, model residency and thinking are the agent's call.
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class OllamaGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    # Accepted and ignored: agents apply their own prompt format, and there is no token
    # ``context`` to resume from.
    template: str | None = None
    raw: bool = False
    stream: bool = True
    options: Options | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    keep_alive: str | int | float | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None


def _sampling(options: Options | None, defaults: Defaults) -> dict[str, Any]:
    """``options`` as ModelInvoke fields, with server defaults for what the client left out."""
    options = options or Options()
    # num_predict -1 means "no limit" and -2 "fill the context" in Ollama; neither has a
    # meaning for an agent, so any negative value gets the server default like a missing one.
    if options.num_predict is None or options.num_predict < 0:
        max_tokens = defaults.max_tokens
    else:
        max_tokens = min(max(options.num_predict, 1), MAX_TOKENS)
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    return {
        "max_tokens": max_tokens,
        "temperature": defaults.temperature if options.temperature is None else options.temperature,
        "top_p": defaults.top_p if options.top_p is None else options.top_p,
        "stop": stop or None,
    }


def _openai_messages(raw_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages in the OpenAI shape agents expect; only tool calling differs.

    Ollama's assistant ``tool_calls`` carry ``arguments`` as a JSON object and no id, and its
    tool results name no call. Agents speak OpenAI, where arguments are a JSON string and
    every result points at a call id, so we give calls stable ids and hand them out, in
    order (by ``tool_name`` when the client sends one), to the tool messages that follow.
    """
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, function name) of calls not yet answered
    for m_index, message in enumerate(raw_messages):
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            converted = []
            pending = []
            for c_index, call in enumerate(calls):
                function = call.get("function") or {}
                arguments = function.get("arguments", {})
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                call_id = call.get("id") or f"call_{m_index}_{c_index}"
                name = function.get("name", "")
                converted.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
                pending.append((call_id, name))
            message = {**message, "tool_calls": converted}
        elif message.get("role") == "tool" and "tool_call_id" not in message and pending:
            wanted = message.get("tool_name")
            match = next((i for i, (_, name) in enumerate(pending) if name == wanted), 0)
            message = {**message, "tool_call_id": pending.pop(match)[0]}
        out.append(message)
    return out


def ollama_chat_invoke(
    request: OllamaChatRequest,
    raw_messages: list[dict[str, Any]],
    *,
    request_id: str,
    session_id: str,
    defaults: Defaults,
    supports_vision: Callable[[], bool] = lambda: False,
) -> ModelInvoke:
    """The ``model_invoke`` for ``/api/chat``. Text reaches the agent exactly as sent.

    ``raw_messages`` are the body's messages before validation, so keys this module does not
    know are forwarded untouched. Images pass only to models whose agent advertises vision
    (``supports_vision()``, asked only when a message carries images).
    """
    if not request.messages:
        # Ollama treats an empty chat as "load the model"; there is nothing for an agent to do.
        raise invalid_request("messages: at least one message is required", param="messages")
    for index, message in enumerate(request.messages):
        if message.images and not supports_vision():
            raise invalid_request(
                f"messages.{index}.images: images are not supported by this model",
                param=f"messages.{index}.images",
            )
    return ModelInvoke(
        id=request_id,
        session_id=session_id,
        model=request.model,
        kind="chat",
        messages=_openai_messages(raw_messages),
        stream=request.stream,
        tools=tool_dicts(request.tools),
        **_sampling(request.options, defaults),
    )


def ollama_generate_invoke(
    request: OllamaGenerateRequest,
    *,
    request_id: str,
    session_id: str,
    defaults: Defaults,
) -> ModelInvoke:
    """The ``model_invoke`` for ``/api/generate``: a completion, fill-in-the-middle with ``suffix``.

    ``suffix`` is kept even when ``raw`` is true: Void sends exactly that for FIM, and dropping
    it would turn an insertion into a plain continuation. Without ``raw``, a ``system`` text
    goes in front of the prompt, separated by a blank line — a completion has no message
    roles, and this is the closest plain-text reading of Ollama's template. With ``raw`` the
    client formatted the prompt itself, so ``system`` is ignored, as Ollama does.
    """
    if request.images:
        raise invalid_request("images: images are not supported by /api/generate here; use /api/chat", param="images")
    if not request.prompt and not request.suffix:
        raise invalid_request("prompt: a prompt is required", param="prompt")
    prompt = request.prompt
    if request.system and not request.raw:
        prompt = f"{request.system}\n\n{prompt}"
    return ModelInvoke(
        id=request_id,
        session_id=session_id,
        model=request.model,
        kind="completion",
        prompt=prompt,
        suffix=request.suffix,
        stream=request.stream,
        **_sampling(request.options, defaults),
    )


# -- answers -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Timing:
    """Monotonic readings (nanoseconds) of one request, for Ollama's duration fields.

    The caller fills it from its clock (or tests from fixed numbers). An encoder given a
    ``clock`` stamps ``first_token_ns`` and ``finished_ns`` itself when it sees those moments.
    """

    started_ns: int
    first_token_ns: int | None = None
    finished_ns: int | None = None

    def metrics(self, usage: Usage | None) -> dict[str, int]:
        """The final line's counters. The time to the first token stands in for prompt evaluation."""
        finished = self.finished_ns if self.finished_ns is not None else self.started_ns
        first = self.first_token_ns if self.first_token_ns is not None else finished
        usage = usage or Usage()
        return {
            "total_duration": max(finished - self.started_ns, 0),
            # Agents are always "loaded"; there is no model load to time.
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": max(first - self.started_ns, 0),
            "eval_count": usage.completion_tokens,
            "eval_duration": max(finished - first, 0),
        }


def done_reason(finish_reason: str | None) -> str:
    # Ollama ends a tool-calling turn with "stop"; clients look for tool_calls in the message.
    if not finish_reason or finish_reason == "tool_calls":
        return "stop"
    return finish_reason


def _ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as a JSON string) → Ollama's (arguments as an object)."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        text = function.get("arguments") or ""
        arguments: Any
        try:
            arguments = json.loads(text) if text.strip() else {}
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            # Not a JSON object: hand the client the model's text rather than silently losing it.
            arguments = text
        out.append({"function": {"name": function.get("name") or "", "arguments": arguments}})
    return out


def _chat_message(content: str, reasoning: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["thinking"] = reasoning
    if tool_calls:
        message["tool_calls"] = _ollama_tool_calls(tool_calls)
    return message


class _NdjsonEncoder:
    """What the chat and generate streams share: stamping time, gathering tool calls, errors.

    ``created_at`` is a public attribute: a route that wants per-line times (as Ollama sends)
    may set it before each ``encode``; by default every line carries the request's start time.
    """

    def __init__(self, model: str, created_at: str, timing: Timing, clock: Callable[[], int] | None = None) -> None:
        self.model = model
        self.created_at = created_at
        self.timing = timing
        self._clock = clock
        # Tool calls arrive as OpenAI fragments but Ollama sends each call whole, so they are
        # held until the answer ends; Answer already knows how to join fragments.
        self._calls = Answer()

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": self.created_at}

    def _delta_line(self, delta: Delta) -> bytes:
        raise NotImplementedError

    def _final_lines(self, finished: Finished, tool_calls: list[dict[str, Any]]) -> bytes:
        raise NotImplementedError

    def encode(self, events: list[Event]) -> bytes:
        out = bytearray()
        for event in events:
            if isinstance(event, DeltaEvent):
                if self._clock is not None and self.timing.first_token_ns is None:
                    self.timing.first_token_ns = self._clock()
                delta = event.delta
                if delta.tool_calls:
                    self._calls.feed([DeltaEvent(Delta(tool_calls=delta.tool_calls))])
                if delta.content or delta.reasoning_content:
                    out += self._delta_line(delta)
            elif isinstance(event, Finished):
                if self._clock is not None and self.timing.finished_ns is None:
                    self.timing.finished_ns = self._clock()
                out += self._final_lines(event, self._calls.tool_calls)
            elif isinstance(event, Failed):
                # A terminal line: ``done`` for readers that wait for it, ``error`` for Ollama's
                # own clients, which raise on it.
                out += ndjson_line({**self._head(), "done": True, "done_reason": "error", **event.error.ollama_body()})
            elif isinstance(event, Heartbeat):
                # NDJSON has no comment syntax, and an extra line would be a bogus chunk.
                pass
        return bytes(out)


class OllamaChatEncoder(_NdjsonEncoder):
    """Events → ``/api/chat`` NDJSON lines, ending with one ``"done": true`` line."""

    def _delta_line(self, delta: Delta) -> bytes:
        message = _chat_message(delta.content or "", delta.reasoning_content)
        return ndjson_line({**self._head(), "message": message, "done": False})

    def _final_lines(self, finished: Finished, tool_calls: list[dict[str, Any]]) -> bytes:
        out = b""
        if tool_calls:
            out += ndjson_line({**self._head(), "message": _chat_message("", tool_calls=tool_calls), "done": False})
        return out + ndjson_line(
            {
                **self._head(),
                "message": _chat_message(""),
                # Key order follows Ollama's own ChatResponse.
                "done_reason": done_reason(finished.finish_reason),
                "done": True,
                **self.timing.metrics(finished.usage),
            }
        )


class OllamaGenerateEncoder(_NdjsonEncoder):
    """Events → ``/api/generate`` NDJSON lines. Tool calls have no place here and are dropped."""

    def _delta_line(self, delta: Delta) -> bytes:
        line: dict[str, Any] = {**self._head(), "response": delta.content or ""}
        if delta.reasoning_content:
            line["thinking"] = delta.reasoning_content
        line["done"] = False
        return ndjson_line(line)

    def _final_lines(self, finished: Finished, tool_calls: list[dict[str, Any]]) -> bytes:
        return ndjson_line(
            {
                **self._head(),
                "response": "",
                # Key order follows Ollama's own GenerateResponse (done before done_reason).
                "done": True,
                "done_reason": done_reason(finished.finish_reason),
                **self.timing.metrics(finished.usage),
            }
        )


def ollama_chat_response(answer: Answer, model: str, created_at: str, timing: Timing) -> dict[str, Any]:
    """The non-streamed ``/api/chat`` body. The caller answers ``answer.error`` itself first."""
    return {
        "model": model,
        "created_at": created_at,
        "message": _chat_message(answer.content, answer.reasoning, answer.tool_calls),
        "done_reason": done_reason(answer.finish_reason),
        "done": True,
        **timing.metrics(answer.usage),
    }


def ollama_generate_response(answer: Answer, model: str, created_at: str, timing: Timing) -> dict[str, Any]:
    """The non-streamed ``/api/generate`` body. The caller answers ``answer.error`` itself first."""
    body: dict[str, Any] = {"model": model, "created_at": created_at, "response": answer.content}
    if answer.reasoning:
        body["thinking"] = answer.reasoning
    body["done"] = True
    body["done_reason"] = done_reason(answer.finish_reason)
    return {**body, **timing.metrics(answer.usage)}


# -- metadata ----------------------------------------------------------------------------------

#: Stands in for the GGUF architecture. Clients read ``model_info["<family>.context_length"]``.
FAMILY = "trioprovider"

#: Go's zero time: what Ollama itself reports for a time it does not know.
ZERO_TIME = "0001-01-01T00:00:00Z"


def digest(name: str) -> str:
    """A stable stand-in for a model blob digest: clients use it to notice a model changed."""
    return hashlib.sha256(name.encode()).hexdigest()


def _details() -> dict[str, Any]:
    # There are no weights behind a name, so size and quantization are left empty, not made up.
    return {
        "parent_model": "",
        "format": "bridge",
        "family": FAMILY,
        "families": [FAMILY],
        "parameter_size": "",
        "quantization_level": "",
    }


def _entry(card: ModelCard) -> dict[str, Any]:
    # Names are the agent's model ids as they are, without Ollama's ":latest" tag: clients send
    # back whatever name they listed, and the agent must recognise it.
    return {"name": card.id, "model": card.id}


def tags_payload(cards: list[ModelCard], modified_at: str) -> dict[str, Any]:
    """``GET /api/tags``. Void reads only ``models[].name``; the rest satisfies typed clients."""
    return {
        "models": [
            {**_entry(card), "modified_at": modified_at, "size": 0, "digest": digest(card.id), "details": _details()}
            for card in cards
        ]
    }


def capabilities(card: ModelCard) -> list[str]:
    """Ollama's capability names for what the agent advertises (``insert`` is fill-in-the-middle)."""
    out = ["completion"]
    if card.supports_tools:
        out.append("tools")
    if card.supports_fim:
        out.append("insert")
    if card.supports_vision:
        out.append("vision")
    return out


def show_payload(card: ModelCard, modified_at: str = ZERO_TIME) -> dict[str, Any]:
    """``POST /api/show``: details, ``model_info`` with the context length, capabilities."""
    model_info: dict[str, Any] = {"general.architecture": FAMILY}
    if card.context_window is not None:
        model_info[f"{FAMILY}.context_length"] = card.context_window
    return {
        # No Modelfile or template exists; empty strings keep clients that read them happy.
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(),
        "model_info": model_info,
        "capabilities": capabilities(card),
        "modified_at": modified_at,
    }


def ps_payload(cards: list[ModelCard], expires_at: str = ZERO_TIME) -> dict[str, Any]:
    """``GET /api/ps``: every model a connected agent serves counts as loaded."""
    models = []
    for card in cards:
        entry: dict[str, Any] = {
            **_entry(card),
            "size": 0,
            "digest": digest(card.id),
            "details": _details(),
            "expires_at": expires_at,
            "size_vram": 0,
        }
        if card.context_window is not None:
            entry["context_length"] = card.context_window
        models.append(entry)
    return {"models": models}
