"""The optional key-less listener for VoidEditor's Ollama provider (``ollama.listen``)."""

from __future__ import annotations


import httpx
import ollama
import openai
import pytest
import trio

from support import in_thread, make_settings, start_server
from trioprovider.agents.echo import echo_text
from trioprovider.server import StartupError, preflight



async def test_void_ollama_provider_flow_without_a_key(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_settings(**{"ollama.listen": "127.0.0.1:0", "agents.echo.tokens": 3}), agents=("echo",))
    assert running.ollama_url and running.ollama_url != running.provider_url
    keyless = ollama.Client(host=running.ollama_url)
    assert "echo" in [m.model for m in (await in_thread(keyless.list)).models]
    # Void's Ollama provider chats through /v1 on the same host with 'Bearer noop'.
    void = openai.OpenAI(base_url=f"{running.ollama_url}/v1", api_key="noop", max_retries=0)

    def stream() -> str:
        return "".join(c.choices[0].delta.content or "" for c in void.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi void"}], stream=True))

    assert await in_thread(stream) == echo_text("hi void", 3)
    parts = await in_thread(lambda: list(keyless.generate(model="echo", prompt="a(", suffix=")", raw=True, stream=True)))
    assert parts[-1].done
    # The main port still wants the key, for /api as for /v1.
    with pytest.raises(ollama.ResponseError) as raised:
        await in_thread(ollama.Client(host=running.provider_url).list)
    assert raised.value.status_code == 401
    running.shutdown.set()


async def test_dns_rebinding_host_and_foreign_origin_are_refused(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_settings(**{"ollama.listen": "127.0.0.1:0"}), agents=("echo",))
    url = f"{running.ollama_url}/api/tags"
    evil_host = await in_thread(httpx.get, url, headers={"Host": "attacker.example:11434"})
    assert evil_host.status_code == 403 and "Host" in evil_host.json()["error"]
    evil_origin = await in_thread(httpx.get, url, headers={"Origin": "https://attacker.example"})
    assert evil_origin.status_code == 403
    local_origin = await in_thread(httpx.get, url, headers={"Origin": "http://127.0.0.1:5173"})
    assert local_origin.status_code == 200
    running.shutdown.set()


def test_the_keyless_listener_must_be_on_loopback() -> None:
    with pytest.raises(StartupError, match="not a loopback address"):
        preflight(make_settings(**{"ollama.listen": "0.0.0.0:11434", "provider.allow_non_loopback": True}))
