"""The openai agent end to end: a front trioprovider forwarding to a real OpenAI-compatible upstream
(a second trioprovider with an echo agent), on real sockets, with the official openai client."""

from __future__ import annotations

import json
import os
import socket
import sys
from functools import partial
from typing import Any

import openai
import pytest
import trio

from support import (
    API_KEY,
    BRIDGE_TOKEN,
    RawHTTP,
    chat_body,
    count_tasks,
    in_thread,
    make_settings,
    openai_client,
    sse_payloads,
    start_server,
    wait_until,
)
from trioprovider.agents.echo import EchoAgent, echo_text
from trioprovider.agents import upstream as upstream_module
from trioprovider.agents.runner import AgentStartError, AnswerStream, run_agent, serve_agent
from trioprovider.agents.upstream import ClientShards, UpstreamAgent
from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.streams import local_stream_pair
from trioprovider.config import ConfigError, Settings, load_settings
from trioprovider.events import DeltaEvent
from trioprovider.protocol import ModelInvoke, ModelResult
from trioprovider.scope import RequestScope
from trioprovider.server import Running

USER = [{"role": "user", "content": "hello there"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "read_file", "description": "Read a file", "parameters": {"type": "object", "properties": {"text": {}}}},
    }
]


async def start_upstream(nursery: trio.Nursery, agent: EchoAgent, **overrides: Any) -> Running:
    """The upstream: a trioprovider whose echo agent connects over its bridge (so the test holds it)."""
    running = await start_server(nursery, make_settings(**overrides))
    nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
    await wait_until(lambda: running.provider.bridge.agents())
    return running


