"""The Ollama API on the main port (key required), driven by the official ``ollama`` client."""

from __future__ import annotations


import httpx
import ollama
import pytest
import trio

from support import in_thread, API_KEY, make_settings, start_server
from trioprovider.agents.echo import echo_text



@pytest.fixture
async def running(nursery: trio.Nursery):  # type: ignore[no-untyped-def]
    server = await start_server(nursery, make_settings(**{"agents.echo.tokens": 4}), agents=("echo",))
    yield server
    server.shutdown.set()


def client(running, key: str = API_KEY) -> ollama.Client:  # type: ignore[no-untyped-def]
    return ollama.Client(host=running.provider_url, headers={"Authorization": f"Bearer {key}"})


async def test_root_version_tags_show_ps(running) -> None:  # type: ignore[no-untyped-def]
    root = await in_thread(httpx.get, running.provider_url + "/")
    assert root.text == "Ollama is running"
    head = await in_thread(httpx.head, running.provider_url + "/")
    assert head.status_code == 200
    assert "version" in (await in_thread(httpx.get, running.provider_url + "/api/version")).json()
    c = client(running)
    names = [m.model for m in (await in_thread(c.list)).models]
    assert set(names) == {"echo", "cursor-agent-local"}
    shown = await in_thread(c.show, "echo")
    assert shown.modelinfo["trioprovider.context_length"] == 131072
    assert "insert" in (shown.capabilities or [])
    assert (await in_thread(c.ps)).models


async def test_chat_plain_and_streamed_ends_with_a_done_line(running) -> None:  # type: ignore[no-untyped-def]
    c = client(running)
    messages = [{"role": "user", "content": "hello ollama"}]
    answer = await in_thread(c.chat, model="echo", messages=messages, stream=False)
    assert answer.message.content == echo_text("hello ollama", 4)
    assert answer.done and answer.eval_count == 4 and answer.total_duration >= 0

    def stream() -> list:
        return list(c.chat(model="echo", messages=messages, stream=True, options={"num_predict": 3}))

    parts = await in_thread(stream)
    assert "".join(p.message.content for p in parts) == echo_text("hello ollama", 3)
    assert parts[-1].done and parts[-1].done_reason == "length"
    assert not any(p.done for p in parts[:-1])


async def test_generate_with_raw_and_suffix_streams_to_done(running) -> None:  # type: ignore[no-untyped-def]
    c = client(running)

    def stream() -> list:
        return list(c.generate(model="echo", prompt="def f(", suffix="\n    return 1", raw=True, stream=True, options={"stop": ["\n\n"], "num_predict": 300}))

    parts = await in_thread(stream)
    assert "".join(p.response for p in parts) == echo_text("def f(", 4)
    assert parts[-1].done and parts[-1].eval_count == 4
    whole = await in_thread(c.generate, model="echo", prompt="def f(", suffix="\n    return 1", stream=False, options={"num_predict": 3})
    assert whole.response == echo_text("def f(", 3)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 3


async def test_errors_are_the_clients_own_exceptions(running) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ollama.ResponseError) as unknown:
        await in_thread(client(running).chat, model="nope", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.status_code == 404 and "nope" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as unauthorized:
        await in_thread(client(running, key="wrong").list)
    assert unauthorized.value.status_code == 401
    bad = await in_thread(httpx.post, running.provider_url + "/api/chat", headers={"Authorization": f"Bearer {API_KEY}"}, json={"model": "echo"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]


async def test_tool_call_round_trip_in_ollamas_shape(running) -> None:  # type: ignore[no-untyped-def]
    c = client(running)
    tool = {"type": "function", "function": {"name": "read_file", "description": "Read", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}
    messages: list = [{"role": "user", "content": "open main.py"}]
    answer = await in_thread(c.chat, model="echo", messages=messages, tools=[tool], stream=False)
    [call] = answer.message.tool_calls
    assert call.function.name == "read_file" and call.function.arguments == {"text": "open main.py"}
    parts = await in_thread(lambda: list(c.chat(model="echo", messages=messages, tools=[tool], stream=True)))
    calls = [tc for p in parts for tc in (p.message.tool_calls or [])]
    assert [tc.function.arguments for tc in calls] == [{"text": "open main.py"}]
    assert parts[-1].done
    messages += [answer.message.model_dump(exclude_none=True), {"role": "tool", "content": "print(1)"}]
    final = await in_thread(c.chat, model="echo", messages=messages, tools=[tool], stream=False)
    assert final.message.content == echo_text("print(1)", 4)
