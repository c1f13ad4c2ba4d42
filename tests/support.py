"""Helpers for tests that run the real server: settings, start-up, clients, task counting."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from trioprovider.config import Settings, hash_key, load_settings
from trioprovider.server import Running, serve

API_KEY = "test-key-0123456789"
BRIDGE_TOKEN = "test-bridge-token"


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client call (the official sync clients) in a worker thread."""
    from functools import partial

    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: ports 0, a known key and token, no config file, no env."""
    values: dict[str, Any] = {
        "provider.port": 0,
        "mcp.bridge_url": "ws://127.0.0.1:0",
        "mcp.token": BRIDGE_TOKEN,
        "mcp.agent_wait_timeout": 0.5,
        "security.api_keys": [{"label": "test", "sha256": hash_key(API_KEY)}],
        "logging.access_log": False,
        # Each server its own audit file, out of the working tree (tests read it back).
        "logging.audit_file": str(Path(tempfile.mkdtemp(prefix="trioprovider-test-")) / "security_audit.log"),
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


class RawHTTP:
    """A bare HTTP/1.1 client on a trio socket: for tests that must hang up at an exact moment."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = b""

    @classmethod
    async def post(cls, base_url: str, path: str, body: bytes, api_key: str = API_KEY, headers: dict[str, str] | None = None) -> RawHTTP:
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Authorization: Bearer {api_key}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        await stream.send_all("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        return cls(stream)

    async def read_until(self, marker: bytes) -> bytes:
        """Read until ``marker`` has arrived (or the server closed); everything so far."""
        while marker not in self.received:
            data = await self.stream.receive_some(65536)
            if not data:
                break
            self.received += data
        return self.received

    async def read_all(self) -> bytes:
        """Read one whole response (by Content-Length or chunked framing)."""
        head = await self.read_until(b"\r\n\r\n")
        header, _, _ = head.partition(b"\r\n\r\n")
        lower = header.lower()
        if b"transfer-encoding: chunked" in lower:
            await self.read_until(b"\r\n0\r\n\r\n")
        else:
            length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            while len(self.received) - len(header) - 4 < length:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                self.received += data
        return self.received

    async def hang_up(self) -> float:
        """Close the connection abruptly; returns the trio time it happened."""
        await self.stream.aclose()
        return trio.current_time()


def chat_body(text: str = "hello there", model: str = "echo", stream: bool = True, **extra: Any) -> bytes:
    import json

    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "stream": stream, **extra}).encode()


def sse_payloads(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of an HTTP response carrying SSE (chunked framing stripped)."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    return [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def audit_events(running: Running, event: str | None = None) -> list[dict[str, Any]]:
    """The records of a test server's audit log (of one ``event`` kind, if given)."""
    import json

    path = Path(running.provider.settings.logging.audit_file)
    running.provider.audit.flush()
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [record for record in records if event is None or record["event"] == event]


class ServerThread:
    """A live server (and optional extra agents) in its own thread and trio run, for
    synchronous tests such as hypothesis's, which call it from the main thread many times."""

    def __init__(self, settings: Settings, agents: tuple[str, ...] = (), extra_agents: tuple[Any, ...] = ()) -> None:
        import threading

        self.settings = settings
        self.agents = agents
        self.extra_agents = extra_agents
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.running: Running | None = None

    async def _main(self) -> None:
        from functools import partial

        from trioprovider.agents.runner import run_agent

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            running = await start_server(nursery, self.settings, self.agents)
            for agent in self.extra_agents:
                nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
            with trio.fail_after(10):
                while len(running.provider.bridge.agents()) < len(self.agents) + len(self.extra_agents):
                    await trio.sleep(0.01)
            self.running = running
            self._ready.set()
            await self._stop.wait()
            running.shutdown.set()
            nursery.cancel_scope.cancel()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` (synchronous) in the server's trio thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def __enter__(self) -> Running:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test server did not start in 30 s")
        assert self.running is not None
        return self.running

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.call(self._stop.set)
        self._thread.join(30)
