"""The bridge hub with real agents over in-memory transports, on Trio's MockClock.

Time-dependent behaviour (queues, liveness) runs on the autojump clock: a test that waits
"30 seconds" for a missed ping takes milliseconds, and the same way every time.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from trioprovider.agents.echo import EchoAgent, echo_text
from trioprovider.agents.runner import AgentRejected, serve_agent
from trioprovider.bridge.calls import REPLY_BUFFER, Call, CallTable, Delivery, NoAgent, Overloaded
from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.streams import PeerClosed, WebSocketMessageStream, local_stream_pair
from trioprovider.protocol import (
    AgentHello,
    HelloAck,
    HelloReject,
    ModelCard,
    ModelError,
    ModelInvoke,
    ModelResult,
    ModelStreamChunk,
)

TOKEN = "hub-token"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def invoke(request_id: str, text: str = "alpha beta", model: str = "echo", **extra: object) -> ModelInvoke:
    return ModelInvoke(id=request_id, session_id="s", model=model, messages=[{"role": "user", "content": text}], **extra)


def attach(nursery: trio.Nursery, hub: BridgeHub, agent: EchoAgent, token: str = TOKEN) -> None:
    hub_end, agent_end = local_stream_pair()
    nursery.start_soon(hub.accept, hub_end)
    nursery.start_soon(serve_agent, agent, agent_end, token)


async def collect(call) -> tuple[str, list]:  # type: ignore[no-untyped-def]
    text, replies = "", []
    async for reply in call:
        replies.append(reply)
        if isinstance(reply, ModelStreamChunk):
            text += reply.chunk.delta.content or ""
    return text, replies


async def test_requests_are_multiplexed_over_one_agent(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="default")
    agent = EchoAgent(tokens=6, delay=1.0)
    order: list[str] = []
    results: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        attach(nursery, hub, agent)
        assert await hub.wait_for_agents(1)

        async def run(request_id: str, text: str) -> None:
            call = await hub.start_call(invoke(request_id, text))
            got = ""
            async for reply in call:
                order.append(request_id)
                if isinstance(reply, ModelStreamChunk):
                    got += reply.chunk.delta.content or ""
            results[request_id] = got

        async with trio.open_nursery() as calls:
            calls.start_soon(run, "a", "one two")
            calls.start_soon(run, "b", "three")
        nursery.cancel_scope.cancel()
    assert results == {"a": echo_text("one two", 6), "b": echo_text("three", 6)}
    # Both answers were in flight at once: their replies alternate rather than run back to back.
    assert order[:4].count("a") == 2 and order[:4].count("b") == 2
    assert hub.in_flight() == 0


async def test_default_model_is_served_by_any_agent(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="cursor-agent-local")
    async with trio.open_nursery() as nursery:
        attach(nursery, hub, EchoAgent(tokens=2))
        await hub.wait_for_agents(1)
        text, replies = await collect(await hub.start_call(invoke("r", "x", model="cursor-agent-local")))
        assert text == "x x"
        assert isinstance(replies[-1], ModelResult)
        with pytest.raises(NoAgent):
            await hub.start_call(invoke("r2", model="no-such-model"))
        nursery.cancel_scope.cancel()


async def test_max_concurrency_queues_then_overloads(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="d", queue_limit=1)
    agent = EchoAgent(tokens=3, delay=1.0, max_concurrency=1)
    async with trio.open_nursery() as nursery:
        attach(nursery, hub, agent)
        await hub.wait_for_agents(1)
        first = await hub.start_call(invoke("a"))
        started: list[float] = []

        async def queued() -> None:
            call = await hub.start_call(invoke("b"))
            started.append(trio.current_time())
            await collect(call)

        async with trio.open_nursery() as calls:
            calls.start_soon(queued)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.queued == 1
            # The queue holds one; a third request fails fast instead of piling up.
            with pytest.raises(Overloaded):
                await hub.start_call(invoke("c"))
            t0 = trio.current_time()
            await collect(first)
        assert started and started[0] >= t0
        assert hub.queued == 0 and hub.in_flight() == 0
        nursery.cancel_scope.cancel()


async def test_cancel_reaches_the_agent_and_frees_the_slot(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="d")
    agent = EchoAgent(tokens=100, delay=1.0, max_concurrency=1)
    async with trio.open_nursery() as nursery:
        attach(nursery, hub, agent)
        await hub.wait_for_agents(1)
        call = await hub.start_call(invoke("a"))
        await call.__anext__()
        await call.cancel("client_disconnected")
        await agent.cancel_arrived.wait()
        assert [request_id for request_id, _ in agent.cancelled] == ["a"]
        assert hub.in_flight() == 0
        # The agent's only slot is free again at once.
        text, _ = await collect(await hub.start_call(invoke("b", max_tokens=2)))
        assert text == "alpha beta"
        nursery.cancel_scope.cancel()


async def test_a_request_not_streamed_gets_only_the_result(autojump_clock: trio.testing.MockClock) -> None:
    """No stream: the echo agent skips the chunks (nothing reaches the client before the end
    anyway) and puts the whole answer, text or tool call, in its model_result."""
    hub = BridgeHub(token=TOKEN, default_model="d")
    agent = EchoAgent(tokens=5, delay=0.5)
    tool = {"type": "function", "function": {"name": "read_file"}}
    async with trio.open_nursery() as nursery:
        attach(nursery, hub, agent)
        await hub.wait_for_agents(1)
        started = trio.current_time()
        _, [text] = await collect(await hub.start_call(invoke("a", "one two", stream=False)))
        assert isinstance(text, ModelResult)
        assert text.choices[0]["message"]["content"] == echo_text("one two", 5)
        assert text.usage is not None and text.usage.completion_tokens == 5
        assert trio.current_time() - started >= 5 * 0.5  # still paced, token by token
        _, [called] = await collect(await hub.start_call(invoke("b", "open it", stream=False, tools=[tool])))
        assert isinstance(called, ModelResult)
        [call] = called.choices[0]["message"]["tool_calls"]
        assert call["function"] == {"name": "read_file", "arguments": '{"text": "open it"}'}
        _, streamed = await collect(await hub.start_call(invoke("c", "one two")))
        assert [type(reply) for reply in streamed] == [ModelStreamChunk] * 5 + [ModelResult]
        nursery.cancel_scope.cancel()


async def test_a_requester_that_stops_reading_is_dropped_and_holds_up_nobody(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="d", stall_timeout=1.0)
    agent = EchoAgent(tokens=REPLY_BUFFER * 4)
    async with trio.open_nursery() as nursery:
        attach(nursery, hub, agent)
        await hub.wait_for_agents(1)
        await hub.start_call(invoke("stuck"))  # never read: its reply buffer fills
        await trio.sleep(0.5)  # full by now, and the stall timeout running
        started = trio.current_time()
        text, _ = await collect(await hub.start_call(invoke("other", max_tokens=3)))
        assert text == "alpha beta alpha"
        assert trio.current_time() - started < 0.1  # not held up by the stalled request
        await agent.cancel_arrived.wait()
        assert [request_id for request_id, _ in agent.cancelled] == ["stuck"]
        assert trio.current_time() >= 1.0  # dropped after the stall timeout
        assert hub.in_flight() == 0
        nursery.cancel_scope.cancel()


async def test_agent_that_disconnects_ends_its_requests_with_an_error(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="d")
    async with trio.open_nursery() as nursery:
        hub_end, agent_end = local_stream_pair()
        nursery.start_soon(hub.accept, hub_end)
        agent_scope = trio.CancelScope()

        async def doomed_agent() -> None:
            with agent_scope:
                await serve_agent(EchoAgent(tokens=100, delay=1.0), agent_end, TOKEN)
            await agent_end.aclose()

        nursery.start_soon(doomed_agent)
        await hub.wait_for_agents(1)
        call = await hub.start_call(invoke("a"))
        await call.__anext__()
        agent_scope.cancel()
        _, replies = await collect(call)
        assert isinstance(replies[-1], ModelError)
        assert replies[-1].code == "agent_disconnected"
        assert hub.agents() == [] and hub.in_flight() == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (AgentHello(id="h", protocol_version=1, agent_id="x", token="wrong", models=[ModelCard(id="m")]), "invalid bridge token"),
        (AgentHello(id="h", protocol_version=2, agent_id="x", token=TOKEN, models=[ModelCard(id="m")]), "protocol_version 2 is not supported"),
        (HelloAck(id="h"), "the first message must be agent_hello or provider_hello"),
    ],
)
async def test_bad_hellos_are_rejected_with_a_reason(hello: object, reason: str) -> None:
    hub = BridgeHub(token=TOKEN, default_model="d")
    hub_end, peer = local_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.accept, hub_end)
        await peer.send(hello)  # type: ignore[arg-type]
        reply = await peer.receive()
        assert isinstance(reply, HelloReject)
        assert reason in reply.reason
        with pytest.raises(PeerClosed):
            await peer.receive()
    assert hub.agents() == [] and hub.rejected_hellos == 1


async def test_agent_runner_reports_rejection() -> None:
    hub = BridgeHub(token=TOKEN, default_model="d")
    hub_end, agent_end = local_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.accept, hub_end)
        with pytest.raises(AgentRejected, match="invalid bridge token"):
            await serve_agent(EchoAgent(), agent_end, "wrong")


async def test_answers_to_requests_never_given_are_dropped(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="d")
    hub_end, rogue = local_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.accept, hub_end)
        await rogue.send(AgentHello(id="h", protocol_version=1, agent_id="rogue", token=TOKEN, models=[ModelCard(id="echo")], max_concurrency=2))
        assert isinstance(await rogue.receive(), HelloAck)
        call = await hub.start_call(invoke("real"))
        assert isinstance(await rogue.receive(), ModelInvoke)
        # Replies for an id it was not given go nowhere; the real request is untouched.
        await rogue.send(ModelResult(id="someone-else", choices=[]))
        await rogue.send(ModelError(id="someone-else", code="x", message="y"))
        await rogue.send(ModelResult(id="real", choices=[{"index": 0, "message": {"content": "ok"}}]))
        reply = await call.__anext__()
        assert isinstance(reply, ModelResult) and reply.id == "real"
        nursery.cancel_scope.cancel()


class Valve(trio.abc.Stream):
    """A stream that can be frozen: it then stops delivering bytes, like a hung peer process."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.frozen = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.frozen.is_set():
            await trio.sleep_forever()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_agent_that_stops_answering_pings_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    interval = 30.0
    hub = BridgeHub(token=TOKEN, default_model="d", heartbeat_interval=interval)
    server_stream, client_stream = trio.testing.memory_stream_pair()
    valve = Valve(client_stream)
    async with trio.open_nursery() as nursery:

        async def bridge_side() -> None:
            request = await trio_websocket.wrap_server_stream(nursery, server_stream)
            ws = await request.accept()
            await hub.accept(WebSocketMessageStream(ws))

        async def agent_side() -> None:
            ws = await trio_websocket.wrap_client_stream(nursery, valve, "127.0.0.1", "/")  # type: ignore[arg-type]
            await serve_agent(EchoAgent(tokens=1000, delay=1.0), WebSocketMessageStream(ws), TOKEN)

        nursery.start_soon(bridge_side)
        nursery.start_soon(agent_side)
        assert await hub.wait_for_agents(5)
        call = await hub.start_call(invoke("a"))
        await call.__anext__()
        frozen_at = trio.current_time()
        valve.frozen.set()
        _, replies = await collect(call)
        dropped_after = trio.current_time() - frozen_at
        assert isinstance(replies[-1], ModelError) and replies[-1].code == "agent_disconnected"
        # One interval to the next ping, at most one more waiting for its pong.
        assert dropped_after <= 2 * interval + 1
        assert hub.agents() == []
        nursery.cancel_scope.cancel()