def front_settings(upstream_url: str, **overrides: Any) -> Settings:
    return make_settings(**{"agents.openai.base_url": f"{upstream_url}/v1", "agents.openai.api_key": API_KEY, **overrides})


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_failure(group: BaseException) -> AgentStartError:
    """The AgentStartError inside the exception groups a failed start leaves."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    assert isinstance(group, AgentStartError), repr(group)
    return group


async def test_models_come_from_the_upstream_and_answers_pass_through() -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, EchoAgent(tokens=6))
        # Embedded through the config, as agents.embedded = ["openai"] in config.toml does.
        front = await start_server(nursery, front_settings(upstream.provider_url, **{"agents.embedded": ["openai"]}))
        client = openai_client(front)
        models = await in_thread(client.models.list)
        assert {m.id for m in models.data} == {"echo", "cursor-agent-local"}
        [agent] = front.provider.bridge.agents()
        assert agent.agent_id == "openai" and {card.id for card in agent.models} == {"echo", "cursor-agent-local"}

        answer = await in_thread(client.chat.completions.create, model="echo", messages=USER)
        direct = await in_thread(openai_client(upstream).chat.completions.create, model="echo", messages=USER)
        assert answer.choices[0].message.content == echo_text("hello there", 6)
        assert answer.choices[0].finish_reason == "stop"
        # The upstream's own count (6 tokens), not the front's estimate from characters.
        assert answer.usage is not None and direct.usage is not None
        assert answer.usage.completion_tokens == 6
        assert answer.usage.model_dump() == direct.usage.model_dump()

        def stream() -> tuple[list[str], Any]:
            pieces, usage = [], None
            for chunk in client.chat.completions.create(model="echo", messages=USER, stream=True, stream_options={"include_usage": True}):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                else:
                    usage = chunk.usage
            return pieces, usage

        pieces, usage = await in_thread(stream)
        assert "".join(pieces) == echo_text("hello there", 6)
        assert len([piece for piece in pieces if piece]) == 6  # one chunk per upstream token
        assert usage is not None and usage.completion_tokens == 6

        # Legacy completions go to the upstream's /v1/completions; max_tokens and the finish
        # reason travel both ways.
        completion = await in_thread(client.completions.create, model="echo", prompt="def f(x):", max_tokens=3)
        assert completion.choices[0].text == echo_text("def f(x):", 3)
        assert completion.choices[0].finish_reason == "length"

        # The front's default model reaches the upstream's first model.
        default = await in_thread(client.chat.completions.create, model="cursor-agent-local", messages=USER)
        assert default.choices[0].message.content == echo_text("hello there", 6)
        upstream.shutdown.set()
        front.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_tool_calls_pass_through_plain_and_streamed() -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, EchoAgent(tokens=4))
        front = await start_server(nursery, front_settings(upstream.provider_url), agents=("openai",))
        client = openai_client(front)

        answer = await in_thread(client.chat.completions.create, model="echo", messages=USER, tools=TOOLS)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls or []
        assert call.function.name == "read_file"
        assert json.loads(call.function.arguments) == {"text": "hello there"}

        def stream() -> tuple[dict[str, Any], str | None, int]:
            joined: dict[str, Any] = {"id": "", "name": "", "arguments": ""}
            finish, fragments = None, 0
            for chunk in client.chat.completions.create(model="echo", messages=USER, tools=TOOLS, stream=True):
                for fragment in chunk.choices[0].delta.tool_calls or ():
                    fragments += 1
                    assert fragment.index == 0
                    joined["id"] += fragment.id or ""
                    joined["name"] += (fragment.function and fragment.function.name) or ""
                    joined["arguments"] += (fragment.function and fragment.function.arguments) or ""
                finish = chunk.choices[0].finish_reason or finish
            return joined, finish, fragments

        joined, finish, fragments = await in_thread(stream)
        assert finish == "tool_calls" and fragments > 2  # it streamed in pieces
        assert joined["name"] == "read_file" and joined["id"].startswith("call_")
        assert json.loads(joined["arguments"]) == {"text": "hello there"}

        # The tool's result goes back up; the echo agent echoes it.
        follow_up = [
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [{"id": joined["id"], "type": "function", "function": {"name": "read_file", "arguments": joined["arguments"]}}]},
            {"role": "tool", "tool_call_id": joined["id"], "content": "file contents"},
        ]
        final = await in_thread(client.chat.completions.create, model="echo", messages=follow_up, tools=TOOLS)
        assert final.choices[0].message.content == echo_text("file contents", 4)
        upstream.shutdown.set()
        front.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_upstream_errors_keep_their_status_and_message() -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(
            nursery,
            EchoAgent(tokens=2),
            **{"provider.max_body_bytes": 400, "rate_limiting.requests_per_minute": 3, "rate_limiting.burst_allowance": 0},
        )
        # A request the upstream refuses as a client error stays a client error, in its words.
        front = await start_server(nursery, front_settings(upstream.provider_url), agents=("openai",))
        with pytest.raises(openai.BadRequestError) as bad:
            await in_thread(openai_client(front).chat.completions.create, model="echo", messages=[{"role": "user", "content": "x" * 500}])
        assert bad.value.body["code"] == "invalid_request"  # type: ignore[index]
        assert f"upstream {upstream.provider_url}/v1 answered HTTP 413: The request body is larger than 400 bytes." in bad.value.message

        # A key the upstream refuses is our configuration's fault: a 502 that says so, not a 401.
        wrong_key = await start_server(
            nursery, front_settings(upstream.provider_url, **{"agents.openai.api_key": "wrong", "agents.openai.models": ["echo"]}), agents=("openai",)
        )
        with pytest.raises(openai.APIStatusError) as refused:
            await in_thread(openai_client(wrong_key).chat.completions.create, model="echo", messages=USER)
        assert refused.value.status_code == 502
        assert refused.value.body["code"] == "upstream_unauthorized"  # type: ignore[index]
        assert "answered HTTP 401: Invalid or missing API key" in refused.value.message

        # A model the upstream does not have.
        unknown = await start_server(nursery, front_settings(upstream.provider_url, **{"agents.openai.models": ["no-such-model"]}), agents=("openai",))
        with pytest.raises(openai.APIStatusError) as missing:
            await in_thread(openai_client(unknown).chat.completions.create, model="no-such-model", messages=USER)
        assert missing.value.status_code == 502 and "answered HTTP 404" in missing.value.message

        # The upstream's rate limit (3 a minute) comes through as a 429.
        client = openai_client(front)
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(4):
                await in_thread(client.chat.completions.create, model="echo", messages=USER)
        assert limited.value.body["code"] == "rate_limited"  # type: ignore[index]
        assert "answered HTTP 429" in limited.value.message
        for running in (upstream, front, wrong_key, unknown):
            running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_an_upstream_failing_mid_stream_ends_the_stream_with_its_error() -> None:
    async with trio.open_nursery() as nursery:
        echo_scope = trio.CancelScope()
        agent = EchoAgent(tokens=1000, delay=0.02)

        async def echo_until_cancelled() -> None:
            with echo_scope:
                await run_agent(agent, upstream.bridge_url, BRIDGE_TOKEN, reconnect_delay=60)

        upstream = await start_server(nursery)
        nursery.start_soon(echo_until_cancelled)
        await wait_until(lambda: upstream.provider.bridge.agents())
        front = await start_server(nursery, front_settings(upstream.provider_url), agents=("openai",))
        http = await RawHTTP.post(front.provider_url, "/v1/chat/completions", chat_body(model="echo"))
        await http.read_until(b'"content":" there"')
        echo_scope.cancel()  # the upstream's agent goes away mid-answer
        payloads = sse_payloads(await http.read_all())
        assert payloads[-1] == b"[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "agent_disconnected"
        assert error["message"].startswith(f"upstream {upstream.provider_url}/v1 failed mid-answer: ")
        await wait_until(lambda: not front.provider.scopes and not upstream.provider.scopes)
        upstream.shutdown.set()
        front.shutdown.set()


async def test_refused_connection_timeout_and_malformed_sse_are_clear_errors() -> None:
    async with trio.open_nursery() as nursery:
        # Nothing listens there.
        url = f"http://127.0.0.1:{closed_port()}"
        refused = await start_server(nursery, front_settings(url, **{"agents.openai.models": ["m"]}), agents=("openai",))
        with pytest.raises(openai.APIStatusError) as unreachable:
            await in_thread(openai_client(refused).chat.completions.create, model="m", messages=USER)
        assert unreachable.value.status_code == 502
        assert unreachable.value.body["code"] == "upstream_unreachable"  # type: ignore[index]
        assert f"upstream {url}/v1: cannot connect" in unreachable.value.message

        # An upstream that thinks for longer than agents.openai.timeout.
        thinker = EchoAgent(tokens=2, delay=60)
        upstream = await start_upstream(nursery, thinker)
        slow = await start_server(nursery, front_settings(upstream.provider_url, **{"agents.openai.timeout": 0.5}), agents=("openai",))
        with pytest.raises(openai.APIStatusError) as timed_out:
            await in_thread(openai_client(slow).chat.completions.create, model="echo", messages=USER)
        assert timed_out.value.status_code == 504
        assert "stayed silent longer than the timeout" in timed_out.value.message
        # Giving up closed the upstream request: the upstream's agent was told to stop.
        with trio.fail_after(5):
            await thinker.cancel_arrived.wait()

        # An upstream whose stream is not SSE of OpenAI chunks.
        port = await nursery.start(fake_upstream, b"data: {not json\n\n")
        garbled = await start_server(nursery, front_settings(f"http://127.0.0.1:{port}", **{"agents.openai.models": ["m"]}), agents=("openai",))
        with pytest.raises(openai.APIStatusError) as malformed:
            await in_thread(openai_client(garbled).chat.completions.create, model="m", messages=USER)
        assert malformed.value.status_code == 502
        assert malformed.value.body["code"] == "upstream_bad_response"  # type: ignore[index]
        assert "sent a malformed answer: not an OpenAI chunk: {not json" in malformed.value.message

        # A web server that is not an OpenAI API (a wrong base URL).
        port = await nursery.start(fake_upstream, b"<html>Welcome</html>", "text/html; charset=utf-8")
        web_page = await start_server(nursery, front_settings(f"http://127.0.0.1:{port}", **{"agents.openai.models": ["m"]}), agents=("openai",))
        with pytest.raises(openai.APIStatusError) as html:
            await in_thread(openai_client(web_page).chat.completions.create, model="m", messages=USER)
        assert html.value.body["code"] == "upstream_bad_response"  # type: ignore[index]
        assert "a web page (text/html; charset=utf-8), not an event stream; is the base URL right?" in html.value.message
        for running in (refused, upstream, slow, garbled, web_page):
            running.shutdown.set()
        nursery.cancel_scope.cancel()


async def fake_upstream(body: bytes, content_type: str = "text/event-stream", task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A server that answers every request with a 200 and ``body``, then hangs up."""

    async def answer(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(65536)
        # Read the whole request: closing with unread bytes would reset the connection.
        head, _, body_so_far = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(body_so_far) < length:
            body_so_far += await stream.receive_some(65536)
        await stream.send_all(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n".encode() + body)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def test_an_upstream_that_streams_an_unstreamed_request_still_answers_whole() -> None:
    # Asked for the answer whole, some servers stream anyway: the chunks are joined.
    records = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    ]
    sse = b"".join(b"data: " + json.dumps(record).encode() + b"\n\n" for record in records) + b"data: [DONE]\n\n"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake_upstream, sse)
        front = await start_server(nursery, front_settings(f"http://127.0.0.1:{port}", **{"agents.openai.models": ["m"]}), agents=("openai",))
        answer = await in_thread(openai_client(front).chat.completions.create, model="m", messages=USER)
        assert answer.choices[0].message.content == "Hello"
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.total_tokens == 5
        front.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_a_client_cancel_closes_the_upstream_stream_and_leaves_nothing_behind() -> None:
    async with trio.open_nursery() as nursery:
        agent = EchoAgent(tokens=1000, delay=0.05)
        upstream = await start_upstream(nursery, agent)
        front = await start_server(nursery, front_settings(upstream.provider_url), agents=("openai",))
        up_hub, front_hub = upstream.hub, front.hub
        assert up_hub is not None and front_hub is not None
        # Warm up once so lazily created long-lived tasks exist before the baseline is taken.
        warm = await RawHTTP.post(front.provider_url, "/v1/chat/completions", chat_body(max_tokens=2))
        await warm.read_all()
        await wait_until(lambda: not front.provider.scopes and not upstream.provider.scopes)
        baseline = count_tasks()

        http = await RawHTTP.post(front.provider_url, "/v1/chat/completions", chat_body())
        await http.read_until(b'"content":" there"')
        hung_up = await http.hang_up()
        # front: model_cancel -> the openai agent leaves client.stream() -> the upstream sees its
        # client go -> its model_cancel reaches the echo agent.
        with trio.fail_after(5):
            await agent.cancel_arrived.wait()
        print(f"client hang-up -> upstream agent cancelled in {(agent.cancelled[0][1] - hung_up) * 1000:.1f} ms")
        await wait_until(
            lambda: not front.provider.scopes
            and not upstream.provider.scopes
            and front_hub.in_flight() == 0
            and up_hub.in_flight() == 0
            and front.provider.gate.sessions.active_requests == 0
            and upstream.provider.gate.sessions.active_requests == 0
        )
        await wait_until(lambda: count_tasks() <= baseline)
        assert len(agent.cancelled) == 1
        upstream.shutdown.set()
        front.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_an_unreachable_upstream_without_models_stops_start_up_saying_why() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await start_server(nursery, front_settings(url), agents=("openai",))
    message = str(start_failure(raised.value))
    assert message.startswith(f"agent openai: cannot list the upstream's models at {url}/v1/models: cannot connect")
    assert "--model" in message

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, EchoAgent(tokens=2))
        with pytest.raises(BaseExceptionGroup) as refused:
            async with trio.open_nursery() as inner:
                await start_server(inner, front_settings(upstream.provider_url, **{"agents.openai.api_key": "wrong"}), agents=("openai",))
        assert "got HTTP 401: Invalid or missing API key" in str(start_failure(refused.value))
        upstream.shutdown.set()
        nursery.cancel_scope.cancel()


