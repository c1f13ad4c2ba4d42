"""The Cursor IDE agent (``agent mcp``): the pure request board, the agent on a mock clock, and
the real MCP stdio server driven by the official ``mcp`` client against a live provider."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
import trio.testing
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from support import API_KEY, BRIDGE_TOKEN, RawHTTP, chat_body, make_settings, start_server
from trioprovider.agents.board import Ending, RequestBoard, render_request
from trioprovider.agents.ide import IdeAgent, Refusal
from trioprovider.agents.mcp_stdio import TOOL_NAMES
from trioprovider.agents.runner import run_agent, serve_agent
from trioprovider.bridge.streams import LocalMessageStream, local_stream_pair
from trioprovider.protocol import (
    AgentHello,
    HelloAck,
    ModelCancel,
    ModelError,
    ModelInvoke,
    ModelResult,
    ModelStreamChunk,
)

ROOT = Path(__file__).parent.parent


def chat(request_id: str, text: str = "hello", **extra: Any) -> ModelInvoke:
    return ModelInvoke(id=request_id, session_id="s", model="cursor-ide", messages=[{"role": "user", "content": text}], **extra)


# -- the board (pure) ------------------------------------------------------------------------


def test_board_hands_out_requests_oldest_first_and_tracks_them() -> None:
    board = RequestBoard(pickup_timeout=10)
    board.post(chat("r1"), now=0)
    board.post(chat("r2"), now=1)
    assert board.refusal("r1") == "request r1 has not been picked up yet: call wait_for_request first"
    first = board.take(now=2)
    assert first is not None and first.request_id == "r1" and first.pickup_deadline == 10
    assert board.refusal("r1") is None
    second = board.take(now=3)
    assert second is not None and second.request_id == "r2"
    assert board.take(now=3) is None
    assert board.end("r1", Ending.SUBMITTED) is None
    assert "already finished (submitted)" in (board.refusal("r1") or "")
    assert "already finished" in (board.end("r1", Ending.FAILED) or "")
    assert "there is no request 'r9'" in (board.refusal("r9") or "")


def test_board_expires_what_nobody_took_in_time() -> None:
    board = RequestBoard(pickup_timeout=10)
    board.post(chat("late"), now=0)
    board.post(chat("fresh"), now=5)
    taken = board.take(now=10)  # "late" is due exactly now: too late
    assert taken is not None and taken.request_id == "fresh"
    assert board.ended["late"] is Ending.EXPIRED
    assert "expired: nobody picked it up within 10 s" in (board.refusal("late") or "")
    # The answer task, at its deadline, learns the same from either path.
    assert board.expire_unclaimed("late")
    assert not board.expire_unclaimed("fresh")
    board.post(chat("other"), now=20)
    assert board.expire_unclaimed("other") and board.take(now=21) is None


def test_board_calls_whatever_ended_without_submit_or_fail_cancelled() -> None:
    board = RequestBoard(pickup_timeout=10, ended_memory=2)
    board.post(chat("pending"), now=0)
    board.post(chat("working"), now=0)
    board.take(now=1)
    board.take(now=1)
    board.end("working", Ending.SUBMITTED)
    board.abandon("working")  # its task ends after the submit: nothing changes
    assert board.ended["working"] is Ending.SUBMITTED
    board.post(chat("gone"), now=2)
    board.abandon("gone")
    assert "was cancelled" in (board.refusal("gone") or "")
    assert "stop working on it" in (board.refusal("gone") or "")
    # Memory is bounded: the oldest endings are forgotten.
    assert list(board.ended) == ["working", "gone"]
    board.abandon("pending")
    assert list(board.ended) == ["gone", "pending"]
    board.post(chat("r"), now=3)
    with pytest.raises(ValueError, match="already on the board"):
        board.post(chat("r"), now=3)


def test_render_chat_request_readably() -> None:
    invoke = ModelInvoke(
        id="req-1",
        session_id="s",
        model="cursor-ide",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": {"x": "2+2"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"},
        ],
        max_tokens=100,
        temperature=0.2,
        stop=["\n\n"],
    )
    rendered = render_request(invoke)
    assert rendered["status"] == "request" and rendered["request_id"] == "req-1"
    assert rendered["model"] == "cursor-ide" and rendered["kind"] == "chat"
    assert rendered["conversation"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "calc", "arguments": '{"x": "2+2"}'}]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ]
    assert rendered["parameters"] == {"max_tokens": 100, "temperature": 0.2, "stop": ["\n\n"], "stream": True}
    assert "submit_response" in rendered["how_to_answer"]
    json.dumps(rendered)  # it is what the tool returns


def test_render_fill_in_the_middle_request() -> None:
    invoke = ModelInvoke(id="fim", session_id="s", model="m", kind="completion", prompt="def f(", suffix="\n    return x", stream=False)
    rendered = render_request(invoke)
    assert rendered["prompt"] == "def f(" and rendered["suffix"] == "\n    return x"
    assert "conversation" not in rendered
    assert rendered["parameters"] == {"stream": False}
    assert "between prompt and suffix" in rendered["how_to_answer"]


# -- the agent, in process, on a mock clock ---------------------------------------------------


@asynccontextmanager
async def serving(agent: IdeAgent) -> AsyncIterator[LocalMessageStream]:
    """``agent`` served over an in-process bridge stream; yields the provider's end."""
    provider, agent_end = local_stream_pair("provider", "agent")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_agent, agent, agent_end, "token")
        assert isinstance(await provider.receive(), AgentHello)
        await provider.send(HelloAck(id="ack"))
        yield provider
        nursery.cancel_scope.cancel()


