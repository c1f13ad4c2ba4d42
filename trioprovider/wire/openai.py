"""The OpenAI wire format: chat completion requests in, chunks (SSE) or one answer (JSON) out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from trioprovider.errors import invalid_request
from trioprovider.events import DeltaEvent, Event, Failed, Finished, Heartbeat
from trioprovider.protocol import Delta, ModelInvoke
from trioprovider.wire.answer import Answer
from trioprovider.wire.framing import SSE_DONE, SSE_KEEPALIVE, dumps, sse_record


@dataclass(frozen=True, slots=True)
class Defaults:
    """Server-side sampling defaults, for clients (Void) that send none (from the validated
    ``model`` settings: a plain value, built once a request)."""

    max_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 1.0


class ContentPart(BaseModel):
    """One part of a list content; a ``text`` part must carry its text as a string."""

    model_config = ConfigDict(extra="allow")

    type: Annotated[str, Field(min_length=1)]
    text: str | None = None

    @pydantic.model_validator(mode="after")
    def _text_parts_have_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text', a string")
        return self


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1, max_length=256)]


class Tool(BaseModel):
    """A tool a client offers (OpenAI's and Ollama's shape): checked here, so that an agent is
    never handed one it cannot read; forwarded as sent."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: ToolFunction


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """The tools as the client sent them (nothing added), for ``model_invoke``."""
    return [tool.model_dump(exclude_unset=True) for tool in tools] if tools else None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, tool_calls, …) are kept and forwarded untouched.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    # Typed so that a malformed history is a 400 naming the field (the raw message is forwarded).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are tolerated, as OpenAI does (clients send vendor extensions).
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=8192)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=8192)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    try:
        # The model's own validator: model_validate passes it seven unset options, which cost
        # as much as validating a small request (pydantic 2.13).
        return model.__pydantic_validator__.validate_python(body)
    except pydantic.ValidationError as error:
        # A union reports one error per branch; the deepest is the one that says what is wrong
        # ("messages.0.content.0.text", not "messages.0.content.str").
        errors = [(_field_path(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in error.errors(include_url=False)]
        where = max((path for path, _ in errors), key=len)
        problems = list(dict.fromkeys(message for path, message in errors if path == where))
        raise invalid_request(f"{where}: {'; or '.join(problems)}", param=where or None) from None


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a field path, without its union-branch tags ("str", "list[...]")."""
    return ".".join(
        str(part) for part in loc if not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS))
    )


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def normalize_messages(raw_messages: list[dict[str, Any]], *, supports_vision: Callable[[], bool]) -> list[dict[str, Any]]:
    """Messages for the agent: content-part lists become one string of their text parts joined.

    Text reaches the agent byte for byte. Image parts are refused (400) unless the model's
    agent advertises vision (``supports_vision()``, asked only then), in which case the message
    is passed on untouched.
    """
    out = []
    for index, message in enumerate(raw_messages):
        content = message.get("content")
        if isinstance(content, list):
            kinds = {part.get("type") for part in content if isinstance(part, dict)}
            if kinds - {"text"}:
                if kinds - {"text", "image_url"} or not supports_vision():
                    unsupported = ", ".join(sorted(str(kind) for kind in kinds - {"text"}))
                    raise invalid_request(
                        f"messages.{index}.content: parts of type {unsupported} are not supported by this model",
                        param=f"messages.{index}.content",
                    )
                out.append(message)
                continue
            text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            message = {**message, "content": text}
        out.append(message)
    return out


def chat_invoke(
    request: ChatCompletionRequest,
    raw_messages: list[dict[str, Any]],
    *,
    request_id: str,
    session_id: str,
    defaults: Defaults,
) -> ModelInvoke:
    """The ``model_invoke`` for a chat request. Messages go to the agent exactly as sent."""
    if request.n not in (None, 1):
        raise invalid_request("Only n=1 is supported.", param="n")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return ModelInvoke(
        id=request_id,
        session_id=session_id,
        model=request.model,
        kind="chat",
        messages=raw_messages,
        stream=request.stream,
        max_tokens=request.max_completion_tokens or request.max_tokens or defaults.max_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        stop=stop or None,
        tools=tool_dicts(request.tools),
        tool_choice=request.tool_choice,
    )


class _SseEncoder:
    """Events → OpenAI SSE records for one answer, ending with ``data: [DONE]``.

    Subclasses say how a delta and the finishing choice look; the rest (record head, usage
    chunk, error record, keep-alive) is the same for chat and text completions.
    """

    object_name = ""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        # The fixed head of every record, encoded once per answer rather than once per chunk.
        self._head = dumps({"id": completion_id, "object": self.object_name, "created": created, "model": model})[:-1]
        self._include_usage = include_usage

    def _record(self, **fields: Any) -> bytes:
        return sse_record(self._head + b"," + dumps(fields)[1:])

    def _delta(self, delta: Delta) -> bytes:
        raise NotImplementedError

    def _finish_choice(self, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, events: list[Event]) -> bytes:
        out = bytearray()
        for event in events:
            if isinstance(event, DeltaEvent):
                out += self._delta(event.delta)
            elif isinstance(event, Finished):
                out += self._record(choices=[self._finish_choice(event.finish_reason)])
                if self._include_usage:
                    out += self._record(choices=[], usage=event.usage.model_dump())
                out += SSE_DONE
            elif isinstance(event, Failed):
                out += sse_record(dumps(event.error.openai_body())) + SSE_DONE
            elif isinstance(event, Heartbeat):
                out += SSE_KEEPALIVE
        return bytes(out)


class ChatStreamEncoder(_SseEncoder):
    """``chat.completion.chunk`` records."""

    object_name = "chat.completion.chunk"

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(completion_id, created, model, include_usage)
        self._sent_role = False
        # A record of text alone, the common case, is these bytes around the text's JSON: the
        # same bytes _record gives (the golden tests say so), without a dict to encode.
        self._text_head = b"data: " + self._head + b',"choices":[{"index":0,"delta":{"content":'

    def _delta(self, delta: Delta) -> bytes:
        if self._sent_role and delta.content is not None and delta.reasoning_content is None and delta.tool_calls is None:
            return self._text_head + dumps(delta.content) + b'},"finish_reason":null}]}\n\n'
        # The delta's set fields, in its field order (as model_dump(exclude_none=True) gives,
        # without pydantic's serializer on every chunk).
        fields = {name: value for name, value in (("content", delta.content), ("reasoning_content", delta.reasoning_content), ("tool_calls", delta.tool_calls)) if value is not None}
        if not self._sent_role:
            # OpenAI names the role in the first chunk only.
            fields = {"role": "assistant", **fields}
            self._sent_role = True
        return self._record(choices=[{"index": 0, "delta": fields, "finish_reason": None}])

    def _finish_choice(self, finish_reason: str) -> dict[str, Any]:
        delta = {} if self._sent_role else {"role": "assistant", "content": ""}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}


def chat_completion(answer: Answer, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """The non-streamed ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
        if not answer.content:
            message["content"] = None
    usage = answer.usage.model_dump() if answer.usage else None
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason or "stop"}],
        "usage": usage,
    }