async def test_a_call_hands_over_what_has_arrived_without_waiting() -> None:
    table = CallTable()
    cancelled: list[str] = []

    async def cancel(request_id: str, reason: str) -> None:
        cancelled.append(reason)

    call = table.open("a", cancel)
    assert call.ready() == []  # nothing yet: no wait, nothing taken
    chunks = [ModelStreamChunk(id="a", chunk={"delta": {"content": word}}) for word in ("x", "y")]
    for chunk in chunks:
        assert await table.deliver(chunk, 1.0) is Delivery.DELIVERED
    assert call.ready() == chunks
    result = ModelResult(id="a")
    await table.deliver(chunks[0], 1.0)
    await table.deliver(result, 1.0)
    assert await table.deliver(chunks[1], 1.0) is Delivery.UNKNOWN  # after the end: not in flight
    assert await call.receive_batch() == [chunks[0], result]
    assert call.finished and call.ready() == [] and await call.receive_batch() == []
    assert "a" not in table

    # The agent gone mid-answer (the table closed): the last reply says so.
    left = table.open("b", cancel)
    await table.deliver(ModelStreamChunk(id="b", chunk={"delta": {"content": "x"}}), 1.0)
    table.close_all()
    _, last = left.ready()
    assert isinstance(last, ModelError) and last.code == "agent_disconnected" and left.finished
    await left.cancel("client_disconnected")
    assert cancelled == []  # the answer had ended: nothing to cancel


