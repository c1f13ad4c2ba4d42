"""More of the OpenAI surface, with the official client: completions (FIM), content parts,
one model by id, and base URLs typed with a trailing slash."""

from __future__ import annotations


import openai
import pytest
import trio

from support import in_thread, API_KEY, make_settings, openai_client, start_server
from trioprovider.agents.echo import echo_text



@pytest.fixture
async def running(nursery: trio.Nursery):  # type: ignore[no-untyped-def]
    server = await start_server(nursery, make_settings(**{"agents.echo.tokens": 4}), agents=("echo",))
    yield server
    server.shutdown.set()


async def test_completions_with_suffix_plain_and_streamed(running) -> None:  # type: ignore[no-untyped-def]
    client = openai_client(running)
    answer = await in_thread(client.completions.create, model="echo", prompt="def add(a, b):", suffix="\n    return c", max_tokens=300, stop=["\n\n"])
    assert answer.object == "text_completion"
    assert answer.choices[0].text == echo_text("def add(a, b):", 4)
    assert answer.usage.completion_tokens == 4

    def stream() -> str:
        return "".join(c.choices[0].text for c in client.completions.create(model="echo", prompt="x y", stream=True) if c.choices)

    assert await in_thread(stream) == echo_text("x y", 4)


async def test_text_content_parts_are_joined_and_images_refused(running) -> None:  # type: ignore[no-untyped-def]
    client = openai_client(running)
    parts = [{"type": "text", "text": "alpha "}, {"type": "text", "text": "beta"}]
    answer = await in_thread(client.chat.completions.create, model="echo", messages=[{"role": "user", "content": parts}])
    assert answer.choices[0].message.content == echo_text("alpha beta", 4)
    image = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as raised:
        await in_thread(client.chat.completions.create, model="echo", messages=[{"role": "user", "content": image}])
    assert "image_url" in raised.value.message


async def test_one_model_by_id(running) -> None:  # type: ignore[no-untyped-def]
    client = openai_client(running)
    model = await in_thread(client.models.retrieve, "echo")
    assert model.id == "echo" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.models.retrieve, "nope")


async def test_a_base_url_with_a_trailing_slash_still_works(running) -> None:  # type: ignore[no-untyped-def]
    import httpx

    response = await in_thread(
        httpx.post,
        f"{running.provider_url}//v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == echo_text("hi", 4)


READ_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        # As VoidEditor sends them: properties with only a description, no 'type'.
        "parameters": {"type": "object", "properties": {"text": {"description": "what to read"}}, "required": ["text"]},
    },
}


async def test_tool_call_round_trip_streamed_and_not(running) -> None:  # type: ignore[no-untyped-def]
    import json

    client = openai_client(running)
    messages: list[dict] = [{"role": "user", "content": "open main.py"}]

    def streamed() -> tuple[list, str | None]:
        deltas, finish = [], None
        for chunk in client.chat.completions.create(model="echo", messages=messages, tools=[READ_TOOL], stream=True):
            choice = chunk.choices[0]
            if choice.delta.tool_calls:
                deltas.extend(choice.delta.tool_calls)
            finish = choice.finish_reason or finish
        return deltas, finish

    deltas, finish = await in_thread(streamed)
    assert finish == "tool_calls"
    assert all(d.index == 0 for d in deltas)
    assert [d.id for d in deltas if d.id] == [deltas[0].id]  # id once
    assert [d.function.name for d in deltas if d.function.name] == ["read_file"]  # name once
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == {"text": "open main.py"}

    whole = await in_thread(client.chat.completions.create, model="echo", messages=messages, tools=[READ_TOOL])
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "read_file" and json.loads(call.function.arguments) == {"text": "open main.py"}

    # The client runs the tool and sends the result back; the agent answers from it.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "print('hi')"},
    ]
    final = await in_thread(client.chat.completions.create, model="echo", messages=messages, tools=[READ_TOOL])
    assert final.choices[0].message.content == echo_text("print('hi')", 4)
