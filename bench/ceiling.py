"""The ceiling of this stack: a bare ASGI app on ``hypercorn.trio`` answering the canned bytes.

No framework, no validation, no bridge: what Hypercorn and Trio cost on their own. It parses
the request body (as any server must, to know the model and whether to stream) and sends each
streamed record as its own ASGI message, as a straightforward streaming app does. Hypercorn is
configured as trioprovider configures it.

Run: ``python -m bench.ceiling [--port N]``.
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from bench import canned
from bench.control import announce, answer_stats, rss_bytes

_COMPLETIONS = {model: canned.completion_body(model) for model in canned.MODELS}
_RECORDS = {model: canned.stream_records(model) for model in canned.MODELS}
_MODELS = canned.models_body()
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "GET" and scope["path"].rstrip("/").endswith("/models"):
        await _whole(send, _MODELS)
        return
    if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
        await send({"type": "http.response.start", "status": 404, "headers": _JSON})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    request = json.loads(body)
    model = request.get("model") if request.get("model") in _COMPLETIONS else "bench"
    if not request.get("stream"):
        await _whole(send, _COMPLETIONS[model])
        return
    records = _RECORDS[model]
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    for i, record in enumerate(records):
        if i and model == "bench-slow":
            await trio.sleep(canned.SLOW_TOKEN_DELAY)
        await send({"type": "http.response.body", "body": record, "more_body": True})
        if model == "bench-hold":
            await trio.sleep(math.inf)  # until the client leaves and Hypercorn cancels us
    await send({"type": "http.response.body", "body": b""})


async def _whole(send: Any, body: bytes) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def main(port: int) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.read_timeout = None
    config.keep_alive_timeout = 75
    config.include_server_header = False
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))  # type: ignore[arg-type]
        announce(url=binds[0], rss=rss_bytes())
        await answer_stats(lambda: {"rss": rss_bytes()})
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    trio.run(main, parser.parse_args().port)
