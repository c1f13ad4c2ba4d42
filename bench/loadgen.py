"""The load generator: HTTP/1.1 with keep-alive on raw Trio sockets, in its own process.

It parses only what it must (status, framing, SSE records) so that it costs a fraction of what
the servers under test cost per request; each result also says how busy it was
(``client_cpu``: its CPU seconds over the wall time), so a run where the client, not the
server, was the limit shows as such. Times are ``time.perf_counter()`` (CLOCK_MONOTONIC,
shared with the server processes, which is what cancellation timing needs).

Run by the driver: ``python -m bench.loadgen SCENARIO URL [options]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from bench import canned

#: Connections being opened at once: stays under Hypercorn's default listen backlog (100), so
#: no SYN is dropped and retried a second later, which would be a client artefact.
CONNECT_LIMIT = 32
#: Seconds a held stream may take to start (its response head) before it counts as stalled.
STREAM_START_TIMEOUT = 20.0


class ServerClosed(Exception):
    pass


@dataclass
class Streamed:
    """One streamed answer as the client saw it."""

    status: int
    request_id: str
    sent_at: float
    tokens: int = 0
    first_at: float = 0.0
    last_at: float = 0.0


class Connection:
    """One keep-alive connection to the server under test."""

    def __init__(self, stream: trio.SocketStream, host: str, port: int) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.host, self.port = host, port
        self.reconnects = 0

    @classmethod
    async def open(cls, host: str, port: int, limit: trio.CapacityLimiter | None = None) -> Connection:
        if limit is None:
            return cls(await trio.open_tcp_stream(host, port), host, port)
        async with limit:
            return cls(await trio.open_tcp_stream(host, port), host, port)

    async def _after_response(self, headers: dict[bytes, bytes]) -> None:
        """Reconnect when the server ends the connection (Hypercorn does after 1,000 requests
        on one connection), as HTTP clients do."""
        if headers.get(b"connection", b"").lower() == b"close":
            await self.stream.aclose()
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.buffer.clear()
            self.reconnects += 1

    async def _fill(self) -> None:
        data = await self.stream.receive_some(262144)
        if not data:
            raise ServerClosed("the server closed the connection")
        self.buffer += data

    async def _head(self) -> tuple[int, dict[bytes, bytes]]:
        end = self.buffer.find(b"\r\n\r\n")
        while end < 0:
            await self._fill()
            end = self.buffer.find(b"\r\n\r\n")
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(b" ", 2)[1]), headers

    async def exchange(self, request: bytes) -> int:
        """Send a request and read its whole response; the status."""
        await self.stream.send_all(request)
        status, headers = await self._head()
        length = headers.get(b"content-length")
        if length is not None:
            size = int(length)
            while len(self.buffer) < size:
                await self._fill()
            del self.buffer[:size]
        else:
            async for _ in self._chunks():
                pass
        await self._after_response(headers)
        return status

    async def _chunks(self) -> Any:
        """The payloads of a chunked body, as they complete, all that one read completed joined."""
        while True:
            out = bytearray()
            position = 0
            done = False
            while True:
                line_end = self.buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                size = int(self.buffer[position:line_end].split(b";", 1)[0], 16)
                if size == 0:
                    if len(self.buffer) < line_end + 4:
                        break
                    position = line_end + 4
                    done = True
                    break
                if len(self.buffer) < line_end + 2 + size + 2:
                    break
                out += self.buffer[line_end + 2 : line_end + 2 + size]
                position = line_end + 2 + size + 2
            del self.buffer[:position]
            if out:
                yield bytes(out)
            if done:
                return
            await self._fill()

    async def stream_answer(self, request: bytes, *, first_token_only: bool = False) -> Streamed:
        """Send a streaming request and read its SSE records, timing the tokens as they arrive."""
        sent_at = time.perf_counter()
        await self.stream.send_all(request)
        status, headers = await self._head()
        result = Streamed(status, headers.get(b"x-request-id", b"").decode(), sent_at)
        if status != 200:
            await self._discard(headers)
            await self._after_response(headers)
            return result
        pending = b""
        async for payload in self._chunks():
            now = time.perf_counter()
            records = pending + payload
            cut = records.rfind(b"\n\n") + 2
            complete, pending = records[:cut], records[cut:]
            tokens = complete.count(b'"content":"') - complete.count(b'"content":""')
            if tokens:
                if not result.tokens:
                    result.first_at = now
                result.last_at = now
                result.tokens += tokens
                if first_token_only:
                    return result
        await self._after_response(headers)
        return result

    async def _discard(self, headers: dict[bytes, bytes]) -> None:
        length = headers.get(b"content-length")
        if length is not None:
            while len(self.buffer) < int(length):
                await self._fill()
            del self.buffer[: int(length)]
        else:
            async for _ in self._chunks():
                pass

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Target:
    host: str
    port: int
    api_key: str
    model: str

    def request(self, *, stream: bool, content: str = canned.PROMPT) -> bytes:
        body = canned.chat_request(self.model, stream=stream, content=content)
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (self.host.encode(), self.port, self.api_key.encode(), len(body), body)
        )


@dataclass
class Window:
    """Wall and CPU time of the measured part of a scenario."""

    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=lambda: _cpu())

    def close(self, ended: float | None = None) -> dict[str, float]:
        wall = (ended or time.perf_counter()) - self.started
        return {"wall": wall, "client_cpu": (_cpu() - self.cpu_started) / wall if wall > 0 else 0.0}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def latency(target: Target, count: int, warmup: int) -> dict[str, Any]:
    """Sequential non-streamed requests on one connection."""
    connection = await Connection.open(target.host, target.port)
    request = target.request(stream=False)
    samples, errors = [], 0
    for _ in range(warmup):
        await connection.exchange(request)
    window = Window()
    for _ in range(count):
        started = time.perf_counter()
        status = await connection.exchange(request)
        samples.append(time.perf_counter() - started)
        errors += status != 200
    await connection.aclose()
    return {"samples": samples, "errors": errors, **window.close()}


async def throughput(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    """``concurrency`` connections each sending non-streamed requests back to back."""
    request = target.request(stream=False)
    limit = trio.CapacityLimiter(CONNECT_LIMIT)
    connections: list[Connection] = []

    async def connect() -> None:
        connection = await Connection.open(target.host, target.port, limit)
        await connection.exchange(request)  # warm: the connection is set up and served once
        connections.append(connection)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(connect)
    samples: list[float] = []
    errors = 0
    ends: list[float] = []
    window = Window()
    deadline = window.started + duration

    async def work(connection: Connection) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status = await connection.exchange(request)
            samples.append(time.perf_counter() - started)
            errors += status != 200
        ends.append(time.perf_counter())

    async with trio.open_nursery() as nursery:
        for connection in connections:
            nursery.start_soon(work, connection)
    result = window.close(max(ends))
    for connection in connections:
        await connection.aclose()
    return {"samples": samples, "errors": errors, "requests": len(samples), "rps": len(samples) / result["wall"], **result}


async def streaming(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    """``concurrency`` connections each reading streamed answers back to back."""
    request = target.request(stream=True)
    limit = trio.CapacityLimiter(CONNECT_LIMIT)
    connections: list[Connection] = []

    async def connect() -> None:
        # Only connected, not warmed with a whole answer: at 500 streams that would take
        # longer than the measurement.
        connections.append(await Connection.open(target.host, target.port, limit))

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(connect)
    answers: list[Streamed] = []
    ends: list[float] = []
    window = Window()
    deadline = window.started + duration

    async def work(connection: Connection) -> None:
        while time.perf_counter() < deadline:
            answers.append(await connection.stream_answer(request))
        ends.append(time.perf_counter())

    async with trio.open_nursery() as nursery:
        for connection in connections:
            nursery.start_soon(work, connection)
    result = window.close(max(ends))
    for connection in connections:
        await connection.aclose()
    good = [a for a in answers if a.status == 200 and a.tokens]
    tokens = sum(a.tokens for a in answers)
    return {
        "streams": len(answers),
        "errors": len(answers) - len(good),
        "tokens": tokens,
        "tokens_per_stream": tokens / len(answers) if answers else 0,
        "chunks_per_s": tokens / result["wall"],
        "ttft": [a.first_at - a.sent_at for a in good],
        "itl": [(a.last_at - a.first_at) / (a.tokens - 1) for a in good if a.tokens > 1],
        **result,
    }


async def cancellation(target: Target, count: int, concurrency: int) -> dict[str, Any]:
    """Start streamed answers and hang up at their first token; when each hang-up happened."""
    probes: list[dict[str, Any]] = []
    failures = 0
    limit = trio.CapacityLimiter(concurrency)

    async def probe(number: int) -> None:
        nonlocal failures
        marker = f"probe-{number}"
        async with limit:
            connection = await Connection.open(target.host, target.port)
            answer = await connection.stream_answer(target.request(stream=True, content=marker), first_token_only=True)
            if answer.status == 200 and answer.tokens:
                hung_up = time.perf_counter()
                await connection.aclose()
                probes.append({"marker": marker, "request_id": answer.request_id, "hung_up": hung_up})
            else:
                failures += 1
                await connection.aclose()

    window = Window()
    async with trio.open_nursery() as nursery:
        for number in range(count):
            nursery.start_soon(probe, number)
    return {"probes": probes, "errors": failures, **window.close()}


async def hold(target: Target, steps: list[int]) -> dict[str, Any]:
    """Open idle streams up to each of ``steps`` in turn; after each step print how many are
    open and wait for a line on standard input; then close them all."""
    request = target.request(stream=True)
    limit = trio.CapacityLimiter(CONNECT_LIMIT)
    opened: list[Connection] = []
    refused = 0

    stalled = 0

    async def open_one() -> None:
        nonlocal refused, stalled
        connection = await Connection.open(target.host, target.port, limit)
        status = 0
        # A server that cannot start this many streams leaves some unanswered: count those
        # rather than wait for ever.
        with trio.move_on_after(STREAM_START_TIMEOUT):
            async with limit:
                await connection.stream.send_all(request)
            status, _headers = await connection._head()
        if status == 200:
            opened.append(connection)
        else:
            refused += status != 0
            stalled += status == 0
            await connection.aclose()

    for step in steps:
        async with trio.open_nursery() as nursery:
            for _ in range(step - len(opened) - refused - stalled):
                nursery.start_soon(open_one)
        sys.stdout.write(json.dumps({"open": len(opened), "refused": refused, "stalled": stalled}) + "\n")
        sys.stdout.flush()
        await trio.to_thread.run_sync(sys.stdin.readline)
    for connection in opened:
        await connection.aclose()
    return {"closed": len(opened)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["latency", "throughput", "streaming", "cancellation", "hold"])
    parser.add_argument("url")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--steps", default="1000", help="hold: comma-separated stream counts")
    args = parser.parse_args()
    host, port = args.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    target = Target(host, int(port), args.api_key, args.model)
    if args.scenario == "latency":
        result = trio.run(latency, target, args.count, args.warmup)
    elif args.scenario == "throughput":
        result = trio.run(throughput, target, args.concurrency, args.duration)
    elif args.scenario == "streaming":
        result = trio.run(streaming, target, args.concurrency, args.duration)
    elif args.scenario == "cancellation":
        result = trio.run(cancellation, target, args.count, args.concurrency)
    else:
        result = trio.run(hold, target, [int(step) for step in args.steps.split(",")])
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
