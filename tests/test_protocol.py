"""The bridge protocol, sans-IO: every message round-trips; bad frames are refused with a reason."""

from __future__ import annotations

import datetime
import json
import re
import time
from pathlib import Path

import pytest

from trioprovider import protocol
from trioprovider.protocol import (
    AgentHello,
    Catalog,
    Chunk,
    Delta,
    HelloAck,
    HelloReject,
    ModelCancel,
    ModelCard,
    ModelError,
    ModelInvoke,
    ModelResult,
    ModelStreamChunk,
    ProtocolError,
    ProviderHello,
    Usage,
    decode,
    encode,
    utc_timestamp,
)

EXAMPLES = [
    AgentHello(id="h1", protocol_version=1, agent_id="echo", token="t", models=[ModelCard(id="echo", context_window=8192, supports_fim=True)], max_concurrency=4),
    ProviderHello(id="h2", protocol_version=1, provider_id="p1", token="t"),
    HelloAck(id="h1"),
    HelloReject(id="h1", reason="invalid bridge token"),
    Catalog(id="catalog", agents=[{"agent_id": "echo", "models": [{"id": "echo"}], "max_concurrency": 2, "in_flight": 1}]),
    ModelInvoke(
        id="r1",
        session_id="s1",
        model="echo",
        kind="chat",
        messages=[{"role": "developer", "content": "<b>&amp; keep me</b>\n\ttabs"}, {"role": "user", "content": "héllo ✓"}],
        stream=True,
        max_tokens=300,
        temperature=0.2,
        top_p=0.9,
        stop=["\n\n"],
        tools=[{"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {"path": {"description": "p"}}}}}],
        tool_choice="auto",
        deadline="2026-11-21T18:00:00.000Z",
    ),
    ModelInvoke(id="r2", session_id="s1", model="echo", kind="completion", prompt="def f(", suffix="\n    return x", stream=False),
    ModelStreamChunk(id="r1", chunk=Chunk(delta=Delta(content="Hel"))),
    ModelStreamChunk(id="r1", chunk=Chunk(delta=Delta(reasoning_content="thinking"))),
    ModelStreamChunk(id="r1", chunk=Chunk(delta=Delta(tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "read", "arguments": "{\"pa"}}]))),
    ModelStreamChunk(id="r1", chunk=Chunk(finish_reason="stop"), finished=True),
    ModelResult(id="r1", choices=[{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}], usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
    ModelError(id="r1", code="agent_error", message="it broke", retryable=True),
    ModelCancel(id="r1", reason="client_disconnected"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.type)
def test_round_trip(message: protocol.BaseModel) -> None:
    frame = encode(message)
    assert decode(frame) == message
    assert decode(frame.encode()) == message
    as_json = json.loads(frame)
    assert as_json["type"] == message.type
    assert as_json["id"] == message.id
    assert as_json["timestamp"].endswith("Z")


def test_prompt_text_is_carried_byte_for_byte() -> None:
    tricky = "<script>alert('x')</script> &amp; \\n \u2028 \x00 ` $(rm -rf /)"
    invoke = ModelInvoke(id="r", session_id="s", model="m", messages=[{"role": "user", "content": tricky}])
    assert decode(encode(invoke)).messages[0]["content"] == tricky


def test_timestamp_is_filled_when_a_peer_leaves_it_out() -> None:
    message = decode('{"type":"model_cancel","id":"r1"}')
    assert isinstance(message, ModelCancel)
    assert message.reason == "client_disconnected"
    assert message.timestamp.endswith("Z")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    message = decode('{"type":"model_error","id":"r1","code":"x","message":"m","future_field":1}')
    assert isinstance(message, ModelError)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "frame is not valid JSON"),
        ("[1, 2]", "frame: Input should be an object"),
        ("{}", "frame has no 'type' field"),
        ('{"type": "model_explode", "id": "r1"}', "unknown message type 'model_explode'"),
        ('{"type": "model_invoke", "id": "r1", "model": "m"}', "session_id: Field required"),
        ('{"type": "model_cancel", "id": ""}', "id: String should have at least 1 character"),
        ('{"type": "agent_hello", "id": "h", "protocol_version": 1, "agent_id": "a", "models": []}', "models: List should have at least 1 item"),
        ('{"type": "agent_hello", "id": "h", "protocol_version": 1, "agent_id": "a", "models": [{"id": "m"}], "max_concurrency": 0}', "max_concurrency: Input should be greater than or equal to 1"),
        ('{"type": "model_stream_chunk", "id": "r1", "chunk": {"delta": {"content": 5}}}', "chunk.delta.content: Input should be a valid string"),
        ('{"type": "model_invoke", "id": "r1", "session_id": "s", "model": "m", "kind": "image"}', "kind: Input should be 'chat' or 'completion'"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frame: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(frame)
    assert str(raised.value).startswith(reason)


def test_json_schema_in_docs_is_generated_from_the_models() -> None:
    committed = Path(__file__).parent.parent / "docs" / "bridge-protocol.schema.json"
    assert json.loads(committed.read_text()) == protocol.json_schema(), (
        "docs/bridge-protocol.schema.json is stale: run "
        "'python -m trioprovider schema --output docs/bridge-protocol.schema.json'"
    )


def test_json_schema_names_every_message_type() -> None:
    schema = protocol.json_schema()
    mapping = schema["discriminator"]["mapping"]
    assert set(mapping) == {m.type for m in EXAMPLES}


def test_timestamps_say_now_to_the_millisecond_in_utc() -> None:
    for _ in range(3):
        before = datetime.datetime.now(datetime.UTC)
        stamp = utc_timestamp()
        after = datetime.datetime.now(datetime.UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before - datetime.timedelta(milliseconds=1) <= when <= after
        # Cached within its millisecond only: two milliseconds on, the text has moved.
        time.sleep(0.002)
        assert utc_timestamp() != stamp
