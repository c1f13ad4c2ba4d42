"""The spine end to end on real sockets: Hypercorn on port 0, the bridge on port 0, real clients."""

from __future__ import annotations

import json
import random
import sys
from functools import partial

import openai
import pytest
import trio

from support import (
    in_thread,
    BRIDGE_TOKEN,
    RawHTTP,
    chat_body,
    count_tasks,
    make_settings,
    openai_client,
    sse_payloads,
    start_server,
    wait_until,
)
from trioprovider.agents.echo import EchoAgent, echo_text
from trioprovider.agents.runner import run_agent
from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.server import serve_bridge

USER = [{"role": "user", "content": "hello there"}]



async def test_models_and_chat_plain_and_streamed() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"agents.echo.tokens": 6}), agents=("echo",))
        client = openai_client(running)
        models = await in_thread(client.models.list)
        assert {m.id for m in models.data} == {"echo", "cursor-agent-local"}
        assert all(m.object == "model" for m in models.data)

        answer = await in_thread(client.chat.completions.create, model="echo", messages=USER)
        assert answer.choices[0].message.content == echo_text("hello there", 6)
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.completion_tokens == 6

        def stream() -> tuple[list[str], object]:
            pieces, usage = [], None
            for chunk in client.chat.completions.create(
                model="cursor-agent-local", messages=USER, stream=True, stream_options={"include_usage": True}
            ):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                else:
                    usage = chunk.usage
            return pieces, usage

        pieces, usage = await in_thread(stream)
        assert "".join(pieces) == echo_text("hello there", 6)
        assert len([p for p in pieces if p]) == 6  # one chunk per token: it really streamed
        assert usage is not None and usage.completion_tokens == 6
        running.shutdown.set()


async def test_sse_wire_format_is_exactly_openai() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"agents.echo.tokens": 2}), agents=("echo",))
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body("hi"))
        raw = await http.read_all()
        head, _ = raw.split(b"\r\n\r\n", 1)
        assert b"content-type: text/event-stream" in head.lower()
        assert b"x-request-id:" in head.lower()
        payloads = sse_payloads(raw)
        assert payloads[-1] == b"[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert [c["choices"][0]["delta"] for c in chunks] == [
            {"role": "assistant", "content": "hi"},
            {"content": " hi"},
            {},
        ]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert len({c["id"] for c in chunks}) == 1
        assert b"event:" not in raw
        running.shutdown.set()


async def test_missing_or_wrong_key_gets_401_in_openai_format() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, agents=("echo",))
        for key in ("", "wrong-key"):
            http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(), api_key=key)
            raw = await http.read_all()
            head, body = raw.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 401")
            assert b"www-authenticate: bearer" in head.lower()
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await in_thread(openai_client(running, api_key="nope").models.list)
        # /health needs no key.
        import httpx

        health = await in_thread(httpx.get, f"{running.provider_url}/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        running.shutdown.set()


async def test_agent_connected_over_the_websocket_bridge() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        agent = EchoAgent(tokens=3, agent_id="remote-echo", models=["remote"])
        nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        await wait_until(lambda: running.provider.bridge.agents())
        answer = await in_thread(openai_client(running).chat.completions.create, model="remote", messages=USER)
        assert answer.choices[0].message.content == echo_text("hello there", 3)
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_external_bridge_carries_requests_both_ways() -> None:
    async with trio.open_nursery() as nursery:
        hub = BridgeHub(token=BRIDGE_TOKEN, default_model="cursor-agent-local")
        port = await nursery.start(partial(serve_bridge, hub, "127.0.0.1", 0, max_frame_bytes=1 << 20))
        bridge_url = f"ws://127.0.0.1:{port}"
        agent = EchoAgent(tokens=5, delay=0.01)
        nursery.start_soon(partial(run_agent, agent, bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        settings = make_settings(**{"mcp.embedded_bridge": False, "mcp.bridge_url": bridge_url, "mcp.reconnect_delay": 0.1})
        running = await start_server(nursery, settings)
        assert running.hub is None
        await wait_until(lambda: running.provider.bridge.agents())
        client = openai_client(running)
        models = await in_thread(client.models.list)
        assert {m.id for m in models.data} == {"echo", "cursor-agent-local"}
        answer = await in_thread(client.chat.completions.create, model="echo", messages=USER)
        assert answer.choices[0].message.content == echo_text("hello there", 5)

        def stream() -> str:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="echo", messages=USER, stream=True))

        assert await in_thread(stream) == echo_text("hello there", 5)

        # A disconnect travels provider -> external bridge -> agent as model_cancel.
        slow = EchoAgent(tokens=1000, delay=0.05, models=["slow"], agent_id="slow")
        nursery.start_soon(partial(run_agent, slow, bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        await wait_until(lambda: any(a.agent_id == "slow" for a in running.provider.bridge.agents()))
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(model="slow"))
        await http.read_until(b'"content"')
        hung_up = await http.hang_up()
        await slow.cancel_arrived.wait()
        print(f"external bridge: disconnect -> model_cancel in {(slow.cancelled[0][1] - hung_up) * 1000:.1f} ms")
        await wait_until(lambda: hub.in_flight() == 0 and not running.provider.scopes)
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_two_concurrent_streams_interleave() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"agents.echo.tokens": 8, "agents.echo.delay_ms": 20}), agents=("echo",))
        client = openai_client(running)
        arrivals: list[tuple[str, str]] = []

        def stream(name: str, text: str) -> str:
            out = ""
            for chunk in client.chat.completions.create(model="echo", messages=[{"role": "user", "content": text}], stream=True):
                piece = chunk.choices[0].delta.content or ""
                if piece:
                    arrivals.append((name, piece))
                out += piece
            return out

        results: dict[str, str] = {}

        async def run(name: str, text: str) -> None:
            results[name] = await in_thread(stream, name, text)

        async with trio.open_nursery() as streams:
            streams.start_soon(run, "a", "apple")
            streams.start_soon(run, "b", "banana split")
        assert results == {"a": echo_text("apple", 8), "b": echo_text("banana split", 8)}
        # Each stream got only its own words, and they were in flight together.
        assert all(("apple" in piece) == (name == "a") for name, piece in arrivals)
        order = [name for name, _ in arrivals]
        first_b, last_a = order.index("b"), len(order) - 1 - order[::-1].index("a")
        assert first_b < last_a, order
        running.shutdown.set()


