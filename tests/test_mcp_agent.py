"""The Cursor IDE agent (``agent mcp``): the pure request board, and the agent on a mock clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trioprovider.agents.board import Ending, RequestBoard, render_request
from trioprovider.agents.ide import IdeAgent, Refusal
from trioprovider.agents.runner import serve_agent
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
