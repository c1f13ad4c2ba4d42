"""Hostile input against the live server: generated (hypothesis) and a fixed list of known attacks.

Every answer must be a 4xx with the error body of its API (or a 200 when the input happens to be
valid), never a 5xx and never a hang; the server keeps serving; nothing leaks; the audit log
records the violations; and valid prompt text reaches the agent byte for byte.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from support import API_KEY, ServerThread, audit_events, make_settings
from trioprovider.agents.runner import AnswerStream
from trioprovider.protocol import ModelCard, ModelInvoke, ModelResult, Usage
from trioprovider.server import Running

EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI must be deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MAX_BODY = 256 * 1024
MAX_CONTENT = 8 * 1024


class RecordingAgent:
    """Answers "ok" and keeps what it was sent, to compare with what the client sent."""

    agent_id = "recorder"
    models = [ModelCard(id="recorder", supports_fim=True)]
    max_concurrency = 16

    def __init__(self) -> None:
        self.received: dict[str, ModelInvoke] = {}

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        self.received[invoke.id] = invoke
        await out.text("ok")
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if invoke.kind == "chat":
            choice["message"] = {"role": "assistant", "content": "ok"}
        else:
            choice["text"] = "ok"
        return ModelResult(id=invoke.id, choices=[choice], usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))


RECORDER = RecordingAgent()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, Running]]:
    config = make_settings(
        **{
            "rate_limiting.enabled": False,
            "security.max_sessions": 1000,
            "security.max_content_bytes": MAX_CONTENT,
            "provider.max_body_bytes": MAX_BODY,
            "provider.body_timeout": 0.5,
            "ollama.listen": "127.0.0.1:0",
        }
    )
    thread = ServerThread(config, agents=("echo",), extra_agents=(RECORDER,))
    with thread as running:
        yield thread, running


@pytest.fixture(scope="module")
def http(server: tuple[ServerThread, Running]) -> Iterator[httpx.Client]:
    _, running = server
    with httpx.Client(base_url=running.provider_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield client


def assert_error_body(response: httpx.Response) -> None:
    """A 4xx in the shape of its API: OpenAI's ``{"error": {...}}`` or Ollama's ``{"error": "..."}``."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    if response.request.url.path.startswith("/api/"):
        assert isinstance(body["error"], str) and body["error"]
    else:
        error = body["error"]
        assert error["message"] and error["type"]


def assert_nothing_held(thread: ServerThread, running: Running) -> None:
    provider = running.provider

    def held() -> tuple[int, int, int, int]:
        return (
            len(provider.scopes),
            provider.gate.sessions.active_requests,
            provider.gate.limiter.open_reservations,
            provider.capacity.borrowed_tokens,
        )

    deadline = time.monotonic() + 10
    while thread.call(held) != (0, 0, 0, 0):
        assert time.monotonic() < deadline, thread.call(held)
        time.sleep(0.01)


# -- generated input ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "stop", "tools", "tool_choice", "stream_options", "prompt", "suffix", "options", "system", "raw"]
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "evil"]) | json_values},
        optional={"content": st.text(max_size=50) | json_values, "tool_calls": json_values, "name": json_values},
    ),
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["echo", "recorder", "nope"]) | json_values,
        "messages": messages | json_values,
        "stream": st.booleans() | json_values,
        **{field: json_values for field in FIELDS[3:]},
    },
)
PATHS = ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"]


@EXAMPLES
@given(path=st.sampled_from(PATHS), body=bodies)
def test_generated_json_bodies_get_4xx_or_an_answer_never_5xx(server: tuple[ServerThread, Running], http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    response = http.post(path, json=body)
    if response.status_code != 200:
        assert_error_body(response)


@EXAMPLES
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=200))
def test_generated_bytes_get_400(http: httpx.Client, path: str, raw: bytes) -> None:
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        assert response.status_code == 400
    if response.status_code != 200:
        assert_error_body(response)


# (h11, like any HTTP client, cannot send a header value with space at either end.)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)


@EXAMPLES
@given(authorization=header_text, host=header_text, origin=st.none() | header_text)
def test_generated_credentials_hosts_and_origins_are_refused(server: tuple[ServerThread, Running], authorization: str, host: str, origin: str | None) -> None:
    _, running = server
    headers = {"Authorization": authorization, "Host": host or "x"}
    if origin is not None:
        headers["Origin"] = origin
    with httpx.Client(base_url=running.provider_url, timeout=30) as client:
        response = client.post("/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]}, headers=headers)
    assert_error_body(response)
    assert response.status_code in (400, 401, 403)


@EXAMPLES
@given(text=st.text(max_size=300), suffix=st.text(max_size=100))
def test_valid_prompt_text_reaches_the_agent_byte_for_byte(http: httpx.Client, text: str, suffix: str) -> None:
    chat = http.post("/v1/chat/completions", json={"model": "recorder", "messages": [{"role": "system", "content": suffix}, {"role": "user", "content": text}]})
    assert chat.status_code == 200, chat.text
    received = RECORDER.received[chat.headers["x-request-id"]]
    assert received.messages == [{"role": "system", "content": suffix}, {"role": "user", "content": text}]
    fim = http.post("/v1/completions", json={"model": "recorder", "prompt": text, "suffix": suffix})
    assert fim.status_code == 200, fim.text
    received = RECORDER.received[fim.headers["x-request-id"]]
    assert (received.prompt, received.suffix) == (text, suffix)


def test_after_generated_input_the_server_still_serves_and_holds_nothing(server: tuple[ServerThread, Running], http: httpx.Client) -> None:
    thread, running = server
    assert_nothing_held(thread, running)
    answer = http.post("/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": "still there?"}]})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