async def test_pickup_answer_and_usage(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent(pickup_timeout=10)
    async with serving(agent) as provider:
        await provider.send(chat("r1", "say hi"))
        request = await agent.wait_for_request(5)
        assert request["request_id"] == "r1" and request["conversation"][0]["content"] == "say hi"
        # At once, an empty chunk: the provider's first-token deadline is met.
        ack = await provider.receive()
        assert isinstance(ack, ModelStreamChunk) and ack.chunk.delta.content is None
        assert await agent.send_chunk("r1", "Hi") == {"status": "sent", "request_id": "r1", "chars": 2}
        assert await agent.submit_response("r1", " there") == {"status": "submitted", "request_id": "r1"}
        chunks = [await provider.receive(), await provider.receive()]
        assert [c.chunk.delta.content for c in chunks if isinstance(c, ModelStreamChunk)] == ["Hi", " there"]
        result = await provider.receive()
        assert isinstance(result, ModelResult) and result.id == "r1"
        assert result.choices == [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}]
        assert result.usage is not None and result.usage.completion_tokens == 2
        with pytest.raises(Refusal, match="already finished"):
            await agent.send_chunk("r1", "more")


async def test_idle_after_the_wait_with_progress(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent(progress_interval=5)
    reports: list[tuple[float, float, str]] = []

    async def progress(waited: float, total: float, message: str) -> None:
        reports.append((waited, total, message))

    started = trio.current_time()
    assert await agent.wait_for_request(24, progress) == {"status": "idle", "waited_s": 24.0}
    assert trio.current_time() - started == pytest.approx(24)
    assert [round(r[0]) for r in reports] == [5, 10, 15, 20, 24] and all(r[1] == 24 for r in reports)
    assert reports[0][2] == "waiting for a request (5 of 24 s)"
    # A short wait still reports a few times.
    reports.clear()
    await agent.wait_for_request(2, progress)
    assert [r[0] for r in reports] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # Longer than Cursor allows a tool call: capped.
    started = trio.current_time()
    assert (await agent.wait_for_request(3600))["status"] == "idle"
    assert trio.current_time() - started == pytest.approx(50)


async def test_a_waiting_call_wakes_when_a_request_arrives(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent(pickup_timeout=30)
    async with serving(agent) as provider:
        async with trio.open_nursery() as nursery:
            got: list[dict[str, Any]] = []

            async def wait() -> None:
                got.append(await agent.wait_for_request(25))

            nursery.start_soon(wait)
            await trio.sleep(7)
            await provider.send(chat("r1"))
        assert got[0]["request_id"] == "r1"
        assert trio.current_time() < 8


async def test_unclaimed_request_expires_with_a_model_error(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent(pickup_timeout=3)
    async with serving(agent) as provider:
        await provider.send(chat("r1"))
        error = await provider.receive()
        assert isinstance(error, ModelError) and error.code == "pickup_timeout" and error.retryable
        assert "did not pick up the request within 3 s" in error.message
        assert trio.current_time() == pytest.approx(3)
        assert (await agent.wait_for_request(1))["status"] == "idle"
        with pytest.raises(Refusal, match="expired"):
            await agent.submit_response("r1", "too late")


async def test_cancelled_request_refuses_the_next_tool_call(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent(pickup_timeout=3)
    async with serving(agent) as provider:
        await provider.send(chat("r1"))
        await agent.wait_for_request(1)
        await provider.receive()  # the pickup acknowledgement
        await provider.send(ModelCancel(id="r1"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Refusal, match="r1 was cancelled"):
            await agent.send_chunk("r1", "x")
        with pytest.raises(Refusal, match="r1 was cancelled"):
            await agent.fail_request("r1", "x")
        # A cancel while still pending: no one will be handed it.
        await provider.send(chat("r2"))
        await trio.testing.wait_all_tasks_blocked()
        await provider.send(ModelCancel(id="r2"))
        await trio.testing.wait_all_tasks_blocked()
        assert (await agent.wait_for_request(1))["status"] == "idle"


async def test_a_tool_call_blocked_by_a_slow_client_learns_of_the_cancel(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent()
    async with serving(agent) as provider:
        await provider.send(chat("r1"))
        await agent.wait_for_request(1)
        # Nobody reads the provider's end: the bridge buffer, then the reply buffer, fill up.
        async with trio.open_nursery() as nursery:

            async def cancel_once_blocked() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await provider.send(ModelCancel(id="r1"))

            nursery.start_soon(cancel_once_blocked)
            sent = 0
            with pytest.raises(Refusal, match="r1 was cancelled"):
                while True:
                    await agent.send_chunk("r1", "word ")
                    sent += 1
        assert sent >= 16  # it was blocked, not refused at once


async def test_fail_request_ends_with_a_model_error(autojump_clock: trio.testing.MockClock) -> None:
    agent = IdeAgent()
    async with serving(agent) as provider:
        await provider.send(chat("r1"))
        await agent.wait_for_request(1)
        await provider.receive()
        assert (await agent.fail_request("r1", "I cannot see that file"))["status"] == "failed"
        error = await provider.receive()
        assert isinstance(error, ModelError) and error.code == "ide_agent_failed"
        assert error.message == "the Cursor IDE agent failed the request: I cannot see that file"


async def test_a_picked_up_request_outlives_the_first_token_deadline() -> None:
    """The IDE agent thinks for longer than performance.request_timeout before its first word:
    the pickup counts as the agent's first reply, so the answer still arrives."""
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"performance.request_timeout": 0.5}))
        agent = IdeAgent(pickup_timeout=30)
        nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN))
        await wait_for_agent(running)
        client = openai.AsyncOpenAI(base_url=f"{running.provider_url}/v1", api_key=API_KEY, max_retries=0)
        async with trio.open_nursery() as requests:
            answers: list[Any] = []

            async def ask() -> None:
                answers.append(await client.chat.completions.create(model="cursor-ide", messages=[{"role": "user", "content": "think"}]))

            requests.start_soon(ask)
            request = await agent.wait_for_request(10)
            await trio.sleep(1.5)  # thinking, three times the first-token deadline
            await agent.submit_response(request["request_id"], "Thought it through.")
        assert answers[0].choices[0].message.content == "Thought it through."
        assert answers[0].usage.completion_tokens == 5
        await client.close()
        running.shutdown.set()
        nursery.cancel_scope.cancel()


# -- the real thing: `python -m trioprovider agent mcp` over stdio, a live provider ----------


@asynccontextmanager
async def mcp_agent(bridge_url: str, tmp_path: Path, *extra_args: str) -> AsyncIterator[ClientSession]:
    """Start the agent the way Cursor does and open an MCP session with it."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "trioprovider", "agent", "mcp", *extra_args],
        env={
            "PYTHONPATH": os.environ["PYTHONPATH"],
            "LOCAL_PROVIDER_BRIDGE_URL": bridge_url,
            "LOCAL_PROVIDER_BRIDGE_TOKEN": BRIDGE_TOKEN,
            "LOCAL_PROVIDER_LOG_LEVEL": "WARNING",
        },
        cwd=tmp_path,
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> tuple[bool, Any]:
    """(is_error, the JSON answer or the error text) of one tool call."""
    result = await session.call_tool(tool, arguments)
    text = "".join(part.text for part in result.content if part.type == "text")
    return bool(result.is_error), (text if result.is_error else json.loads(text))


async def wait_for_agent(running: Any, model: str = "cursor-ide") -> None:
    with trio.fail_after(30):
        while not any(card.id == model for agent in running.provider.bridge.agents() for card in agent.models):
            await trio.sleep(0.02)


async def test_tools_idle_and_a_streamed_chat_end_to_end(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings())
        async with mcp_agent(running.bridge_url, tmp_path) as session:
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert set(tools) == set(TOOL_NAMES)
            assert tools["wait_for_request"].input_schema["properties"]["timeout_s"]["default"] == 25.0
            assert set(tools["send_chunk"].input_schema["required"]) == {"request_id", "text"}

            reports: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                reports.append(progress)

            idle = await session.call_tool("wait_for_request", {"timeout_s": 1}, progress_callback=on_progress)
            assert not idle.is_error and json.loads(idle.content[0].text)["status"] == "idle"  # type: ignore[union-attr]
            # Progress notifications while it waited, increasing, up to the whole wait. (The
            # client runs each callback in a task of its own: let them all run first.)
            await trio.testing.wait_all_tasks_blocked()
            assert len(reports) == 4 and reports == sorted(reports) and reports[-1] >= 1

            await wait_for_agent(running)
            client = openai.AsyncOpenAI(base_url=f"{running.provider_url}/v1", api_key=API_KEY, max_retries=0)
            stream = await client.chat.completions.create(
                model="cursor-ide", messages=[{"role": "user", "content": "Say hello."}], stream=True
            )
            deltas = aiter(stream)
            is_error, request = await call(session, "wait_for_request", timeout_s=10)
            assert not is_error and request["status"] == "request"
            assert request["request_id"] == stream.response.headers["x-request-id"]
            assert request["kind"] == "chat" and request["model"] == "cursor-ide"
            assert request["conversation"] == [{"role": "user", "content": "Say hello."}]

            assert await call(session, "send_chunk", request_id=request["request_id"], text="Hello") == (
                False, {"status": "sent", "request_id": request["request_id"], "chars": 5},
            )
            # The client has the first part before the answer is submitted: it really streams.
            with trio.fail_after(10):
                first = await anext(deltas)
                while not first.choices[0].delta.content:
                    first = await anext(deltas)
            assert first.choices[0].delta.content == "Hello"
            await call(session, "send_chunk", request_id=request["request_id"], text=", world")
            assert (await call(session, "submit_response", request_id=request["request_id"], text="!"))[1]["status"] == "submitted"
            rest = [chunk async for chunk in deltas]
            assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices) == ", world!"
            assert rest[-1].choices[0].finish_reason == "stop"

            is_error, text = await call(session, "send_chunk", request_id=request["request_id"], text="more")
            assert is_error and "already finished" in text
            await client.close()
        running.shutdown.set()


async def test_cancelled_and_expired_requests_end_to_end(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings())
        async with mcp_agent(running.bridge_url, tmp_path, "--pickup-timeout", "2") as session:
            await wait_for_agent(running)

            # Cancelled: the client hangs up after the IDE agent picked the request up.
            http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body("long story", model="cursor-ide"))
            is_error, request = await call(session, "wait_for_request", timeout_s=10)
            assert not is_error
            assert (await call(session, "send_chunk", request_id=request["request_id"], text="Once"))[0] is False
            head = await http.read_until(b"Once")
            assert request["request_id"].encode() in head  # x-request-id
            await http.hang_up()
            # The cancel travels client -> provider -> bridge -> agent; until it lands, chunks
            # still go out. Within a few seconds the agent must say it was cancelled.
            with trio.fail_after(10):
                while True:
                    is_error, text = await call(session, "send_chunk", request_id=request["request_id"], text=" upon")
                    if is_error:
                        break
                    await trio.sleep(0.05)
            assert f"request {request['request_id']} was cancelled" in text

            # Expired: nobody calls wait_for_request within the pickup timeout.
            client = openai.AsyncOpenAI(base_url=f"{running.provider_url}/v1", api_key=API_KEY, max_retries=0)
            with trio.fail_after(20), pytest.raises(openai.APIStatusError) as failure:
                await client.chat.completions.create(model="cursor-ide", messages=[{"role": "user", "content": "anyone?"}])
            assert failure.value.status_code == 504
            body = failure.value.body
            assert isinstance(body, dict)
            assert body.get("code") == "pickup_timeout", body
            assert "did not pick up the request within 2 s" in body["message"]
            assert (await call(session, "wait_for_request", timeout_s=0))[1]["status"] == "idle"
            request_id = failure.value.response.headers["x-request-id"]
            is_error, text = await call(session, "submit_response", request_id=request_id, text="here!")
            assert is_error and "expired" in text
            await client.close()
        running.shutdown.set()


async def test_a_rejected_token_is_reported_by_the_next_wait(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings())
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "trioprovider", "agent", "mcp"],
            env={"PYTHONPATH": os.environ["PYTHONPATH"], "LOCAL_PROVIDER_BRIDGE_URL": running.bridge_url, "LOCAL_PROVIDER_BRIDGE_TOKEN": "wrong"},
            cwd=tmp_path,
        )
        with tempfile.TemporaryFile("w+") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                with trio.fail_after(30):
                    is_error, text = await call(session, "wait_for_request", timeout_s=25)
            errlog.seek(0)
            log = errlog.read()
        assert is_error
        assert re.search(r"the bridge at ws://\S+ rejected this agent: invalid bridge token", text), text
        assert "restart the trioprovider MCP server" in text
        assert "rejected this agent" in log  # and its log (stderr, shown by Cursor) says so too
        running.shutdown.set()


async def test_without_a_token_it_stops_at_once_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_PROVIDER_")}
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trioprovider", "agent", "mcp"], cwd=str(tmp_path), env=env,
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert done.returncode == 2
    assert done.stdout == b""  # stdout is the MCP channel: nothing else ever goes there
    assert done.stderr.decode().strip() == (
        "trioprovider: no bridge token: set LOCAL_PROVIDER_BRIDGE_TOKEN, pass --token, or run 'init'"
    )


def test_shipped_cursor_files_match_the_server() -> None:
    config = json.loads((ROOT / "docs" / "cursor" / "mcp.json").read_text())
    server = config["mcpServers"]["trioprovider"]
    assert server["args"][:4] == ["-m", "trioprovider", "agent", "mcp"]
    rule = (ROOT / ".cursor" / "rules" / "trioprovider-serve.mdc").read_text()
    front = rule.split("---")[1]
    assert "alwaysApply: false" in front and "description:" in front
    for name in TOOL_NAMES:
        assert name in rule
