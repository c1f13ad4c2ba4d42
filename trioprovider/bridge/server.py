"""The bridge's WebSocket listener (``ws://127.0.0.1:8787`` by default)."""

from __future__ import annotations

import logging
from functools import partial

import trio
import trio_websocket

from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.streams import WebSocketMessageStream

log = logging.getLogger(__name__)


async def _accept(hub: BridgeHub, request: trio_websocket.WebSocketRequest) -> None:
    # trio-websocket lets a handler's exception end the whole server: one peer that resets
    # its connection mid-handshake must not take the provider down with it.
    try:
        ws = await request.accept()
        await hub.accept(WebSocketMessageStream(ws))
    except trio_websocket.ConnectionClosed:
        pass
    except Exception:
        log.exception("bridge: error serving a peer; dropped it")


async def serve_bridge(
    hub: BridgeHub,
    host: str,
    port: int,
    *,
    max_frame_bytes: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the hub on ``host:port`` until cancelled; ``task_status`` gets the bound port."""

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                partial(_accept, hub),
                host,
                port,
                None,
                # Frames over the limit close the connection with 1009 (Message Too Big).
                max_message_size=max_frame_bytes,
                # Room for a burst of chunks from an agent without a round trip per frame.
                message_queue_size=16,
                connect_timeout=10,
                disconnect_timeout=2,
            )
        )
        bound = server.port
        log.info("bridge listening on ws://%s:%d", host, bound)
        task_status.started(bound)
