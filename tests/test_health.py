"""``GET /health`` in each state: degraded (no agent), healthy, draining; the bridge link."""

from __future__ import annotations

from functools import partial

import httpx
import trio

from support import BRIDGE_TOKEN, make_settings, start_server, wait_until
from trioprovider import __version__
from trioprovider.agents.echo import EchoAgent
from trioprovider.agents.runner import run_agent
from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.server import serve_bridge


async def get_health(url: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        # No key: health is for load balancers and service managers.
        return await http.get("/health")


async def test_degraded_then_healthy_then_draining() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        response = await get_health(running.provider_url)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "degraded"
        assert body["version"] == __version__ and body["uptime_seconds"] >= 0 and body["timestamp"].endswith("+00:00")
        assert body["active_sessions"] == 0 and body["agents"] == []
        assert body["mcp_connection"] == {"status": "embedded", "agents": 0, "peers": 0, "last_ping": None}

        nursery.start_soon(partial(run_agent, EchoAgent(tokens=2, models=["echo", "echo-2"]), running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
        await wait_until(lambda: running.provider.bridge.agents())
        body = (await get_health(running.provider_url)).json()
        assert body["status"] == "healthy"
        assert [(a["agent_id"], [m["id"] for m in a["models"]], a["in_flight"]) for a in body["agents"]] == [("echo", ["echo", "echo-2"], 0)]
        assert body["mcp_connection"]["status"] == "embedded" and body["mcp_connection"]["agents"] == 1
        assert body["mcp_connection"]["last_ping"] is not None

        # The flag the shutdown path sets (tests/test_shutdown.py drives that path itself).
        running.provider.draining = True
        response = await get_health(running.provider_url)
        assert response.status_code == 503 and response.json()["status"] == "draining"
        running.provider.draining = False
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_an_external_bridge_link_shows_connected_then_the_problem() -> None:
    async with trio.open_nursery() as nursery:
        hub = BridgeHub(token=BRIDGE_TOKEN, default_model="cursor-agent-local")
        bridge_scope = trio.CancelScope()

        async def bridge(task_status: trio.TaskStatus[int]) -> None:
            with bridge_scope:
                await serve_bridge(hub, "127.0.0.1", 0, max_frame_bytes=1 << 20, task_status=task_status)

        port = await nursery.start(bridge)
        url = f"ws://127.0.0.1:{port}"
        settings = make_settings(**{"mcp.embedded_bridge": False, "mcp.bridge_url": url, "mcp.reconnect_delay": 0.1})
        running = await start_server(nursery, settings)
        link = (await get_health(running.provider_url)).json()["mcp_connection"]
        assert link["status"] == "connected" and link["url"] == url and link["problem"] is None
        bridge_scope.cancel()
        await wait_until(lambda: running.provider.bridge.connection()["status"] == "disconnected")
        link = (await get_health(running.provider_url)).json()["mcp_connection"]
        assert link["status"] == "disconnected" and link["problem"]
        running.shutdown.set()
        nursery.cancel_scope.cancel()