async def test_agent_killed_mid_stream_gives_a_terminal_error_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "trioprovider", "agent", "echo", "--bridge-url", running.bridge_url, "--token", BRIDGE_TOKEN, "--tokens", "1000", "--delay-ms", "20"],
                cwd=str(tmp_path),
                check=False,
            )
        )
        await wait_until(lambda: running.provider.bridge.agents(), timeout=30)
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await http.read_until(b'"content":" there"')
        process.kill()
        raw = await http.read_all()
        payloads = sse_payloads(raw)
        assert payloads[-1] == b"[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "agent_disconnected"
        assert error["type"] == "server_error"
        assert "disconnected" in error["message"]
        await wait_until(lambda: not running.provider.scopes)
        running.shutdown.set()


@pytest.mark.parametrize("when", ["mid-stream", "before-first-token", "unstreamed"])
async def test_client_disconnect_reaches_the_agent_as_model_cancel(when: str) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        # Before the first token: the agent thinks for a long time before its first word.
        delay = 0.02 if when == "mid-stream" else 30.0
        agent = EchoAgent(tokens=1000, delay=delay)
        nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        hub = running.hub
        assert hub is not None
        await wait_until(lambda: hub.agents())
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(stream=when != "unstreamed"))
        if when == "mid-stream":
            await http.read_until(b'"content":" there"')
        elif when == "unstreamed":
            # Nothing is written before the whole answer: the request waits on its client.
            await wait_until(lambda: hub.in_flight() == 1)
            assert http.received == b""
        else:
            await http.read_until(b"\r\n\r\n")  # headers only: the stream is open, no token yet
            await wait_until(lambda: hub.in_flight() == 1)
            assert b'"content"' not in http.received
        hung_up = await http.hang_up()
        with trio.fail_after(5):
            await agent.cancel_arrived.wait()
        delay_ms = (agent.cancelled[0][1] - hung_up) * 1000
        print(f"{when}: client disconnect -> model_cancel at the agent in {delay_ms:.1f} ms")
        assert delay_ms < 1000
        await wait_until(lambda: hub.in_flight() == 0 and not running.provider.scopes)
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_no_agent_gives_503_saying_how_to_start_one() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"mcp.agent_wait_timeout": 0.2}))
        with pytest.raises(openai.APIStatusError) as raised:
            await in_thread(openai_client(running).chat.completions.create, model="echo", messages=USER)
        assert raised.value.status_code == 503
        body = raised.value.body
        assert isinstance(body, dict) and body["code"] == "no_agent"
        assert "python -m trioprovider agent echo" in body["message"]
        running.shutdown.set()


