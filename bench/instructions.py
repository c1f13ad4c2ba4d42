"""Instructions a request: a yardstick for A/B comparisons that this noisy machine cannot move.

Timings here swing by a third from one run to the next (see bench/README.md), more than most
single changes are worth. The number of instructions our code executes does not: this runs our
ASGI app in process (RequestGuard -> ModelRoutes -> the embedded echo agent, as ``serve`` wires
it, without Hypercorn or sockets) under ``valgrind --tool=cachegrind --cache-sim=no`` twice, with
``--small`` and ``--large`` requests, and reports the difference per request: start-up and
imports cancel out. Repeat runs agree within about 2 % (Trio picks its scheduling order at random,
and an unstreamed request takes one of two paths depending on whether its reply came first).

It counts instructions, not time: a change that saves instructions but touches more memory can
still lose. Confirm with the interleaved benchmark before believing a small difference.

``python -m bench.instructions [--stream] [--root DIR]`` (``--root``: a checkout to measure, e.g. a
``git worktree`` of the commit before). Needs valgrind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

CONCURRENCY = 20
API_KEY = "bench-key-0123456789"


async def drive(requests: int, stream: bool) -> None:
    """Serve ``requests`` chat requests (``CONCURRENCY`` at a time) through the app in process."""
    from trioprovider import logs
    from trioprovider.agents.echo import EchoAgent
    from trioprovider.agents.runner import serve_agent
    from trioprovider.app import create_app
    from trioprovider.bridge.streams import local_stream_pair
    from trioprovider.config import hash_key, load_settings
    from trioprovider.guard import RequestGuard
    from trioprovider.model_routes import ModelRoutes
    from trioprovider.server import serve, tune_gc

    settings = load_settings(None, env={}, overrides={
        "provider.port": 0, "mcp.bridge_url": "ws://127.0.0.1:0", "mcp.token": "bench-bridge-token",
        "security.api_keys": [{"label": "bench", "sha256": hash_key(API_KEY)}],
        "security.session_ttl": 86_400, "sessions.max_idle_time": 86_400, "rate_limiting.enabled": False,
        "logging.file": "logs/bench-instructions.log", "logging.audit_file": "logs/bench-instructions-audit.log",
    })  # fmt: skip
    logs.configure(settings.logging, logs.log_file(settings.logging), stream=open(os.devnull, "w"))
    echo = EchoAgent(tokens=100, max_concurrency=CONCURRENCY)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(serve, settings, agents=()))
        hub_end, agent_end = local_stream_pair("echo", "bridge")
        nursery.start_soon(running.hub.accept, hub_end)
        nursery.start_soon(serve_agent, echo, agent_end, running.bridge_token)
        while not running.hub.agents():
            await trio.sleep(0.01)
        tune_gc()
        provider = running.provider
        app = RequestGuard(ModelRoutes(provider, create_app(provider)), provider, access_log=logging.getLogger("trioprovider.access"))
        port = int(running.provider_url.rsplit(":", 1)[1])
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hello"}], "stream": stream}).encode()
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"host", f"127.0.0.1:{port}".encode()), (b"authorization", f"Bearer {API_KEY}".encode()),
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", port),
        }  # fmt: skip
        statuses: set[int] = set()

        async def one() -> None:
            # As Hypercorn: the body, then http.disconnect once the answer's last byte is out.
            answered = trio.Event()
            messages = iter([{"type": "http.request", "body": body, "more_body": False}])

            async def receive() -> Any:
                message = next(messages, None)
                if message is None:
                    await answered.wait()
                    return {"type": "http.disconnect"}
                await trio.lowlevel.checkpoint()
                return message

            async def send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    statuses.add(message["status"])
                elif not message.get("more_body"):
                    answered.set()
                await trio.lowlevel.checkpoint()

            await app(dict(scope), receive, send)

        async def client(count: int) -> None:
            for _ in range(count):
                await one()

        async with trio.open_nursery() as clients:
            for share in range(CONCURRENCY):
                clients.start_soon(client, requests // CONCURRENCY + (share < requests % CONCURRENCY))
        if statuses != {200}:
            raise SystemExit(f"unexpected statuses {statuses}")
        running.shutdown.set()
        nursery.cancel_scope.cancel()


def count(root: Path, requests: int, stream: bool) -> int:
    """Instructions (user space) of one process serving ``requests`` requests from ``root``."""
    # This file run by path (the checkout measured may predate it), without its directory on
    # sys.path (bench/profile.py would hide the standard library's profile).
    drive_args = ["--drive", str(requests)] + (["--stream"] if stream else [])
    code = f"import runpy, sys; sys.argv = {[__file__, *drive_args]!r}; runpy.run_path({__file__!r}, run_name='__main__')"
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable, "-c", code]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root, check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true", help="streamed 100-token answers (default: whole answers)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="the checkout to measure")
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1200)
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)  # the measured process itself
    args = parser.parse_args()
    if args.drive is not None:
        trio.run(drive, args.drive, args.stream)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    small, large = count(args.root, args.small, args.stream), count(args.root, args.large, args.stream)
    per_request = (large - small) / (args.large - args.small)
    kind = "streamed (100 tokens)" if args.stream else "whole answer"
    print(f"{args.root}: {per_request:,.0f} instructions a request, {kind}")


if __name__ == "__main__":
    main()
