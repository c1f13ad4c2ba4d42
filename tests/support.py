"""Helpers for tests that run the real server: settings, start-up, clients, task counting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import trio

from trioprovider.config import Settings, hash_key, load_settings
from trioprovider.server import Running, serve

API_KEY = "test-key-0123456789"
BRIDGE_TOKEN = "test-bridge-token"


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: ports 0, a known key and token, no config file, no env."""
    values: dict[str, Any] = {
        "provider.port": 0,
        "mcp.bridge_url": "ws://127.0.0.1:0",
        "mcp.token": BRIDGE_TOKEN,
        "mcp.agent_wait_timeout": 0.5,
        "security.api_keys": [{"label": "test", "sha256": hash_key(API_KEY)}],
        "logging.access_log": False,
    }
    values.update(overrides)
    return load_settings(None, env={}, overrides=values)


async def start_server(nursery: trio.Nursery, settings: Settings | None = None, agents: tuple[str, ...] = ()) -> Running:
    return await nursery.start(lambda task_status: serve(settings or make_settings(), agents=agents, task_status=task_status))


def openai_client(running: Running, api_key: str = API_KEY) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{running.provider_url}/v1", api_key=api_key, max_retries=0, timeout=30)


def count_tasks() -> int:
    """Every task now alive in this trio run (for leak checks)."""

    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    return sum(1 for _ in walk(trio.lowlevel.current_root_task()))
