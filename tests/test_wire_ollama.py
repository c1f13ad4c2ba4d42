"""Ollama wire format, sans-IO: NDJSON lines byte for byte, request mapping, metadata payloads."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from trioprovider.errors import ApiError
from trioprovider.events import DeltaEvent, Failed, Finished, Heartbeat
from trioprovider.protocol import Delta, ModelCard, Usage
from trioprovider.wire.answer import Answer
from trioprovider.wire.ollama import (
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
from trioprovider.wire.openai import Defaults, parse_request

T = "2026-01-02T03:04:05.678Z"
HEAD = b'{"model":"echo","created_at":"2026-01-02T03:04:05.678Z",'
USAGE = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
# started 1000 ns, first token after 250 ns, done 1000 ns later.
TIMING = Timing(started_ns=1_000, first_token_ns=1_250, finished_ns=2_250)
METRICS = (
    b'"total_duration":1250,"load_duration":0,"prompt_eval_count":3,'
    b'"prompt_eval_duration":250,"eval_count":2,"eval_duration":1000}\n'
)
EMPTY = b'"message":{"role":"assistant","content":""}'


def chat_encoder() -> OllamaChatEncoder:
    return OllamaChatEncoder("echo", T, Timing(TIMING.started_ns, TIMING.first_token_ns, TIMING.finished_ns))


def generate_encoder() -> OllamaGenerateEncoder:
    return OllamaGenerateEncoder("echo", T, Timing(TIMING.started_ns, TIMING.first_token_ns, TIMING.finished_ns))


# -- /api/chat stream --------------------------------------------------------------------------

def test_plain_text_chat_stream_is_byte_exact() -> None:
    enc = chat_encoder()
    first = enc.encode([DeltaEvent(Delta(content="Hel"))])
    rest = enc.encode([DeltaEvent(Delta(content="lo ✓\n")), Finished("stop", USAGE)])
    assert first == HEAD + b'"message":{"role":"assistant","content":"Hel"},"done":false}\n'
    assert rest == (
        HEAD + b'"message":{"role":"assistant","content":"lo \xe2\x9c\x93\\n"},"done":false}\n'
        + HEAD + EMPTY + b',"done_reason":"stop","done":true,' + METRICS
    )
    # Every line is a JSON object of its own.
    for line in (first + rest).splitlines():
        assert isinstance(json.loads(line), dict)


def test_reasoning_goes_in_thinking_with_empty_content() -> None:
    out = chat_encoder().encode([DeltaEvent(Delta(reasoning_content="hmm")), DeltaEvent(Delta(content="ok"))])
    assert out == (
        HEAD + b'"message":{"role":"assistant","content":"","thinking":"hmm"},"done":false}\n'
        + HEAD + b'"message":{"role":"assistant","content":"ok"},"done":false}\n'
    )


def test_tool_call_fragments_are_sent_whole_with_object_arguments() -> None:
    enc = chat_encoder()
    during = enc.encode(
        [
            DeltaEvent(Delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "read", "arguments": ""}}])),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "function": {"arguments": '{"pa'}}])),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "function": {"arguments": 'th":"a.py"}'}}])),
            DeltaEvent(Delta(tool_calls=[{"index": 1, "id": "call_2", "function": {"name": "ls", "arguments": ""}}])),
        ]
    )
    # Nothing is sent until the calls are complete.
    assert during == b""
    end = enc.encode([Finished("tool_calls", USAGE)])
    assert end == (
        HEAD + b'"message":{"role":"assistant","content":"","tool_calls":['
        b'{"function":{"name":"read","arguments":{"path":"a.py"}}},'
        b'{"function":{"name":"ls","arguments":{}}}]},"done":false}\n'
        + HEAD + EMPTY + b',"done_reason":"stop","done":true,' + METRICS
    )


def test_arguments_that_are_not_an_object_are_passed_as_text() -> None:
    enc = chat_encoder()
    end = enc.encode([DeltaEvent(Delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "oops"}}])), Finished("tool_calls", USAGE)])
    assert json.loads(end.splitlines()[0])["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": "oops"}}]


def test_length_is_the_done_reason_and_an_empty_answer_still_ends() -> None:
    out = chat_encoder().encode([Finished("length", USAGE)])
    assert out == HEAD + EMPTY + b',"done_reason":"length","done":true,' + METRICS


def test_error_is_one_line_and_heartbeats_send_nothing() -> None:
    enc = chat_encoder()
    assert enc.encode([Heartbeat()]) == b""
    out = enc.encode([DeltaEvent(Delta(content="a")), Failed(ApiError(503, "agent gone", code="agent_disconnected"))])
    assert out == HEAD + b'"message":{"role":"assistant","content":"a"},"done":false}\n' + HEAD + b'"done":true,"done_reason":"error","error":"agent gone"}\n'


def test_a_clock_stamps_first_token_and_finish() -> None:
    readings = iter([400, 900])
    timing = Timing(started_ns=100)
    enc = OllamaChatEncoder("echo", T, timing, clock=lambda: next(readings))
    out = enc.encode([DeltaEvent(Delta(content="a")), DeltaEvent(Delta(content="b")), Finished("stop", USAGE)])
    assert timing == Timing(started_ns=100, first_token_ns=400, finished_ns=900)
    last = json.loads(out.splitlines()[-1])
    assert (last["total_duration"], last["prompt_eval_duration"], last["eval_duration"]) == (800, 300, 500)


# -- /api/generate stream ----------------------------------------------------------------------

def test_generate_stream_is_byte_exact() -> None:
    enc = generate_encoder()
    out = enc.encode([DeltaEvent(Delta(content="x = 1")), Heartbeat(), Finished("stop", USAGE)])
    assert out == (
        HEAD + b'"response":"x = 1","done":false}\n'
        + HEAD + b'"response":"","done":true,"done_reason":"stop",' + METRICS
    )


def test_generate_error_line_is_a_done_line_with_the_error() -> None:
    out = generate_encoder().encode([Failed(ApiError(504, "too slow"))])
    assert out == HEAD + b'"done":true,"done_reason":"error","error":"too slow"}\n'


# -- whole answers -----------------------------------------------------------------------------

def test_whole_chat_answer_has_the_final_line_shape() -> None:
    answer = Answer()
    answer.feed(
        [
            DeltaEvent(Delta(reasoning_content="think")),
            DeltaEvent(Delta(content="Reading. ")),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "id": "c", "function": {"name": "read", "arguments": '{"path":'}}])),
            DeltaEvent(Delta(tool_calls=[{"index": 0, "function": {"arguments": '"a"}'}}])),
            Finished("tool_calls", USAGE),
        ]
    )
    assert ollama_chat_response(answer, "echo", T, TIMING) == {
        "model": "echo",
        "created_at": T,
        "message": {
            "role": "assistant",
            "content": "Reading. ",
            "thinking": "think",
            "tool_calls": [{"function": {"name": "read", "arguments": {"path": "a"}}}],
        },
        "done_reason": "stop",
        "done": True,
        "total_duration": 1250,
        "load_duration": 0,
        "prompt_eval_count": 3,
        "prompt_eval_duration": 250,
        "eval_count": 2,
        "eval_duration": 1000,
    }


def test_whole_generate_answer() -> None:
    answer = Answer()
    answer.feed([DeltaEvent(Delta(content="a")), DeltaEvent(Delta(content="b")), Finished("length", USAGE)])
    body = ollama_generate_response(answer, "echo", T, TIMING)
    assert body["response"] == "ab"
    assert (body["done"], body["done_reason"], body["eval_count"], body["total_duration"]) == (True, "length", 2, 1250)


# -- requests ----------------------------------------------------------------------------------

def test_void_fim_request_keeps_the_suffix_under_raw() -> None:
    body = {
        "model": "echo",
        "prompt": "def f():\n    ",
        "suffix": "\n\nprint(f())",
        "raw": True,
        "stream": True,
        "system": "ignored under raw",
        "options": {"stop": ["\n\n"], "num_predict": 300},
    }
    invoke = ollama_generate_invoke(parse_request(OllamaGenerateRequest, body), request_id="r", session_id="s", defaults=Defaults())
    assert invoke.kind == "completion"
    assert (invoke.prompt, invoke.suffix) == ("def f():\n    ", "\n\nprint(f())")
    assert (invoke.max_tokens, invoke.stop, invoke.stream) == (300, ["\n\n"], True)
    assert invoke.messages is None


def test_system_goes_in_front_of_the_prompt_without_raw() -> None:
    body = {"model": "echo", "prompt": "hi", "system": "Be brief."}
    invoke = ollama_generate_invoke(parse_request(OllamaGenerateRequest, body), request_id="r", session_id="s", defaults=Defaults())
    assert invoke.prompt == "Be brief.\n\nhi"
    assert invoke.suffix is None


def test_options_map_to_sampling_with_server_defaults() -> None:
    defaults = Defaults(max_tokens=1000, temperature=0.5, top_p=0.9)

    def invoke(options: dict[str, Any] | None) -> Any:
        body: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        if options is not None:
            body["options"] = options
        return ollama_chat_invoke(parse_request(OllamaChatRequest, body), body["messages"], request_id="r", session_id="s", defaults=defaults)

    plain = invoke(None)
    assert (plain.max_tokens, plain.temperature, plain.top_p, plain.stop, plain.stream) == (1000, 0.5, 0.9, None, True)
    assert invoke({"num_predict": -1}).max_tokens == 1000
    assert invoke({"num_predict": 0}).max_tokens == 1
    assert invoke({"num_predict": 100_000}).max_tokens == 8192
    tuned = invoke({"num_predict": 64, "stop": "END", "temperature": 0, "top_p": 0.5, "num_ctx": 4096, "seed": 1})
    assert (tuned.max_tokens, tuned.stop, tuned.temperature, tuned.top_p) == (64, ["END"], 0, 0.5)


def test_chat_messages_pass_through_with_tool_calls_in_openai_shape() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "rules", "x-extra": 1},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "read", "arguments": {"path": "a"}}},
            {"function": {"name": "ls", "arguments": {}}},
        ]},
        {"role": "tool", "content": "[]", "tool_name": "ls"},
        {"role": "tool", "content": "text of a"},
    ]
    body = {"model": "echo", "messages": messages, "stream": False, "tools": [{"type": "function", "function": {"name": "read"}}], "think": True, "format": "json", "keep_alive": "5m"}
    invoke = ollama_chat_invoke(parse_request(OllamaChatRequest, body), messages, request_id="r", session_id="s", defaults=Defaults())
    assert invoke.kind == "chat" and invoke.stream is False
    assert invoke.tools == body["tools"]
    assert invoke.messages == [
        {"role": "developer", "content": "rules", "x-extra": 1},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2_0", "type": "function", "function": {"name": "read", "arguments": '{"path": "a"}'}},
            {"id": "call_2_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
        ]},
        {"role": "tool", "content": "[]", "tool_name": "ls", "tool_call_id": "call_2_1"},
        {"role": "tool", "content": "text of a", "tool_call_id": "call_2_0"},
    ]
    # The caller's dicts are left as they were.
    assert "tool_call_id" not in messages[3]


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (OllamaChatRequest, {"messages": []}, "model"),
        (OllamaChatRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (OllamaChatRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (OllamaChatRequest, {"model": "m", "messages": [], "options": {"temperature": 3}}, "options.temperature"),
        (OllamaChatRequest, {"model": "m", "messages": [], "options": {"top_p": -0.1}}, "options.top_p"),
        (OllamaChatRequest, {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages.0.tool_calls.0.function.name"),
        (OllamaGenerateRequest, {"model": "m", "prompt": 1}, "prompt"),
        (OllamaGenerateRequest, {"model": "m", "prompt": "p", "options": {"num_predict": "many"}}, "options.num_predict"),
    ],
)
def test_invalid_requests_name_the_field(model: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_request(model, body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.message.startswith(param + ":")


def test_requests_that_cannot_be_served_are_refused_with_400() -> None:
    def chat(body: dict[str, Any], vision: bool = False) -> Any:
        request = parse_request(OllamaChatRequest, body)
        return ollama_chat_invoke(request, body["messages"], request_id="r", session_id="s", defaults=Defaults(), supports_vision=lambda: vision)

    with pytest.raises(ApiError) as caught:
        chat({"model": "m", "messages": []})
    assert caught.value.param == "messages"
    pictured = {"model": "m", "messages": [{"role": "user", "content": "what?", "images": ["iVBOR"]}]}
    with pytest.raises(ApiError) as caught:
        chat(pictured)
    assert caught.value.param == "messages.0.images"
    assert chat(pictured, vision=True).messages == pictured["messages"]
    with pytest.raises(ApiError) as caught:
        ollama_generate_invoke(parse_request(OllamaGenerateRequest, {"model": "m"}), request_id="r", session_id="s", defaults=Defaults())
    assert caught.value.param == "prompt"


# -- metadata ----------------------------------------------------------------------------------

CARD = ModelCard(id="echo", context_window=32768, supports_tools=True, supports_fim=True)


def test_tags_payload_shape() -> None:
    payload = tags_payload([CARD, ModelCard(id="other")], "2026-01-01T00:00:00Z")
    first = payload["models"][0]
    assert [m["name"] for m in payload["models"]] == ["echo", "other"]
    assert first == {
        "name": "echo",
        "model": "echo",
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 0,
        "digest": hashlib.sha256(b"echo").hexdigest(),
        "details": {
            "parent_model": "",
            "format": "bridge",
            "family": "trioprovider",
            "families": ["trioprovider"],
            "parameter_size": "",
            "quantization_level": "",
        },
    }
    # Stable across calls: clients compare digests to notice changes.
    assert tags_payload([CARD], "x")["models"][0]["digest"] == first["digest"]


def test_show_payload_has_context_length_and_capabilities() -> None:
    payload = show_payload(CARD)
    assert payload["model_info"] == {"general.architecture": "trioprovider", "trioprovider.context_length": 32768}
    assert payload["capabilities"] == ["completion", "tools", "insert"]
    assert payload["details"]["family"] == "trioprovider"
    bare = show_payload(ModelCard(id="m", supports_vision=True))
    assert bare["model_info"] == {"general.architecture": "trioprovider"}
    assert bare["capabilities"] == ["completion", "vision"]


def test_ps_and_version_payloads() -> None:
    [entry] = ps_payload([CARD])["models"]
    assert (entry["name"], entry["size_vram"], entry["context_length"]) == ("echo", 0, 32768)
    assert "expires_at" in entry
    assert isinstance(VERSION_PAYLOAD["version"], str)
