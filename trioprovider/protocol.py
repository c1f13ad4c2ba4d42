"""The bridge protocol: JSON text frames between the provider, the bridge and agents.

Sans-IO: this module only turns messages into text and text into messages. The transports that
carry them live in :mod:`trioprovider.bridge.streams`. The protocol is a public contract (agents
written by other people implement it from ``docs/bridge-protocol.md``), so field names here are
the documented ones and changing them means a new ``protocol_version``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from trioprovider.clock import MillisecondClock

PROTOCOL_VERSION = 1

#: The reasons a ``model_cancel`` carries. Free text is allowed too; these are the ones we send.
CANCEL_REASONS = ("client_disconnected", "deadline", "session_revoked", "shutdown", "client_too_slow")


#: Now, as ISO 8601 UTC with milliseconds (``2026-11-21T17:00:00.123Z``): every message's timestamp.
utc_timestamp = MillisecondClock("Z").now


class _Frame(BaseModel):
    # Unknown fields are ignored rather than rejected: a newer peer may add optional fields
    # within one protocol version; an unknown *type* is still an error.
    model_config = ConfigDict(extra="ignore", frozen=False)

    id: Annotated[str, Field(min_length=1, max_length=256)]
    timestamp: str = Field(default_factory=utc_timestamp)


class ModelCard(BaseModel):
    """A model an agent serves, as it advertises it in ``agent_hello``."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(min_length=1, max_length=256)]
    context_window: Annotated[int, Field(gt=0)] | None = None
    supports_tools: bool = False
    supports_fim: bool = False
    supports_vision: bool = False


class AgentInfo(BaseModel):
    """One connected agent, as the bridge describes it to providers (in ``catalog``)."""

    model_config = ConfigDict(extra="ignore")

    agent_id: str
    models: list[ModelCard]
    max_concurrency: int
    in_flight: int = 0


class AgentHello(_Frame):
    type: Literal["agent_hello"] = "agent_hello"
    protocol_version: int
    agent_id: Annotated[str, Field(min_length=1, max_length=256)]
    token: str = ""
    models: Annotated[list[ModelCard], Field(min_length=1)]
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 1


class ProviderHello(_Frame):
    type: Literal["provider_hello"] = "provider_hello"
    protocol_version: int
    provider_id: Annotated[str, Field(min_length=1, max_length=256)]
    token: str = ""


class HelloAck(_Frame):
    type: Literal["hello_ack"] = "hello_ack"
    protocol_version: int = PROTOCOL_VERSION


class HelloReject(_Frame):
    type: Literal["hello_reject"] = "hello_reject"
    reason: str


class Catalog(_Frame):
    """Bridge → provider: the agents now connected. Sent after ``hello_ack`` and on every change.

    An addition to the seed's message set: an external provider must know which models exist
    to answer ``/v1/models`` and to tell an unknown model (404) from a missing agent (503).
    """

    type: Literal["catalog"] = "catalog"
    agents: list[AgentInfo]


class ModelInvoke(_Frame):
    type: Literal["model_invoke"] = "model_invoke"
    session_id: str
    model: str
    kind: Literal["chat", "completion"] = "chat"
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    suffix: str | None = None
    stream: bool = True
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    #: ISO 8601 UTC instant after which the provider no longer wants the answer.
    deadline: str | None = None


class Delta(BaseModel):
    """An OpenAI chat delta. Tool-call fragments keep the OpenAI shape (``index``, ``id``, …)."""

    model_config = ConfigDict(extra="ignore")

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Chunk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    delta: Delta = Field(default_factory=Delta)
    finish_reason: str | None = None


class ModelStreamChunk(_Frame):
    type: Literal["model_stream_chunk"] = "model_stream_chunk"
    chunk: Chunk
    finished: bool = False


class Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt_tokens: Annotated[int, Field(ge=0)] = 0
    completion_tokens: Annotated[int, Field(ge=0)] = 0
    total_tokens: Annotated[int, Field(ge=0)] = 0


class ModelResult(_Frame):
    type: Literal["model_result"] = "model_result"
    #: OpenAI ``choices``: ``[{"index": 0, "message": {...}, "finish_reason": "stop"}]``. When the
    #: answer was streamed, the message repeats what the chunks carried and is not resent.
    choices: list[dict[str, Any]] = Field(default_factory=list)
    usage: Usage | None = None


class ModelError(_Frame):
    type: Literal["model_error"] = "model_error"
    code: str
    message: str
    retryable: bool = False


class ModelCancel(_Frame):
    type: Literal["model_cancel"] = "model_cancel"
    reason: str = "client_disconnected"


Message = Annotated[
    Union[
        AgentHello,
        ProviderHello,
        HelloAck,
        HelloReject,
        Catalog,
        ModelInvoke,
        ModelStreamChunk,
        ModelResult,
        ModelError,
        ModelCancel,
    ],
    Field(discriminator="type"),
]

#: The messages that answer a ``model_invoke``; the last two end it.
Reply = Union[ModelStreamChunk, ModelResult, ModelError]

_MESSAGE: pydantic.TypeAdapter[Message] = pydantic.TypeAdapter(Message)


class ProtocolError(ValueError):
    """A frame that is not a valid message. ``str()`` is a reason fit to send to the peer."""


def encode(message: BaseModel) -> str:
    """The JSON text frame for a message (``None`` fields left out)."""
    return message.model_dump_json(exclude_none=True)


def decode(frame: str | bytes) -> Message:
    """Parse and validate one frame, or raise :class:`ProtocolError` saying why not."""
    try:
        return _MESSAGE.validate_json(frame)
    except pydantic.ValidationError as error:
        raise ProtocolError(_describe(error)) from None


def _describe(error: pydantic.ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    if kind == "json_invalid":
        return f"frame is not valid JSON: {first['msg']}"
    if kind == "union_tag_not_found":
        return "frame has no 'type' field"
    if kind == "union_tag_invalid":
        return f"unknown message type {first.get('ctx', {}).get('tag')!r}"
    # Paths start with the union tag (e.g. ('model_invoke', 'stop', 0)); the tag is not a field.
    where = ".".join(str(part) for part in first["loc"][1:]) or "frame"
    return f"{where}: {first['msg']}"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every message, generated from the models (``docs/bridge-protocol.schema.json``)."""
    schema = _MESSAGE.json_schema(mode="validation")
    schema["title"] = "trioprovider bridge message"
    schema["description"] = (
        f"One JSON text frame of the trioprovider bridge protocol, version {PROTOCOL_VERSION}."
    )
    return schema
