"""More of the OpenAI surface, with the official client: completions (FIM), content parts,
one model by id, and base URLs typed with a trailing slash."""

from __future__ import annotations

from functools import partial

import openai
import pytest
import trio

from support import API_KEY, make_settings, openai_client, start_server
from trioprovider.agents.echo import echo_text


async def in_thread(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


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