async def test_delivery_without_a_wait_while_there_is_room() -> None:
    table = CallTable()

    async def cancel(request_id: str, reason: str) -> None:
        pass

    call = table.open("n", cancel)
    chunk = ModelStreamChunk(id="n", chunk={"delta": {"content": "x"}})
    assert table.deliver_nowait(ModelStreamChunk(id="other", chunk={})) is Delivery.UNKNOWN
    for _ in range(REPLY_BUFFER):
        assert table.deliver_nowait(chunk) is Delivery.DELIVERED
    assert table.deliver_nowait(chunk) is None  # full: the caller must wait for room
    assert len(call.ready()) == REPLY_BUFFER
    assert table.deliver_nowait(ModelResult(id="n")) is Delivery.DELIVERED
    assert "n" not in table  # the answer's end closes the call
    assert isinstance(call.ready()[-1], ModelResult) and call.finished


async def test_an_interrupt_ends_a_wait_for_replies_with_what_has_arrived() -> None:
    table = CallTable()

    async def cancel(request_id: str, reason: str) -> None:
        pass

    call = table.open("i", cancel)
    taken: list[list[Any]] = []
    async with trio.open_nursery() as nursery:

        async def wait_for_replies() -> None:
            taken.append(await call.receive_batch())

        nursery.start_soon(wait_for_replies)
        await trio.testing.wait_all_tasks_blocked()
        call.interrupt()  # a waiting requester: woken with nothing
    assert taken == [[]] and not call.finished
    # An interrupt before the wait ends the next one at once; it never hides a reply.
    call.interrupt()
    assert await call.receive_batch() == []
    chunk = ModelStreamChunk(id="i", chunk={"delta": {"content": "x"}})
    await table.deliver(chunk, 1.0)
    call.interrupt()
    assert await call.receive_batch() == [chunk]
    # Used up: the next wait is for a reply again.
    with trio.move_on_after(0.1) as waited:
        await call.receive_batch()
    assert waited.cancelled_caught
    # Pending when replies are taken without a wait: they go out, and the interrupt (a
    # heartbeat that is due) is dropped with them rather than ending the next wait.
    call.interrupt()
    await table.deliver(chunk, 1.0)
    assert call.ready() == [chunk]
    with trio.move_on_after(0.1) as waited:
        await call.receive_batch()
    assert waited.cancelled_caught


