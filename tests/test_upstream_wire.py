"""The openai agent's translation, sans-IO: requests out, SSE records in, failures with their status."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioprovider.agents import upstream_wire
from trioprovider.agents.runner import AgentFailure
from trioprovider.agents.upstream_wire import (
    SseDecoder,
    SseEvent,
    UpstreamStream,
    api_root,
    error_detail,
    model_cards,
    status_failure,
    upstream_model,
    upstream_request,
    whole_answer,
)
from trioprovider.errors import ApiError
from trioprovider.protocol import Chunk, Delta, ModelError, ModelInvoke, Usage
from trioprovider.wire.framing import SSE_DONE, dumps, sse_record

ROOT = "http://up:1/v1"


def invoke(**fields: object) -> ModelInvoke:
    return ModelInvoke.model_validate({"id": "r1", "session_id": "s1", "model": "m", **fields})


def events(*records: object) -> list[SseEvent]:
    return [SseEvent("message", record if isinstance(record, str) else json.dumps(record)) for record in records]


def feed_all(stream: UpstreamStream, *records: object) -> list[Chunk]:
    return [chunk for event in events(*records) for chunk in stream.feed(event)]


@pytest.mark.parametrize(
    ("base_url", "root"),
    [
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1"),
        ("https://api.groq.com/openai/v1", "https://api.groq.com/openai/v1"),
    ],
)
def test_api_root_takes_base_urls_as_openai_clients_do(base_url: str, root: str) -> None:
    assert api_root(base_url) == root


def test_the_default_model_goes_to_the_first_upstream_model() -> None:
    assert upstream_model("llama3", ["qwen", "llama3"]) == "llama3"
    assert upstream_model("cursor-agent-local", ["qwen", "llama3"]) == "qwen"


def test_chat_request_streams_as_asked_with_usage_and_carries_only_what_was_set() -> None:
    tools = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "<b>&amp;</b>"}]
    path, body = upstream_request(invoke(messages=messages, max_tokens=50, temperature=0.2, tools=tools, tool_choice="auto", stream=True), "qwen")
    assert path == "/chat/completions"
    assert body == {
        "model": "qwen",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": messages,
        "max_tokens": 50,
        "temperature": 0.2,
        "tools": tools,
        "tool_choice": "auto",
    }
    # Not streamed: the upstream's answer comes whole, with its usage (no stream_options).
    _, unstreamed = upstream_request(invoke(messages=messages, stream=False), "qwen")
    assert unstreamed == {"model": "qwen", "stream": False, "messages": messages}


def test_completion_request_carries_prompt_and_suffix() -> None:
    path, body = upstream_request(invoke(kind="completion", prompt="def f(", suffix="\n    return x", stop=["\n\n"]), "coder")
    assert path == "/completions"
    assert body == {
        "model": "coder",
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt": "def f(",
        "suffix": "\n    return x",
        "stop": ["\n\n"],
    }


def test_model_cards_from_a_model_list() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "qwen", "object": "model", "max_model_len": 32768},
            {"id": "llama3", "object": "model"},
            {"id": "qwen", "object": "model"},
            {"object": "model"},
        ],
    }
    cards = model_cards(json.dumps(listing).encode())
    assert [(card.id, card.context_window, card.supports_tools) for card in cards] == [("qwen", 32768, True), ("llama3", None, True)]
    with pytest.raises(ValueError, match="not an OpenAI model list: <html>"):
        model_cards(b"<html>oops</html>")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"error": {"message": "Invalid API key", "type": "auth"}}', "Invalid API key"),
        (b'{"error": "model \\"x\\" not found, try pulling it first"}', 'model "x" not found, try pulling it first'),
        (b'{"detail": [{"loc": ["body", "model"], "msg": "field required"}]}', '[{"loc": ["body", "model"], "msg": "field required"}]'),
        (b"Bad Gateway\n", "Bad Gateway"),
        (b"", "(no body)"),
    ],
)
def test_error_detail_quotes_the_upstream(body: bytes, detail: str) -> None:
    assert error_detail(body) == detail


@pytest.mark.parametrize(
    ("status", "body", "code", "client_status", "retryable"),
    [
        (400, b'{"error": {"message": "bad temperature"}}', "invalid_request", 400, False),
        (400, b'{"error": {"message": "too long", "code": "context_length_exceeded"}}', "context_length_exceeded", 400, False),
        (401, b'{"error": {"message": "Invalid API key"}}', "upstream_unauthorized", 502, False),
        (404, b'{"error": "model not found"}', "upstream_not_found", 502, False),
        (429, b'{"error": {"message": "slow down"}}', "rate_limited", 429, True),
        (500, b"boom", "upstream_error", 502, True),
        (503, b'{"error": {"message": "loading model"}}', "overloaded", 503, True),
        (504, b"", "timeout", 504, True),
    ],
)
def test_upstream_status_becomes_a_model_error_with_that_status(status: int, body: bytes, code: str, client_status: int, retryable: bool) -> None:
    failure = status_failure(status, body, ROOT)
    assert (failure.code, failure.retryable) == (code, retryable)
    assert failure.message.startswith(f"upstream {ROOT} answered HTTP {status}: {error_detail(body)}")
    # What the provider makes of it for the client.
    assert ApiError.from_agent(ModelError(id="r1", code=failure.code, message=failure.message)).status == client_status
    if status == 401:
        assert "api_key" in failure.message


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    decoder = SseDecoder()
    wire = b"\xef\xbb\xbf: keep-alive\n\ndata: one\r\n\r\ndata:two\rdata:  three\nid: 7\nretry: 10\n\nevent: error\ndata: {}\n\n\n"
    assert decoder.feed(wire) == [SseEvent("message", "one"), SseEvent("message", "two\n three"), SseEvent("error", "{}")]


def test_sse_lines_end_only_at_cr_and_lf() -> None:
    # httpx's aiter_lines would split this record at U+2028 and U+0085, as str.splitlines does.
    payload = dumps({"choices": [{"index": 0, "delta": {"content": "a\u2028b\x85c\x0cd"}}]})
    assert SseDecoder().feed(sse_record(payload)) == [SseEvent("message", payload.decode())]


def test_sse_decoder_refuses_an_endless_event_or_line() -> None:
    decoder = SseDecoder(max_chars=10)
    decoder.feed(b"data: 12345\n")
    with pytest.raises(ValueError, match="event longer than 10"):
        decoder.feed(b"data: 67890\n")
    with pytest.raises(ValueError, match="line longer than 10"):
        SseDecoder(max_chars=10).feed(b"data: 12345678901")


#: The same examples on every run: CI must be deterministic.
DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=200)


@DETERMINISTIC
@given(
    payloads=st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), min_size=1)),
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000)),
)
def test_sse_decoder_reads_events_however_the_bytes_are_cut(payloads: list[str], line_end: bytes, cuts: list[int]) -> None:
    wire = (b"".join(sse_record(payload.encode()) for payload in payloads) + SSE_DONE).replace(b"\n", line_end)
    decoder = SseDecoder()
    events = []
    for start, end in itertools.pairwise([0, *sorted(cut % (len(wire) + 1) for cut in cuts), len(wire)]):
        events += decoder.feed(wire[start:end])
    if line_end == b"\r":
        events += decoder.feed(b"\n")  # a CR last may be half a CRLF until more bytes come
    assert [event.data for event in events] == [*payloads, "[DONE]"]


def chat_chunk(delta: dict[str, object], finish_reason: str | None = None) -> dict[str, object]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_chat_stream_becomes_chunks_usage_and_a_result() -> None:
    stream = UpstreamStream("chat", ROOT)
    chunks = feed_all(
        stream,
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"reasoning": "hmm"}),
        chat_chunk({"content": "Hel"}),
        chat_chunk({"content": "lo"}),
        chat_chunk({}, "stop"),
        {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE},
        "[DONE]",
    )
    assert chunks == [
        Chunk(delta=Delta(reasoning_content="hmm")),
        Chunk(delta=Delta(content="Hel")),
        Chunk(delta=Delta(content="lo")),
        Chunk(delta=Delta(), finish_reason="stop"),
    ]
    assert stream.done
    stream.end()
    choices, usage = stream.result()
    assert choices == [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello", "reasoning_content": "hmm"}}]
    assert usage == Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)


def test_tool_call_fragments_pass_through_and_join_in_the_result() -> None:
    stream = UpstreamStream("chat", ROOT)
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": ""}}
    chunks = feed_all(
        stream,
        chat_chunk({"role": "assistant", "content": None, "tool_calls": [first]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path": '}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"a.py"}'}}]}),
        chat_chunk({}, "tool_calls"),
        "[DONE]",
    )
    assert [chunk.delta.tool_calls for chunk in chunks[:3]] == [
        [first],
        [{"index": 0, "function": {"arguments": '{"path": '}}],
        [{"index": 0, "function": {"arguments": '"a.py"}'}}],
    ]
    assert chunks[3].finish_reason == "tool_calls"
    choices, usage = stream.result()
    assert choices[0]["message"]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]
    assert choices[0]["finish_reason"] == "tool_calls"
    assert usage is None


def test_a_completion_stream_carries_text() -> None:
    stream = UpstreamStream("completion", ROOT)
    chunks = feed_all(
        stream,
        {"object": "text_completion", "choices": [{"index": 0, "text": "x)", "finish_reason": None}]},
        {"object": "text_completion", "choices": [{"index": 0, "text": ":", "finish_reason": "length"}]},
        "[DONE]",
    )
    assert [chunk.delta.content for chunk in chunks] == ["x)", ":"]
    assert stream.result() == ([{"index": 0, "finish_reason": "length", "text": "x):"}], None)


def test_an_error_record_mid_stream_keeps_its_code() -> None:
    stream = UpstreamStream("chat", ROOT)
    feed_all(stream, chat_chunk({"content": "Hel"}))
    with pytest.raises(AgentFailure) as raised:
        feed_all(stream, {"error": {"message": "the agent disconnected", "type": "server_error", "code": "agent_disconnected"}})
    assert raised.value.code == "agent_disconnected"
    assert raised.value.message == f"upstream {ROOT} failed mid-answer: the agent disconnected"


@pytest.mark.parametrize("record", ["{not json", "[1, 2]", '{"choices": "none"}', '{"choices": [{"index": 0, "delta": "text"}]}'])
def test_a_malformed_record_is_a_bad_response(record: str) -> None:
    with pytest.raises(AgentFailure) as raised:
        UpstreamStream("chat", ROOT).feed(SseEvent("message", record))
    assert raised.value.code == "upstream_bad_response"
    assert raised.value.message.startswith(f"upstream {ROOT} sent a malformed answer: not an OpenAI chunk: ")


def test_a_plain_text_error_event_is_an_upstream_error() -> None:
    with pytest.raises(AgentFailure) as raised:
        UpstreamStream("chat", ROOT).feed(SseEvent("error", "model crashed"))
    assert (raised.value.code, raised.value.message) == ("upstream_error", f"upstream {ROOT} failed mid-answer: model crashed")


def test_a_stream_that_stops_short_is_a_failure_but_a_missing_done_is_forgiven() -> None:
    truncated = UpstreamStream("chat", ROOT)
    feed_all(truncated, chat_chunk({"content": "Hel"}))
    with pytest.raises(AgentFailure, match="ended the stream before the answer was complete"):
        truncated.end()
    finished = UpstreamStream("chat", ROOT)
    feed_all(finished, chat_chunk({"content": "Hello"}, "stop"))
    finished.end()
    assert finished.result()[0][0]["message"]["content"] == "Hello"


def test_a_whole_answer_from_an_upstream_that_does_not_stream() -> None:
    body = dumps(
        {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "reasoning": "short"}, "finish_reason": "stop", "logprobs": None}],
            "usage": USAGE,
        }
    )
    choices, usage = whole_answer(body, ROOT)
    assert choices == [{"index": 0, "message": {"role": "assistant", "content": "Hi", "reasoning": "short", "reasoning_content": "short"}, "finish_reason": "stop"}]
    assert usage == Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)
    with pytest.raises(AgentFailure, match="an answer without choices"):
        whole_answer(b'{"choices": []}', ROOT)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_CHOICE_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "index": st.sampled_from([0, 1, "0", True, None, 0.0]),
        "delta": st.sampled_from([None, {}, {"content": "a"}, {"reasoning": "r"}, {"tool_calls": [{"index": 0}]}, "text", []]),
        "text": st.sampled_from([None, "t", 5, ""]),
        "message": st.sampled_from([None, {"role": "assistant"}, "m"]),
        "finish_reason": st.sampled_from([None, "stop", 1]),
        "logprobs": _JSON_VALUES,
    },
)
_RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=5),
        "choices": st.none() | st.lists(_CHOICE_VALUES | _JSON_VALUES, max_size=3) | _JSON_VALUES,
        "usage": st.sampled_from([None, USAGE, {"prompt_tokens": -1}, "u"]),
        "error": st.sampled_from([None, {"message": "m", "code": "c"}, "e"]),
    },
)


def _outcome(stream: UpstreamStream, data: str) -> object:
    try:
        return (stream.feed(SseEvent("message", data)), stream.usage, stream.finish_reason, stream.answer.content)
    except AgentFailure as failure:
        return (failure.code, failure.message)


@DETERMINISTIC
@given(st.lists(_RECORDS | _JSON_VALUES, min_size=1, max_size=4))
def test_the_plain_chunk_reader_agrees_with_pydantic(records: list[object]) -> None:
    """Chunks of the usual shape skip pydantic; every record, usual or not, must come out
    exactly as pydantic's reading of it would have."""
    fast, slow = UpstreamStream("chat", ROOT), UpstreamStream("chat", ROOT)
    for record in records:
        data = json.dumps(record)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(upstream_wire, "_plain_chunk", lambda data: None)
            slow_outcome = _outcome(slow, data)
        assert _outcome(fast, data) == slow_outcome, data