async def test_a_request_waits_for_an_agent_that_connects_in_time() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"mcp.agent_wait_timeout": 20}))
        result: list[str] = []

        async def ask() -> None:
            answer = await in_thread(openai_client(running).chat.completions.create, model="echo", messages=USER)
            result.append(answer.choices[0].message.content)

        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            await trio.sleep(0.3)
            inner.start_soon(partial(run_agent, EchoAgent(tokens=2), running.bridge_url, BRIDGE_TOKEN))
            await wait_until(lambda: result)
            inner.cancel_scope.cancel()
        assert result == ["hello there"]
        running.shutdown.set()


async def test_unknown_model_is_404_when_agents_are_connected() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, agents=("echo",))
        with pytest.raises(openai.NotFoundError) as raised:
            await in_thread(openai_client(running).chat.completions.create, model="gpt-9", messages=USER)
        assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]
        running.shutdown.set()


async def test_nothing_is_left_behind_after_200_requests_with_random_disconnects() -> None:
    settings = make_settings(
        **{
            "agents.echo.tokens": 20,
            "agents.echo.delay_ms": 2,
            "agents.echo.max_concurrency": 64,
            "rate_limiting.requests_per_minute": 100_000,
            "rate_limiting.tokens_per_minute": 100_000_000,
        }
    )
    rng = random.Random(20261121)
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        provider, hub = running.provider, running.hub
        assert hub is not None
        # Warm up once so lazily created long-lived tasks exist before the baseline is taken.
        warm = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await warm.read_all()
        await wait_until(lambda: not provider.scopes)
        baseline_tasks = count_tasks()
        outcomes = {"completed": 0, "hung_up": 0}

        async def one(i: int) -> None:
            stream = rng.random() < 0.8
            plan = rng.choice(["complete", "after-send", "after-headers", "mid-stream"])
            http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(f"req {i}", stream=stream))
            if plan == "complete":
                raw = await http.read_all()
                assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
                if stream:
                    assert sse_payloads(raw)[-1] == b"[DONE]"
                outcomes["completed"] += 1
            else:
                if plan == "after-headers":
                    await http.read_until(b"\r\n\r\n")
                elif plan == "mid-stream":
                    await http.read_until(b'"content"')
                else:
                    await trio.sleep(rng.random() * 0.01)
                await http.hang_up()
                outcomes["hung_up"] += 1

        limiter = trio.CapacityLimiter(20)

        async def bounded(i: int) -> None:
            async with limiter:
                await one(i)

        async with trio.open_nursery() as clients:
            for i in range(200):
                clients.start_soon(bounded, i)
        await wait_until(
            lambda: not provider.scopes
            and hub.in_flight() == 0
            and provider.gate.sessions.active_requests == 0
            and provider.gate.limiter.open_reservations == 0
        )
        await wait_until(lambda: count_tasks() <= baseline_tasks)
        print(f"200 requests: {outcomes}; tasks {count_tasks()} (baseline {baseline_tasks})")
        assert outcomes["completed"] + outcomes["hung_up"] == 200
        assert outcomes["hung_up"] > 50
        assert len(provider.gate.sessions) == 1  # one client, one session
        # The echo agent saw every request it was given end: answered or cancelled.
        assert all(len(link.calls) == 0 for link in hub._links)
        running.shutdown.set()




async def test_connection_close_is_honoured_and_shutdown_does_not_wait_for_idle_clients() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"provider.graceful_timeout": 30}), agents=("echo",))
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await http.read_all()
        with trio.fail_after(5):
            assert await http.stream.receive_some(1) == b""  # the server closed, as asked
        client = openai_client(running)
        await in_thread(client.models.list)  # leaves an idle keep-alive connection open
        started = trio.current_time()
        running.shutdown.set()
    assert trio.current_time() - started < 5