# -- known attacks -----------------------------------------------------------------------------

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def chat_with(**fields: Any) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


ATTACKS: list[tuple[str, dict[str, str], bytes, int, str | None]] = [
    # (name, headers (None value: remove), body, status, error code or param)
    ("no key", {"Authorization": ""}, chat_with(), 401, "invalid_api_key"),
    ("wrong key", {"Authorization": "Bearer sk-not-the-key-0123456789"}, chat_with(), 401, "invalid_api_key"),
    ("basic auth", {"Authorization": "Basic dGVzdDp0ZXN0"}, chat_with(), 401, "invalid_api_key"),
    ("bearer without a token", {"Authorization": "Bearer"}, chat_with(), 401, "invalid_api_key"),
    ("huge body", {}, b'{"model": "echo", "messages": [{"role": "user", "content": "' + b"a" * (MAX_BODY + 1) + b'"}]}', 413, "request_too_large"),
    ("deeply nested json", {}, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("deeply nested object", {}, b'{"a":' * 20_000 + b"1" + b"}" * 20_000, 400, None),
    ("invalid utf-8", {}, b'{"model": "echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("not json", {}, b"model=echo&messages=hi", 400, None),
    ("json array", {}, b"[]", 400, None),
    ("messages not a list", {}, chat_with(messages="hi"), 400, "messages"),
    ("message not an object", {}, chat_with(messages=["hi"]), 400, "messages.0"),
    ("max_tokens a string", {}, chat_with(max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens negative", {}, chat_with(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens zero", {}, chat_with(max_tokens=0), 400, "max_tokens"),
    ("max_tokens huge", {}, chat_with(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens past 8192", {}, chat_with(max_tokens=8193), 400, "max_tokens"),
    ("temperature negative", {}, chat_with(temperature=-0.1), 400, "temperature"),
    ("temperature huge", {}, chat_with(temperature=1e308), 400, "temperature"),
    ("temperature NaN", {}, b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("top_p above 1", {}, chat_with(top_p=1.5), 400, "top_p"),
    ("n of 5", {}, chat_with(n=5), 400, "n"),
    ("too many messages", {}, chat_with(messages=[{"role": "user", "content": "x"}] * 501), 400, "messages"),
    ("content too large", {}, chat_with(messages=[{"role": "user", "content": "x" * (MAX_CONTENT + 1)}]), 400, "messages.0.content"),
    ("unknown model", {}, chat_with(model="gpt-ultra"), 404, "model_not_found"),
    ("model a number", {}, chat_with(model=5), 400, "model"),
    ("malformed session id", {"X-Session-Id": "../../etc/passwd"}, chat_with(), 400, "X-Session-Id"),
    ("evil host", {"Host": "evil.example"}, chat_with(), 403, "forbidden_host"),
    ("dns rebinding host", {"Host": "attacker.test:{port}"}, chat_with(), 403, "forbidden_host"),
    ("host with an empty label", {"Host": "a..b"}, chat_with(), 403, "forbidden_host"),
    ("host of one dot", {"Host": "."}, chat_with(), 403, "forbidden_host"),
    ("evil origin", {"Origin": "https://evil.example"}, chat_with(), 403, "forbidden_origin"),
]


@pytest.mark.parametrize(("name", "headers", "body", "status", "expected"), ATTACKS, ids=[attack[0] for attack in ATTACKS])
def test_known_attacks_get_a_precise_4xx(server: tuple[ServerThread, Running], http: httpx.Client, name: str, headers: dict[str, str], body: bytes, status: int, expected: str | None) -> None:
    thread, running = server
    port = running.provider_url.rsplit(":", 1)[1]
    sent = {"Content-Type": "application/json", **{key: value.format(port=port) for key, value in headers.items()}}
    if sent.get("Authorization") == "":
        del sent["Authorization"]
        request = httpx.Request("POST", f"{running.provider_url}/v1/chat/completions", headers=sent, content=body)
        with httpx.Client(timeout=30) as bare:
            response = bare.send(request)
    else:
        response = http.post("/v1/chat/completions", content=body, headers=sent)
    assert response.status_code == status, response.text[:300]
    assert_error_body(response)
    error = response.json()["error"]
    if expected is not None:
        assert expected in (error["code"], error["param"]), error
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert_nothing_held(thread, running)


def test_a_slow_body_is_cut_off_with_408(server: tuple[ServerThread, Running], http: httpx.Client) -> None:
    thread, running = server
    host, port = running.provider_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\""
            ).encode()
        )
        # Others are served meanwhile.
        assert http.get("/v1/models").status_code == 200
        answer = b""
        while b"}}" not in answer:
            data = slow.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"timeout_error"' in answer
    assert_nothing_held(thread, running)


def test_the_audit_log_recorded_the_violations(server: tuple[ServerThread, Running]) -> None:
    thread, running = server
    records = thread.call(audit_events, running)
    kinds = {record.get("kind") for record in records if record["event"] == "security_violation"}
    assert {"bad_host", "bad_origin"} <= kinds
    failures = [record for record in records if record["event"] == "authentication" and not record["success"]]
    assert len(failures) >= 4
    assert all(API_KEY not in json.dumps(record) for record in records)
    assert any(record["event"] == "model_request" and record["outcome"] == "completed" for record in records)

