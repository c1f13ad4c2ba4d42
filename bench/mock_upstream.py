"""A mock OpenAI-compatible server: the floor of every comparison, and the upstream of proxies.

Plain HTTP/1.1 with keep-alive on raw Trio sockets, answering :mod:`bench.canned` bytes that are
built once: nothing a real server could do faster in Python. Streamed answers are written one
record per send (a model emits tokens one by one). While a paced answer (``bench-slow``,
``bench-hold``) streams, the connection is also read, so the moment the client (a proxy) hangs
up is seen at once; those moments, keyed by the request's message text (a probe's marker), are
what ``stats`` reports.

Run: ``python -m bench.mock_upstream [--port N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from typing import Any

import trio

from bench import canned
from bench.control import announce, answer_stats, rss_bytes

_COMPLETIONS = {model: canned.completion_body(model) for model in canned.MODELS}
_RECORDS = {model: [b"%x\r\n%s\r\n" % (len(r), r) for r in canned.stream_records(model)] for model in canned.MODELS}
_MODELS = canned.models_body()
_LAST_CHUNK = b"0\r\n\r\n"


def _head(status: str, content_type: str, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%s\r\n\r\n" % (status.encode(), content_type.encode(), framing)


class MockUpstream:
    def __init__(self) -> None:
        #: (marker, time.monotonic()) of every paced answer whose client hung up mid-stream.
        self.hangups: list[tuple[str, float]] = []
        self.requests = 0

    async def serve(self, port: int, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.connection, listeners)

    async def connection(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            while True:
                end = buffer.find(b"\r\n\r\n")
                while end < 0:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                    end = buffer.find(b"\r\n\r\n")
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                request_line, *lines = head.split(b"\r\n")
                method, target = request_line.split(b" ", 2)[:2]
                length, close = 0, False
                for line in lines:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                while len(buffer) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                body = bytes(buffer[:length])
                del buffer[:length]
                self.requests += 1
                if not await self.respond(stream, buffer, method, target, body):
                    return
                if close:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def respond(self, stream: trio.SocketStream, buffer: bytearray, method: bytes, target: bytes, body: bytes) -> bool:
        """Answer one request; False if the client hung up."""
        path = target.split(b"?", 1)[0]
        if method == b"GET" and path.rstrip(b"/").endswith(b"/models"):
            await stream.send_all(_head("200 OK", "application/json", len(_MODELS)) + _MODELS)
            return True
        if method != b"POST" or not path.endswith(b"/chat/completions"):
            await stream.send_all(_head("404 Not Found", "application/json", 2) + b"{}")
            return True
        request = json.loads(body)
        model = request.get("model", "bench")
        if model not in _COMPLETIONS:
            # Proxies may prefix or rename: pace by the suffix, answer as "bench".
            model = next((name for name in reversed(canned.MODELS) if model.endswith(name)), "bench")
        if not request.get("stream"):
            answer = _COMPLETIONS[model]
            await stream.send_all(_head("200 OK", "application/json", len(answer)) + answer)
            return True
        records = _RECORDS[model]
        head = _head("200 OK", "text/event-stream", None)
        if model == "bench":
            await stream.send_all(head + records[0])
            for record in records[1:]:
                await stream.send_all(record)
            await stream.send_all(_LAST_CHUNK)
            return True
        marker = str((request.get("messages") or [{}])[-1].get("content", ""))
        return await self._paced(stream, buffer, head, records, marker, hold=model == "bench-hold")

    async def _paced(self, stream: trio.SocketStream, buffer: bytearray, head: bytes, records: list[bytes], marker: str, *, hold: bool) -> bool:
        hung_up = False

        async def watch(cancel: trio.CancelScope) -> None:
            nonlocal hung_up
            try:
                while data := await stream.receive_some(65536):
                    buffer.extend(data)
            except trio.BrokenResourceError:
                pass
            hung_up = True
            self.hangups.append((marker, time.monotonic()))
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await stream.send_all(head + records[0])
                if hold:
                    await trio.sleep(math.inf)
                for record in records[1:]:
                    await trio.sleep(canned.SLOW_TOKEN_DELAY)
                    await stream.send_all(record)
                await stream.send_all(_LAST_CHUNK)
            except trio.BrokenResourceError:
                await trio.sleep(math.inf)  # the watcher records the hang-up and ends this
            nursery.cancel_scope.cancel()
        return not hung_up

    def stats(self) -> dict[str, Any]:
        return {"hangups": self.hangups, "requests": self.requests, "rss": rss_bytes()}


async def main(port: int) -> None:
    mock = MockUpstream()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(mock.serve, port))
        announce(url=f"http://127.0.0.1:{bound}", rss=rss_bytes())
        await answer_stats(mock.stats)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    trio.run(main, parser.parse_args().port)