async def test_a_requester_waiting_for_a_reply_is_woken_by_it_or_by_the_agent_leaving() -> None:
    table = CallTable()

    async def cancel(request_id: str, reason: str) -> None:
        pass

    for agent_leaves in (False, True):
        call = table.open("w", cancel)
        woken: list[Any] = []

        async def wait_for_it(call: Call = call) -> None:
            woken.extend(await call.receive_batch())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            if agent_leaves:
                table.close_all()
            else:
                await table.deliver(ModelResult(id="w"), 1.0)
        assert len(woken) == 1 and call.finished
        assert isinstance(woken[0], ModelError if agent_leaves else ModelResult)


async def test_a_full_reply_buffer_holds_its_deliverer_until_the_requester_reads() -> None:
    table = CallTable()

    async def cancel(request_id: str, reason: str) -> None:
        pass

    call = table.open("f", cancel)
    chunk = ModelStreamChunk(id="f", chunk={"delta": {"content": "x"}})
    for _ in range(REPLY_BUFFER):
        await table.deliver(chunk, 1.0)
    outcome: list[Delivery] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _deliver_into(table, chunk, outcome))
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []  # waiting for room
        assert len(call.ready()) == REPLY_BUFFER
    assert outcome == [Delivery.DELIVERED] and call.ready() == [chunk]


