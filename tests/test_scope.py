"""RequestScope on Trio's MockClock, with the echo agent over in-memory streams: deadlines, the
session watchdog, heartbeats and release of the admission, deterministically."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioprovider.admission import Gate
from trioprovider.agents.echo import EchoAgent
from trioprovider.agents.runner import AnswerStream, serve_agent, text_choice, usage_of
from trioprovider.auth import Principal
from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.streams import local_stream_pair
from trioprovider.events import DeltaEvent, Event, Failed, Finished, Heartbeat
from trioprovider.protocol import Delta, ModelCard, ModelInvoke, ModelResult
from trioprovider.ratelimit import RateLimiter
from trioprovider.scope import CLIENT_STALL_TIMEOUT, Deadlines, RequestScope
from trioprovider.sessions import SessionStore

TOKEN = "t"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def gate() -> Gate:
    return Gate(
        SessionStore(ttl=300, max_idle=300, max_sessions=10),
        RateLimiter(requests_per_minute=60, tokens_per_minute=10_000, burst=10),
    )


async def run_scope(scope: RequestScope) -> list[Event]:
    events: list[Event] = []

    async def write(batch: list[Event]) -> None:
        assert batch  # never an empty write
        events.extend(batch)

    await scope.stream(write)
    return events


def invoke(request_id: str = "r") -> ModelInvoke:
    return ModelInvoke(id=request_id, session_id="s", model="echo", messages=[{"role": "user", "content": "a b"}])


async def with_agent(nursery: trio.Nursery, agent: EchoAgent) -> BridgeHub:
    hub = BridgeHub(token=TOKEN, default_model="d")
    hub_end, agent_end = local_stream_pair()
    nursery.start_soon(hub.accept, hub_end)
    nursery.start_soon(serve_agent, agent, agent_end, TOKEN)
    await hub.wait_for_agents(1)
    return hub


async def test_complete_answer_releases_the_admission(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, EchoAgent(tokens=3, delay=1))
        admission = g.admit(Principal("k", "c"), None, 500, trio.current_time())
        scope = RequestScope(hub, invoke(), prompt_tokens=4, admission=admission)
        events = await run_scope(scope)
        assert [type(e) for e in events] == [DeltaEvent, DeltaEvent, DeltaEvent, Finished]
        assert scope.outcome == "completed"
        assert admission.released and g.sessions.active_requests == 0
        assert g.limiter.open_reservations == 0
        assert not admission.session.watchers  # the scope stopped watching its session
        # The unused part of the 500 reserved tokens went back to the bucket.
        assert admission.reservation.used == events[-1].usage.total_tokens  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_first_token_deadline_ends_with_504_and_cancels_the_agent(autojump_clock: trio.testing.MockClock) -> None:
    agent = EchoAgent(tokens=3, delay=100)
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        scope = RequestScope(hub, invoke(), prompt_tokens=1, deadlines=Deadlines(first_event=5, total=60))
        start = trio.current_time()
        events = await run_scope(scope)
        assert trio.current_time() - start == pytest.approx(5, abs=0.01)
        assert len(events) == 1 and isinstance(events[0], Failed)
        assert events[0].error.status == 504 and "first token" in events[0].error.message
        assert scope.cancel_reason == "deadline"
        await agent.cancel_arrived.wait()
        assert hub.in_flight() == 0
        nursery.cancel_scope.cancel()


async def test_whole_answer_deadline_cuts_a_long_answer(autojump_clock: trio.testing.MockClock) -> None:
    agent = EchoAgent(tokens=100, delay=1)
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        scope = RequestScope(hub, invoke(), prompt_tokens=1, deadlines=Deadlines(first_event=5, total=10.5))
        events = await run_scope(scope)
        assert sum(isinstance(e, DeltaEvent) for e in events) == 10
        assert isinstance(events[-1], Failed) and "whole answer" in events[-1].error.message
        await agent.cancel_arrived.wait()
        nursery.cancel_scope.cancel()


async def test_revoking_the_session_ends_the_stream_and_cancels_the_agent(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    agent = EchoAgent(tokens=100, delay=1)
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        admission = g.admit(Principal("k", "c"), None, 10, trio.current_time())
        scope = RequestScope(hub, invoke(), prompt_tokens=1, admission=admission)

        async def revoke_later() -> None:
            await trio.sleep(3.5)
            assert g.sessions.revoke(admission.session.id)

        nursery.start_soon(revoke_later)
        events = await run_scope(scope)
        assert sum(isinstance(e, DeltaEvent) for e in events) == 3
        assert isinstance(events[-1], Failed) and events[-1].error.code == "session_revoked"
        await agent.cancel_arrived.wait()
        assert admission.released
        nursery.cancel_scope.cancel()


async def test_a_session_that_ended_before_the_answer_started_stops_it(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    agent = EchoAgent(tokens=100, delay=1)
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        admission = g.admit(Principal("k", "c"), None, 10, trio.current_time())
        g.sessions.purge(trio.current_time() + 301)  # past its TTL
        events = await run_scope(RequestScope(hub, invoke(), prompt_tokens=1, admission=admission))
        assert [type(e) for e in events] == [Failed]
        assert events[0].error.code == "session_expired"  # type: ignore[union-attr]
        assert admission.released and not admission.session.watchers
        nursery.cancel_scope.cancel()


async def test_heartbeats_while_the_agent_is_silent(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, EchoAgent(tokens=1, delay=50))
        scope = RequestScope(hub, invoke(), prompt_tokens=1, heartbeat_interval=15)
        events = await run_scope(scope)
        # Silent for 50 s: a heartbeat at 15, 30 and 45, then the answer.
        assert [type(e) for e in events] == [Heartbeat, Heartbeat, Heartbeat, DeltaEvent, Finished]
        nursery.cancel_scope.cancel()


async def test_no_heartbeat_while_the_agent_speaks_within_the_interval(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, EchoAgent(tokens=5, delay=14))
        scope = RequestScope(hub, invoke(), prompt_tokens=1, heartbeat_interval=15)
        stamped: list[tuple[type, float]] = []

        async def write(batch: list[Event]) -> None:
            stamped.extend((type(event), trio.current_time()) for event in batch)

        started = trio.current_time()
        await scope.stream(write)
        # A token every 14 s for 70 s: never 15 s of silence.
        assert [kind for kind, _ in stamped] == [DeltaEvent] * 5 + [Finished]
        assert stamped[-1][1] - started >= 70
        # Silent for 40 s before each of two tokens: heartbeats 15 and 30 s into each silence.
        hub2 = await with_agent(nursery, EchoAgent(tokens=2, delay=40))
        stamped.clear()
        await RequestScope(hub2, invoke("r2"), prompt_tokens=1, heartbeat_interval=15).stream(write)
        kinds = [kind for kind, _ in stamped]
        assert kinds == [Heartbeat, Heartbeat, DeltaEvent, Heartbeat, Heartbeat, DeltaEvent, Finished]
        times = [at - stamped[0][1] for _, at in stamped]
        assert times[:3] == [0, 15, 25] and times[3:5] == [40, 55]
        nursery.cancel_scope.cancel()


async def test_a_consumer_that_leaves_cancels_the_agent(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    agent = EchoAgent(tokens=100, delay=1)
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        admission = g.admit(Principal("k", "c"), None, 10, trio.current_time())
        scope = RequestScope(hub, invoke(), prompt_tokens=1, admission=admission)
        with trio.move_on_after(2.5):  # the client disconnects: its task is cancelled
            await run_scope(scope)
        await agent.cancel_arrived.wait()
        assert scope.outcome == "cancelled"
        assert hub.in_flight() == 0 and admission.released and g.limiter.open_reservations == 0
        nursery.cancel_scope.cancel()


async def test_no_agent_for_the_model_is_a_503_record(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, EchoAgent())
        bad = ModelInvoke(id="r", session_id="s", model="other", messages=[])
        events = await run_scope(RequestScope(hub, bad, prompt_tokens=1))
        assert isinstance(events[0], Failed) and events[0].error.status == 503
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ending", ["complete", "disconnect", "deadline"])
async def test_the_unused_reservation_goes_back_to_the_bucket(autojump_clock: trio.testing.MockClock, ending: str) -> None:
    # 60 tokens a minute (one a second): a 50-token reservation is plainly visible in the bucket.
    g = Gate(SessionStore(ttl=300, max_idle=300, max_sessions=10), RateLimiter(requests_per_minute=60, tokens_per_minute=60, burst=0))
    agent = EchoAgent(tokens=100 if ending != "complete" else 3, delay=1)

    def remaining() -> int:
        return int(g.limiter.headers("k@c", trio.current_time())["x-ratelimit-remaining-tokens"])

    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        admission = g.admit(Principal("k", "c"), None, 50, trio.current_time())
        assert remaining() == 10
        deadlines = Deadlines(total=2.5) if ending == "deadline" else Deadlines()
        scope = RequestScope(hub, invoke(), prompt_tokens=1, admission=admission, deadlines=deadlines)
        started = trio.current_time()
        with trio.move_on_after(2.5 if ending == "disconnect" else 60):
            await run_scope(scope)
        assert admission.released and g.limiter.open_reservations == 0
        used = admission.reservation.used
        assert 1 <= used <= 10  # the prompt and the few tokens streamed before the end
        elapsed = trio.current_time() - started
        # Refilled at one a second since admission, plus the 50 - used that were never spent.
        assert remaining() == min(60, int(10 + elapsed + 50 - used))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ending", ["deadline", "revoke"])
async def test_a_client_that_never_reads_is_let_go_after_a_deadline_or_revoke(autojump_clock: trio.testing.MockClock, ending: str) -> None:
    g = gate()
    agent = EchoAgent(tokens=10_000, delay=0.01)
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, agent)
        admission = g.admit(Principal("k", "c"), None, 10, trio.current_time())
        deadlines = Deadlines(total=2) if ending == "deadline" else Deadlines()
        scope = RequestScope(hub, invoke(), prompt_tokens=1, admission=admission, deadlines=deadlines)


        connection_dropped = trio.Event()

        async def never_written(batch: list[Event]) -> None:
            with trio.CancelScope(shield=True):  # as Hypercorn's socket writes: until the connection drops
                await connection_dropped.wait()

        nursery.start_soon(scope.stream, never_written)
        if ending == "revoke":
            await trio.sleep(2)
            g.sessions.revoke(admission.session.id)
        # Nobody reads: the first write never ends, and the stop's own terminal record
        # could not go out either.
        await trio.sleep(CLIENT_STALL_TIMEOUT * 1.25 + 1)
        assert admission.released and scope.outcome == "client_too_slow"
        assert g.limiter.open_reservations == 0 and g.sessions.active_requests == 0
        await agent.cancel_arrived.wait()
        connection_dropped.set()
        nursery.cancel_scope.cancel()


class AnnouncingAgent:
    """Says at once that it is answering (an empty chunk), then writes its answer 5 s later,
    as the openai agent does for an upstream asked for the answer whole."""

    agent_id = "announcing"
    models = [ModelCard(id="echo")]
    max_concurrency = 4

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        await out.send(Delta())
        await trio.sleep(5)
        await out.text("hi")
        return ModelResult(id=invoke.id, choices=[text_choice(invoke, "hi")], usage=usage_of(4, 1))


class ScriptedAgent:
    """Writes its words on a schedule: each after its pause (seconds) from the one before."""

    agent_id = "scripted"
    models = [ModelCard(id="echo")]
    max_concurrency = 4

    def __init__(self, *script: tuple[float, str]) -> None:
        self.script = script

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        for pause, word in self.script:
            if pause:
                await trio.sleep(pause)
            await out.text(word)
        text = "".join(word for _, word in self.script)
        return ModelResult(id=invoke.id, choices=[text_choice(invoke, text)], usage=usage_of(4, len(self.script)))


async def test_a_heartbeat_follows_soon_after_a_slow_write(autojump_clock: trio.testing.MockClock) -> None:
    """A write that outlasts the heartbeat interval (not the stall timeout) delays the
    heartbeat only until it ends, give or take a quarter interval."""
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, ScriptedAgent((0, "a"), (50, "b")))  # type: ignore[arg-type]
        stamped: list[tuple[type, float]] = []

        async def slow_first_write(batch: list[Event]) -> None:
            if not stamped:
                await trio.sleep(20)  # the client reads the first word slowly
            stamped.extend((type(event), trio.current_time()) for event in batch)

        started = trio.current_time()
        await RequestScope(hub, invoke(), prompt_tokens=1, heartbeat_interval=15).stream(slow_first_write)
        kinds = [kind for kind, _ in stamped]
        assert kinds == [DeltaEvent, Heartbeat, Heartbeat, DeltaEvent, Finished]
        first_heartbeat = stamped[1][1] - started
        assert 20 <= first_heartbeat <= 20 + 15 / 4
        assert stamped[2][1] - stamped[1][1] == pytest.approx(15)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("first_write", [15, 18.75, 22.5, 26.25])
async def test_no_heartbeat_right_behind_data(autojump_clock: trio.testing.MockClock, first_write: float) -> None:
    """A heartbeat asked for just as data goes out (the write of a word that waited behind a
    slow one) is not written: only a whole interval without output earns one. Trio's random
    order of tasks decides whether the ask and the data meet, hence several tries."""
    async with trio.open_nursery() as nursery:
        # A word, another a second later, then 50 s of silence before a third.
        hub = await with_agent(nursery, ScriptedAgent((0, "a"), (1, "b"), (50, "c")))  # type: ignore[arg-type]
        for attempt in range(6):
            stamped: list[tuple[type, float]] = []

            async def write(batch: list[Event]) -> None:
                if not stamped:
                    await trio.sleep(first_write)
                stamped.extend((type(event), trio.current_time()) for event in batch)

            await RequestScope(hub, invoke(f"r{attempt}"), prompt_tokens=1, heartbeat_interval=15).stream(write)
            for (_, at), (kind, next_at) in zip(stamped, stamped[1:]):
                assert kind is not Heartbeat or next_at - at >= 15, stamped
        nursery.cancel_scope.cancel()


async def test_being_told_the_agent_is_answering_is_not_the_first_token(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hub = await with_agent(nursery, AnnouncingAgent())  # type: ignore[arg-type]
        # The announcement meets a 1 s first-reply deadline; the answer comes 5 s in.
        scope = RequestScope(hub, invoke(), prompt_tokens=4, deadlines=Deadlines(first_event=1, total=60))
        events = await run_scope(scope)
        assert [type(e) for e in events] == [DeltaEvent, Finished]
        assert scope.first_event_at is not None and scope.first_token_at is not None
        assert scope.first_event_at - scope.started_at < 1
        assert scope.first_token_at - scope.started_at == pytest.approx(5)
        nursery.cancel_scope.cancel()