def test_config_section_and_environment() -> None:
    settings = load_settings(env={"LOCAL_PROVIDER_UPSTREAM_BASE_URL": "http://127.0.0.1:11434/v1", "LOCAL_PROVIDER_UPSTREAM_API_KEY": "sk-up"})
    upstream = settings.agents.openai
    assert (upstream.base_url, upstream.api_key, upstream.models, upstream.timeout) == ("http://127.0.0.1:11434/v1", "sk-up", [], 300.0)
    with pytest.raises(ConfigError, match=r"^agents.openai.base_url \(command line\): must be http\(s\)://"):
        load_settings(env={}, overrides={"agents.openai.base_url": "ftp://x"})
    with pytest.raises(ConfigError, match=r"^agents.openai.timeout \(command line\): "):
        load_settings(env={}, overrides={"agents.openai.timeout": 0})


ENV = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_PROVIDER_")}


async def test_standalone_agent_process_serves_through_the_bridge(tmp_path: Any) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, EchoAgent(tokens=3))
        front = await start_server(nursery)
        env = {**ENV, "LOCAL_PROVIDER_BRIDGE_URL": front.bridge_url, "LOCAL_PROVIDER_BRIDGE_TOKEN": BRIDGE_TOKEN, "LOCAL_PROVIDER_UPSTREAM_API_KEY": API_KEY}
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "trioprovider", "agent", "openai", "--base-url", upstream.provider_url, "--model", "echo"],
                cwd=str(tmp_path),
                env=env,
                check=False,
            )
        )
        await wait_until(lambda: front.provider.bridge.agents(), timeout=30)
        [agent] = front.provider.bridge.agents()
        assert agent.agent_id == "openai" and [card.id for card in agent.models] == ["echo"]
        answer = await in_thread(openai_client(front).chat.completions.create, model="echo", messages=USER)
        assert answer.choices[0].message.content == echo_text("hello there", 3)
        process.terminate()
        upstream.shutdown.set()
        front.shutdown.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["agent", "openai", "--token", "t"], {}, "agents.openai.base_url is not set"),
        (["agent", "openai", "--token", "t", "--base-url", "http://127.0.0.1:{port}/v1"], {}, "agent openai: cannot list the upstream's models at http://127.0.0.1:{port}/v1/models: cannot connect"),
        (
            ["--agent", "openai", "--port", "0", "--bridge-url", "ws://127.0.0.1:0", "--log-level", "WARNING"],
            {"LOCAL_PROVIDER_UPSTREAM_BASE_URL": "http://127.0.0.1:{port}"},
            "agent openai: cannot list the upstream's models at http://127.0.0.1:{port}/v1/models: cannot connect",
        ),
    ],
)
async def test_commands_that_cannot_start_the_agent_say_why_in_one_line(tmp_path: Any, argv: list[str], env: dict[str, str], says: str) -> None:
    port = closed_port()
    result = await trio.run_process(
        [sys.executable, "-m", "trioprovider", *(arg.format(port=port) for arg in argv)],
        cwd=str(tmp_path),
        env={**ENV, **{k: v.format(port=port) for k, v in env.items()}},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.startswith("trioprovider: " + says.format(port=port)), stderr
    assert stderr.strip().count("\n") == 0, stderr


def test_agent_flags_land_in_the_named_agents_section() -> None:
    from trioprovider.cli import _overrides, _parser

    def overrides(*argv: str) -> dict[str, Any]:
        return _overrides(_parser().parse_args(["agent", *argv]))

    assert overrides("openai", "--base-url", "http://h:1/v1", "--api-key", "k", "--model", "a", "--model", "b", "--models", "c,d", "--timeout", "9", "--max-concurrency", "3") == {
        "agents.openai.base_url": "http://h:1/v1",
        "agents.openai.api_key": "k",
        "agents.openai.models": ["c", "d", "a", "b"],
        "agents.openai.timeout": 9.0,
        "agents.openai.max_concurrency": 3,
    }
    # cursor-cli's --model is the one Cursor model for the default model (the last one given).
    assert overrides("cursor-cli", "--model", "sonnet-4", "--models", "a,b") == {
        "agents.cursor_cli.model": "sonnet-4",
        "agents.cursor_cli.models": ["a", "b"],
    }
    assert overrides("echo", "--models", "x", "--max-concurrency", "2") == {"agents.echo.models": ["x"], "agents.echo.max_concurrency": 2}


class RecordingEcho(EchoAgent):
    """An echo agent that remembers whether each request reached it streamed."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.streamed: list[bool] = []

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        self.streamed.append(invoke.stream)
        return await super().answer(invoke, out)


async def test_an_unstreamed_answer_longer_than_the_first_reply_deadline_arrives_whole() -> None:
    # The upstream takes ~1.5 s to answer in full; the front's first-reply deadline is 0.5 s. The
    # agent asks the upstream for the answer whole, as the client did, and tells the provider at
    # once that the request is in the upstream's hands, so that deadline does not cut it.
    async with trio.open_nursery() as nursery:
        agent = RecordingEcho(tokens=30, delay=0.05)
        upstream = await start_upstream(nursery, agent)
        front = await start_server(nursery, front_settings(upstream.provider_url, **{"performance.request_timeout": 0.5}), agents=("openai",))
        answer = await in_thread(openai_client(front).chat.completions.create, model="echo", messages=USER)
        assert answer.choices[0].message.content == echo_text("hello there", 30)
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens == 30
        assert agent.streamed == [False]
        front.shutdown.set()
        upstream.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_a_client_leaving_an_unstreamed_request_closes_the_upstream_request() -> None:
    async with trio.open_nursery() as nursery:
        agent = RecordingEcho(tokens=1000, delay=0.05)
        upstream = await start_upstream(nursery, agent)
        front = await start_server(nursery, front_settings(upstream.provider_url), agents=("openai",))
        http = await RawHTTP.post(front.provider_url, "/v1/chat/completions", chat_body(stream=False))
        await wait_until(lambda: upstream.provider.scopes)
        await http.hang_up()
        # front: model_cancel -> the openai agent closes its upstream request -> the upstream's
        # echo agent is told to stop, long before its 50 s answer would be done.
        with trio.fail_after(5):
            await agent.cancel_arrived.wait()
        assert agent.streamed == [False]
        await wait_until(lambda: not front.provider.scopes and not upstream.provider.scopes)
        front.shutdown.set()
        upstream.shutdown.set()
        nursery.cancel_scope.cancel()


def test_client_shards_fill_the_first_client_with_room_and_make_more_only_when_all_are_full() -> None:
    made: list[str] = []

    def make() -> str:
        made.append(f"client-{len(made)}")
        return made[-1]

    shards = ClientShards(make, per_client=2)
    assert [shards.take() for _ in range(5)] == [0, 0, 1, 1, 2]
    assert shards.clients == made == ["client-0", "client-1", "client-2"]
    shards.give_back(0)
    assert shards.take() == 0  # room again in the first: no new client
    shards.give_back(1)
    shards.give_back(1)
    assert shards.take() == 1 and len(made) == 3


async def test_requests_at_once_spread_over_small_connection_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore's pool checks each of its connections whenever a request starts or ends: the
    agent keeps its pools small, and every request still gets its whole answer."""
    monkeypatch.setattr(upstream_module, "CONNECTIONS_PER_CLIENT", 3)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, EchoAgent(tokens=4, delay=0.2, max_concurrency=16))
        agent = UpstreamAgent(base_url=f"{upstream.provider_url}/v1", api_key=API_KEY, max_concurrency=16)
        async with agent.running():
            hub = BridgeHub(token=BRIDGE_TOKEN, default_model="d")
            hub_end, agent_end = local_stream_pair()
            nursery.start_soon(hub.accept, hub_end)
            nursery.start_soon(serve_agent, agent, agent_end, BRIDGE_TOKEN)
            await hub.wait_for_agents(5)
            answers: dict[int, str] = {}

            async def ask(number: int) -> None:
                invoke = ModelInvoke(id=f"r{number}", session_id="s", model="echo", messages=USER, stream=number % 2 == 0)
                events = await RequestScope(hub, invoke, prompt_tokens=1).run_to_end()
                answers[number] = "".join(e.delta.content or "" for e in events if isinstance(e, DeltaEvent))

            async with trio.open_nursery() as asking:
                for number in range(7):
                    asking.start_soon(ask, number)
                await wait_until(lambda: len(upstream.provider.scopes) == 7)
                shards = agent._clients
                assert shards is not None and len(shards.clients) == 3
                assert shards._busy == [3, 3, 1]
            assert answers == {number: echo_text("hello there", 4) for number in range(7)}
            assert shards._busy == [0, 0, 0]
        upstream.shutdown.set()
        nursery.cancel_scope.cancel()