async def test_a_call_let_go_from_elsewhere_frees_whoever_waits_on_it() -> None:
    table = CallTable()

    async def cancel(request_id: str, reason: str) -> None:
        pass

    # A requester waiting for a reply while its call is cancelled from another task.
    waiting = table.open("r", cancel)
    got: list[Any] = []

    async def read(call: Call = waiting) -> None:
        got.append(await call.receive_batch())

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await waiting.cancel("client_disconnected")
    assert got == [[]]

    # A deliverer waiting for room while the table lets the call go (its agent left).
    full = table.open("f", cancel)
    chunk = ModelStreamChunk(id="f", chunk={"delta": {"content": "x"}})
    for _ in range(REPLY_BUFFER):
        await table.deliver(chunk, 1.0)
    outcome: list[Delivery] = []
    with trio.fail_after(1):  # not the 10 s stall timeout
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_deliver_into, table, chunk, outcome)
            await trio.testing.wait_all_tasks_blocked()
            table.close_all()
    assert outcome == [Delivery.DELIVERED]
    assert len(full.ready()) == REPLY_BUFFER + 1  # what was there, then agent_disconnected


async def _deliver_into(table: CallTable, reply: Any, outcome: list[Delivery]) -> None:
    outcome.append(await table.deliver(reply, 10.0))


async def test_a_stopping_agent_finishes_its_answer_and_gets_no_new_requests(autojump_clock: trio.testing.MockClock) -> None:
    hub = BridgeHub(token=TOKEN, default_model="default")
    leaving, staying = EchoAgent(tokens=5, delay=1.0, agent_id="leaving"), EchoAgent(tokens=5, delay=1.0, agent_id="staying")
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        hub_end, agent_end = local_stream_pair()
        nursery.start_soon(hub.accept, hub_end)

        async def serve_leaving() -> None:
            try:
                await serve_agent(leaving, agent_end, TOKEN, stopping=stopping)
            finally:
                await agent_end.aclose()  # as run_agent closes its WebSocket

        nursery.start_soon(serve_leaving)
        assert await hub.wait_for_agents(1)
        attach(nursery, hub, staying)
        while len(hub.agents()) < 2:
            await trio.sleep(0.01)
        # One answer in flight on each: the next request could go to either, and goes to the first.
        first = await hub.start_call(invoke("first", "one two"))
        second = await hub.start_call(invoke("second"))
        stopping.set()
        refused = await collect(await hub.start_call(invoke("refused")))
        after = await collect(await hub.start_call(invoke("after", "three")))
        assert isinstance(refused[1][-1], ModelError) and refused[1][-1].code == "shutdown" and refused[1][-1].retryable
        # Once refused, the stopping agent is passed over: the next request goes to the other one.
        assert after[0] == echo_text("three", 5)
        # What the stopping agent had in hand still ends whole, and then it leaves.
        assert (await collect(first))[0] == echo_text("one two", 5)
        assert (await collect(second))[0] == echo_text("alpha beta", 5)
        while len(hub.agents()) > 1:
            await trio.sleep(0.01)
        assert [agent.agent_id for agent in hub.agents()] == ["staying"]
        nursery.cancel_scope.cancel()