class CompletionRequest(BaseModel):
    """The legacy completions request, also used for fill-in-the-middle (``suffix``)."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    suffix: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=8192)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: int | None = None
    stop: str | list[str] | None = None


def completion_invoke(request: CompletionRequest, *, request_id: str, session_id: str, defaults: Defaults) -> ModelInvoke:
    if request.n not in (None, 1):
        raise invalid_request("Only n=1 is supported.", param="n")
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return ModelInvoke(
        id=request_id,
        session_id=session_id,
        model=request.model,
        kind="completion",
        prompt=prompt,
        suffix=request.suffix,
        stream=request.stream,
        max_tokens=request.max_tokens or defaults.max_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        stop=stop or None,
    )


class CompletionStreamEncoder(_SseEncoder):
    """``text_completion`` records (legacy completions and FIM)."""

    object_name = "text_completion"

    def _delta(self, delta: Delta) -> bytes:
        if not delta.content:
            return b""
        return self._record(choices=[{"index": 0, "text": delta.content, "logprobs": None, "finish_reason": None}])

    def _finish_choice(self, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}


def text_completion(answer: Answer, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """The non-streamed ``text_completion`` object."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": answer.content, "logprobs": None, "finish_reason": answer.finish_reason or "stop"}],
        "usage": answer.usage.model_dump() if answer.usage else None,
    }
