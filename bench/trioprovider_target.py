"""trioprovider as a benchmark target: the real server, configured as a user would run it.

Defaults everywhere (logging at INFO with the access log on, to standard error and to
``logs/provider.log`` as ``serve`` sets it up; the audit log; the embedded bridge, heartbeats,
sessions) except the limits that exist to refuse a single client's flood: rate limits off,
sessions that outlive the run, and the server's, the agent's concurrency and the queue sized for
the largest scenario.

The echo agent is attached to the embedded hub exactly as ``serve`` attaches embedded agents
(an in-process message stream), but from here, so that ``stats`` can report when each
``model_cancel`` reached it. Trio's clock is ``perf_counter`` plus an offset, and
``perf_counter`` is CLOCK_MONOTONIC on Linux, so those times convert to ``time.monotonic()``,
which the load generator's processes share.

Run: ``python -m bench.trioprovider_target --agent echo|openai [--delay-ms N] [--upstream URL]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import trio

from bench import canned
from bench.control import announce, answer_stats, rss_bytes
from trioprovider import logs
from trioprovider.agents.echo import EchoAgent
from trioprovider.agents.runner import serve_agent
from trioprovider.bridge.streams import local_stream_pair
from trioprovider.config import hash_key, load_settings
from trioprovider.server import Running, serve, tune_gc

API_KEY = "bench-key-0123456789"
#: Enough agent slots and queue for the largest scenario (1,000 concurrent streams).
CAPACITY = 4096


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return len(list(walk(root)))


async def main(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {
        "provider.port": 0,
        "mcp.bridge_url": "ws://127.0.0.1:0",
        "mcp.token": "bench-bridge-token",
        "mcp.queue_limit": CAPACITY,
        "security.api_keys": [{"label": "bench", "sha256": hash_key(API_KEY)}],
        "security.session_ttl": 86_400,
        "sessions.max_idle_time": 86_400,
        "rate_limiting.enabled": False,
        # The server-wide cap on model requests at once (50 by default) refuses a flood too.
        "performance.max_concurrent_requests": CAPACITY,
        "agents.echo.tokens": canned.TOKENS,
        "agents.echo.delay_ms": args.delay_ms,
        "agents.echo.max_concurrency": CAPACITY,
        # Each target its own files: two processes rotating one file lose lines.
        "logging.file": f"logs/bench-{args.agent}.log",
        "logging.audit_file": f"logs/bench-{args.agent}-audit.log",
    }
    overrides.update(upstream_overrides(args.upstream) if args.agent == "openai" else {})
    settings = load_settings(None, env={}, overrides=overrides)
    # As the command line sets it up: INFO to standard error (which the driver sends to a file)
    # and to the rotating log file; the garbage collector tuned for serving.
    logs.configure(settings.logging, logs.log_file(settings.logging))
    tune_gc()

    echo = EchoAgent(tokens=canned.TOKENS, delay=args.delay_ms / 1000, max_concurrency=CAPACITY) if args.agent == "echo" else None
    async with trio.open_nursery() as nursery:
        # The upstream agent is embedded by the server itself (its hang-ups are timed at the
        # mock upstream); the echo agent is attached here, as the server would attach it.
        running: Running = await nursery.start(partial(serve, settings, agents=() if echo else ("openai",)))
        assert running.hub is not None
        if echo is not None:
            hub_end, agent_end = local_stream_pair(echo.agent_id, "bridge")
            nursery.start_soon(running.hub.accept, hub_end)
            nursery.start_soon(serve_agent, echo, agent_end, running.bridge_token)
        while not running.hub.agents():
            await trio.sleep(0.01)
        clock_offset = trio.current_time() - time.perf_counter()

        def stats() -> dict[str, Any]:
            provider = running.provider
            cancels = [(request_id, at - clock_offset) for request_id, at in (echo.cancelled if echo else [])]
            return {
                "rss": rss_bytes(),
                "cancels": cancels,
                "open_scopes": len(provider.scopes),
                "in_flight": running.hub.in_flight() if running.hub else 0,
                "queued": running.hub.queued if running.hub else 0,
                "active_requests": provider.gate.sessions.active_requests,
                "tasks": count_tasks(),
            }

        announce(url=running.provider_url, api_key=API_KEY, rss=rss_bytes(), **({"model": "echo"} if echo else {}))
        await answer_stats(stats)
        nursery.cancel_scope.cancel()


def upstream_overrides(upstream: str) -> dict[str, Any]:
    """The upstream agent in front of the mock; it learns the mock's models from /v1/models."""
    return {"agents.openai.base_url": upstream, "agents.openai.max_concurrency": CAPACITY}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agent", choices=["echo", "openai"], default="echo")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--upstream", help="the mock upstream's base URL (agent openai)")
    trio.run(main, parser.parse_args())