async def test_provider_and_agent_reconnect_when_the_external_bridge_restarts() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bridge_url = f"ws://127.0.0.1:{port}"

    async def run_bridge(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        hub = BridgeHub(token=BRIDGE_TOKEN, default_model="cursor-agent-local")
        await serve_bridge(hub, "127.0.0.1", port, max_frame_bytes=1 << 20, task_status=task_status)

    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def first_bridge(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
            with first:
                await run_bridge(task_status=task_status)

        await nursery.start(first_bridge)
        nursery.start_soon(partial(run_agent, EchoAgent(tokens=2), bridge_url, BRIDGE_TOKEN, reconnect_delay=0.05))
        settings = make_settings(**{"mcp.embedded_bridge": False, "mcp.bridge_url": bridge_url, "mcp.reconnect_delay": 0.05, "mcp.reconnect_attempts": 100, "mcp.agent_wait_timeout": 10})
        running = await start_server(nursery, settings)
        bridge = running.provider.bridge
        await wait_until(lambda: bridge.agents())
        client = openai_client(running)
        assert (await in_thread(client.chat.completions.create, model="echo", messages=USER)).choices[0].message.content == "hello there"
        first.cancel()
        await wait_until(lambda: not bridge.agents())
        await nursery.start(run_bridge)
        await wait_until(lambda: bridge.agents())
        assert (await in_thread(client.chat.completions.create, model="echo", messages=USER)).choices[0].message.content == "hello there"
        running.shutdown.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("queue", ["for an agent", "for a slot"])
async def test_a_client_that_leaves_while_queued_leaves_the_queue(queue: str) -> None:
    """A queued request is watched too: its client leaving takes it out of the queue, and its
    agent never hears of it."""
    limits = {"mcp.queue_limit": 4} if queue == "for an agent" else {"performance.max_concurrent_requests": 1, "performance.queue_timeout": 60}
    settings = make_settings(**{"agents.echo.tokens": 1000, "agents.echo.delay_ms": 20, "agents.echo.max_concurrency": 1, **limits})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        provider, hub = running.provider, running.hub
        assert hub is not None

        def waiting() -> int:
            return hub.queued if queue == "for an agent" else provider.capacity.statistics().tasks_waiting

        busy = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await busy.read_until(b'"content"')
        queued = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(stream=False))
        await wait_until(lambda: waiting() == 1)
        await queued.hang_up()
        await wait_until(lambda: waiting() == 0, timeout=5)
        assert hub.in_flight() == 1 and len(provider.scopes) == 1  # only the busy stream
        # Its slot freed, nothing else starts: the queued request is gone for good.
        await busy.hang_up()
        await wait_until(lambda: hub.in_flight() == 0 and not provider.scopes)
        await trio.sleep(0.2)
        assert hub.in_flight() == 0 and not provider.scopes and waiting() == 0
        running.shutdown.set()


async def test_a_client_that_gives_up_waiting_for_an_agent_is_never_sent_to_one() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"mcp.agent_wait_timeout": 30}))
        hub = running.hub
        assert hub is not None
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(stream=False))
        await trio.sleep(0.3)  # waiting for an agent to connect
        await http.hang_up()
        await trio.sleep(0.3)
        agent = EchoAgent(tokens=1000, delay=30)
        nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        await wait_until(lambda: hub.agents())
        await trio.sleep(0.5)
        # It left while waiting: no request reached the agent, not even one cancelled at once.
        assert hub.in_flight() == 0 and agent.cancelled == [] and not running.provider.scopes
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_an_agent_that_leaves_ends_an_unstreamed_request_at_once() -> None:
    """An unstreamed request waits on its client, not on its reply channel: the agent leaving
    must still wake it (agent_disconnected now, not a timeout later)."""
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        hub = running.hub
        assert hub is not None
        agent_scope = trio.CancelScope()

        async def agent() -> None:
            with agent_scope:
                await run_agent(EchoAgent(tokens=1000, delay=30), running.bridge_url, BRIDGE_TOKEN)

        nursery.start_soon(agent)
        await wait_until(lambda: hub.agents())

        async def leave_when_busy() -> None:
            await wait_until(lambda: hub.in_flight() == 1)
            agent_scope.cancel()

        nursery.start_soon(leave_when_busy)
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(stream=False))
        with trio.fail_after(5):
            raw = await http.read_all()
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 5")
        assert json.loads(body)["error"]["code"] == "agent_disconnected"
        await wait_until(lambda: not running.provider.scopes)
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_a_full_queue_is_a_503_before_the_stream_starts() -> None:
    settings = make_settings(**{"agents.echo.tokens": 1000, "agents.echo.delay_ms": 20, "agents.echo.max_concurrency": 1, "mcp.queue_limit": 0})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        busy = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await busy.read_until(b'"content"')
        second = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        raw = await second.read_all()
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "overloaded"
        await busy.hang_up()
        await wait_until(lambda: not running.provider.scopes)
        running.shutdown.set()
