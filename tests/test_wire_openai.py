"""OpenAI wire format, sans-IO: SSE framing byte for byte, the translator, whole answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioprovider.errors import ApiError
from trioprovider.events import DeltaEvent, Failed, Finished, Heartbeat, ReplyTranslator
from trioprovider.protocol import Chunk, Delta, ModelError, ModelResult, ModelStreamChunk, Usage
from trioprovider.wire.answer import Answer
from trioprovider.wire.openai import (
    ChatCompletionRequest,
    ChatStreamEncoder,
    Defaults,
    chat_completion,
    chat_invoke,
    parse_request,
)

HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"echo",'


def encoder(include_usage: bool = False) -> ChatStreamEncoder:
    return ChatStreamEncoder("chatcmpl-1", 1700000000, "echo", include_usage)


def test_plain_text_stream_is_byte_exact() -> None:
    enc = encoder()
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    first = enc.encode([DeltaEvent(Delta(content="Hel"))])
    rest = enc.encode([DeltaEvent(Delta(content="lo ✓\n")), Finished("stop", usage)])
    assert first == HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n'
    assert rest == (
        HEAD + b'"choices":[{"index":0,"delta":{"content":"lo \xe2\x9c\x93\\n"},"finish_reason":null}]}\n\n'
        + HEAD + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        + b"data: [DONE]\n\n"
    )


def test_usage_chunk_comes_before_done_with_empty_choices() -> None:
    enc = encoder(include_usage=True)
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    out = enc.encode([DeltaEvent(Delta(content="x")), Finished("length", usage)])
    assert out.endswith(
        HEAD + b'"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
        + HEAD + b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
        + b"data: [DONE]\n\n"
    )


def test_reasoning_and_tool_call_deltas() -> None:
    enc = encoder()
    out = enc.encode(
        [
            DeltaEvent(Delta(reasoning_content="hmm")),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "read", "arguments": ""}}])),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "function": {"arguments": "{\"path\":\"a\"}"}}])),
        ]
    )
    assert out == (
        HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"hmm"},"finish_reason":null}]}\n\n'
        + HEAD + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"read","arguments":""}}]},"finish_reason":null}]}\n\n'
        + HEAD + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"path\\":\\"a\\"}"}}]},"finish_reason":null}]}\n\n'
    )


def test_error_is_a_terminal_record_then_done() -> None:
    enc = encoder()
    out = enc.encode([DeltaEvent(Delta(content="a")), Failed(ApiError(503, "agent gone", code="agent_disconnected"))])
    assert out.endswith(
        b'data: {"error":{"message":"agent gone","type":"server_error","param":null,"code":"agent_disconnected"}}\n\n'
        b"data: [DONE]\n\n"
    )


def test_heartbeat_is_an_sse_comment() -> None:
    assert encoder().encode([Heartbeat()]) == b": keep-alive\n\n"


def test_answer_without_output_still_names_the_role() -> None:
    usage = Usage()
    out = encoder().encode([Finished("stop", usage)])
    assert out.startswith(HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"stop"}]}\n\n')


# -- the translator ----------------------------------------------------------------------------

def chunk(content: str | None = None, finish: str | None = None, **delta: object) -> ModelStreamChunk:
    return ModelStreamChunk(id="r", chunk=Chunk(delta=Delta(content=content, **delta), finish_reason=finish))


def test_streamed_answer_ignores_the_repeat_in_the_result() -> None:
    t = ReplyTranslator(prompt_tokens=7)
    events = t.feed(chunk("Hello")) + t.feed(chunk(" world")) + t.feed(chunk(finish="stop"))
    events += t.feed(ModelResult(id="r", choices=[{"index": 0, "message": {"content": "Hello world"}}]))
    assert [type(e).__name__ for e in events] == ["DeltaEvent", "DeltaEvent", "Finished"]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.finish_reason == "stop"
    # No usage from the agent: estimated from the prompt and the streamed text.
    assert finished.usage == Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)


def test_unstreamed_result_becomes_one_delta_with_tool_calls() -> None:
    t = ReplyTranslator(prompt_tokens=1)
    result = ModelResult(
        id="r",
        choices=[{"index": 0, "message": {"content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}]}}],
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    events = t.feed(result)
    assert isinstance(events[0], DeltaEvent)
    assert events[0].delta.tool_calls == [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert events[1] == Finished("tool_calls", Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))


def test_agent_error_maps_to_a_status() -> None:
    t = ReplyTranslator(prompt_tokens=1)
    [failed] = t.feed(ModelError(id="r", code="agent_disconnected", message="gone"))
    assert isinstance(failed, Failed)
    assert failed.error.status == 503
    [failed] = t.feed(ModelError(id="r", code="weird", message="?"))
    assert isinstance(failed, Failed) and failed.error.status == 502


def test_tool_call_fragments_get_an_index() -> None:
    t = ReplyTranslator(prompt_tokens=1)
    [event] = t.feed(chunk(tool_calls=[{"id": "c", "function": {"name": "f"}}]))
    assert isinstance(event, DeltaEvent)
    assert event.delta.tool_calls == [{"index": 0, "id": "c", "function": {"name": "f"}}]


# -- whole answers -----------------------------------------------------------------------------

def test_whole_answer_joins_text_and_tool_call_fragments() -> None:
    answer = Answer()
    answer.feed(
        [
            DeltaEvent(Delta(content="I'll read it. ")),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "read", "arguments": "{\"pa"}}])),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "function": {"arguments": "th\":1}"}}])),
            Finished("tool_calls", Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)),
        ]
    )
    body = chat_completion(answer, "chatcmpl-1", 1, "echo")
    assert body["choices"][0] == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "I'll read it. ",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "read", "arguments": '{"path":1}'}}],
        },
        "finish_reason": "tool_calls",
    }
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert body["object"] == "chat.completion"


# -- requests ----------------------------------------------------------------------------------

def test_server_defaults_fill_what_void_leaves_out() -> None:
    body = {"model": "echo", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}], "stream": True}
    request = parse_request(ChatCompletionRequest, body)
    invoke = chat_invoke(request, body["messages"], request_id="r", session_id="s", defaults=Defaults(max_tokens=2048, temperature=0.7, top_p=1.0))
    assert (invoke.max_tokens, invoke.temperature, invoke.top_p) == (2048, 0.7, 1.0)
    assert invoke.messages == body["messages"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 9000}, "max_tokens"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes please"}, "stream"),
    ],
)
def test_invalid_requests_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as raised:
        parse_request(ChatCompletionRequest, body)
    assert raised.value.status == 400
    assert raised.value.param == param


def test_completion_stream_is_byte_exact() -> None:
    from trioprovider.wire.openai import CompletionStreamEncoder

    enc = CompletionStreamEncoder("cmpl-1", 1700000000, "echo", include_usage=True)
    head = b'data: {"id":"cmpl-1","object":"text_completion","created":1700000000,"model":"echo",'
    out = enc.encode([DeltaEvent(Delta(content="x = 1")), Finished("stop", Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))])
    assert out == (
        head + b'"choices":[{"index":0,"text":"x = 1","logprobs":null,"finish_reason":null}]}\n\n'
        + head + b'"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}]}\n\n'
        + head + b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
        + b"data: [DONE]\n\n"
    )


def test_fim_request_becomes_a_completion_invoke_with_its_suffix() -> None:
    from trioprovider.wire.openai import CompletionRequest, completion_invoke

    body = {"model": "echo", "prompt": "def f(", "suffix": "\n    return x", "stop": ["\n\n"], "max_tokens": 300}
    invoke = completion_invoke(parse_request(CompletionRequest, body), request_id="r", session_id="s", defaults=Defaults())
    assert (invoke.kind, invoke.prompt, invoke.suffix, invoke.stop, invoke.max_tokens) == ("completion", "def f(", "\n    return x", ["\n\n"], 300)


@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(st.text())
def test_a_text_record_is_the_same_bytes_as_the_general_record(text: str) -> None:
    """Text deltas take a shortcut (bytes around the text's JSON); it must give exactly the
    record the general path builds from a dict."""
    encoder = ChatStreamEncoder("chatcmpl-1", 1, "m", include_usage=False)
    encoder.encode([DeltaEvent(Delta(content="first"))])  # the role goes in the first record only
    general = encoder._record(choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}])
    assert encoder.encode([DeltaEvent(Delta(content=text))]) == general
