"""Graceful shutdown in process: in-flight answers get their grace, then a terminal record."""

from __future__ import annotations

import json
from functools import partial

import trio

from support import BRIDGE_TOKEN, RawHTTP, chat_body, make_settings, sse_payloads, start_server, wait_until
from trioprovider.agents.echo import EchoAgent
from trioprovider.agents.runner import run_agent


async def test_draining_finishes_short_answers_and_ends_long_ones_with_terminal_records() -> None:
    settings = make_settings(**{"provider.graceful_timeout": 1.0, "ollama.listen": "127.0.0.1:0"})
    long_agent = EchoAgent(tokens=10_000, delay=0.01, models=["long"])
    short_agent = EchoAgent(tokens=20, delay=0.02, models=["short"])
    async with trio.open_nursery() as outer:
        server_done = trio.Event()

        async def run_server(task_status: trio.TaskStatus[object]) -> None:
            async with trio.open_nursery() as nursery:
                running = await start_server(nursery, settings)
                task_status.started(running)
            server_done.set()

        running = await outer.start(run_server)
        for agent in (long_agent, short_agent):
            outer.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        await wait_until(lambda: len(running.provider.bridge.agents()) == 2)
        sse = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(model="long"))
        ndjson = await RawHTTP.post(running.ollama_url, "/api/chat", json.dumps({"model": "long", "messages": [{"role": "user", "content": "hi"}]}).encode())
        short = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(model="short"))
        for stream in (sse, ndjson, short):
            await stream.read_until(b'"content"')
        running.shutdown.set()
        started = trio.current_time()
        # Draining: the old requests may finish (new ones get a retryable 503 from admit).
        await wait_until(lambda: running.provider.draining)
        with trio.fail_after(10):
            await short.read_until(b"data: [DONE]")
            await sse.read_until(b"data: [DONE]")
            await ndjson.read_until(b'"done":true')
            await long_agent.cancel_arrived.wait()
            await server_done.wait()
        assert trio.current_time() - started < 1.0 + 1.0
        # The short answer finished normally within the grace period.
        assert json.loads(sse_payloads(short.received)[-2])["choices"][0]["finish_reason"] == "stop"
        assert json.loads(sse_payloads(sse.received)[-2])["error"]["code"] == "shutdown"
        # (Each NDJSON line travels in one HTTP chunk, so it is whole between the chunk framing.)
        last = json.loads([line for line in ndjson.received.split(b"\n") if b'"done":true' in line][-1])
        assert last["done"] is True and last["done_reason"] == "error" and "shutting down" in last["error"]
        assert len(long_agent.cancelled) == 2
        assert not short_agent.cancelled
        outer.cancel_scope.cancel()


async def test_a_request_waiting_for_a_slot_when_draining_starts_gets_a_503_not_a_cut_stream() -> None:
    settings = make_settings(
        **{"provider.graceful_timeout": 1.0, "performance.max_concurrent_requests": 1, "performance.queue_timeout": 30}
    )
    agent = EchoAgent(tokens=10_000, delay=0.01)
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings)
        nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        await wait_until(lambda: running.provider.bridge.agents())
        first = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await first.read_until(b'"content"')
        waiting = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await wait_until(lambda: running.provider.capacity.statistics().tasks_waiting == 1)
        running.shutdown.set()
        with trio.fail_after(10):
            await first.read_until(b"data: [DONE]")
            answer = await waiting.read_all()
        assert answer.startswith(b"HTTP/1.1 503")
        assert b'"code": "shutdown"' in answer
        nursery.cancel_scope.cancel()
