"""Peers that misbehave at the transport level: a bridge client resetting mid-handshake, and an
HTTP client that stops reading. Neither may take the server down or hold others up."""

from __future__ import annotations

import socket
import struct
import time

import httpx
import pytest
import trio

from support import API_KEY, chat_body, make_settings, openai_client, start_server
from trioprovider import scope as scope_module


async def test_resets_during_the_websocket_handshake_do_not_kill_the_server() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, agents=("echo",))
        host, port = running.bridge_url.removeprefix("ws://").rsplit(":", 1)
        for _ in range(20):
            sock = trio.socket.socket()
            await sock.connect((host, int(port)))
            await sock.send(
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST, while the bridge is accepting
            await trio.sleep(0.01)
        await trio.sleep(0.2)
        answer = await trio.to_thread.run_sync(lambda: openai_client(running).chat.completions.create(model="echo", messages=[{"role": "user", "content": "still here"}]))
        assert answer.choices[0].message.content.startswith("still here")
        running.shutdown.set()


async def test_a_client_that_stops_reading_holds_up_nobody_and_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scope_module, "CLIENT_STALL_TIMEOUT", 1.0)
    settings = make_settings(**{"agents.echo.tokens": 400_000, "agents.echo.max_concurrency": 8})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        provider = running.provider
        host, port = running.provider_url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        body = chat_body("word " * 20)
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        await sock.send(head.encode() + body)
        await trio.sleep(1.5)  # it never reads: its buffers fill

        def other_client() -> tuple[int, float]:
            started = time.monotonic()
            response = httpx.post(
                f"{running.provider_url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            return response.status_code, time.monotonic() - started

        status, took = await trio.to_thread.run_sync(other_client)
        assert status == 200
        assert took < 3, f"another request on the same agent waited {took:.1f}s"
        # The stalled request is stopped from this side: agent cancelled, admission released.
        with trio.fail_after(10):
            while provider.gate.limiter.open_reservations or running.hub.in_flight():  # type: ignore[union-attr]
                await trio.sleep(0.05)
        assert provider.gate.sessions.active_requests == 0
        sock.close()
        running.shutdown.set()
