"""The commands a user types, run as real processes: init, serve (with --agent), agent, bridge."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import trio

from trioprovider.agents.echo import echo_text

ENV = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_PROVIDER_")}


async def read_banner(process: trio.Process, until: str) -> str:
    """Read the process's stdout until a line containing ``until`` arrives."""
    assert process.stdout is not None
    return await read_output(process.stdout, until)


async def read_output(output: trio.abc.ReceiveStream, until: str) -> str:
    """Read ``output`` (a process's stdout or stderr) until ``until`` arrives."""
    text = ""
    with trio.fail_after(30):
        while until not in text:
            data = await output.receive_some(4096)
            assert data, f"process ended before printing {until!r}: {text}"
            text += data.decode()
    return text


@dataclass
class ServerProcess:
    """``python -m trioprovider ...`` started by a test, with what its banner says."""

    process: trio.Process
    banner: str

    def field(self, pattern: str) -> str:
        return re.search(pattern, self.banner).group(1)  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return self.field(r"OpenAI API\s+(\S+)/v1")

    @property
    def key(self) -> str:
        return self.field(r"API key\s+(\S+)")

    @property
    def bridge(self) -> str:
        return self.field(r"bridge\s+(ws://\S+)")


async def start_server_process(nursery: trio.Nursery, tmp_path: Path, env: dict[str, str], *argv: str) -> ServerProcess:
    """Start the server as its own process; return once its banner is out."""
    process = await nursery.start(
        lambda task_status: trio.run_process(
            [sys.executable, "-m", "trioprovider", *argv], cwd=str(tmp_path), env=env,
            stdout=subprocess.PIPE, check=False, task_status=task_status,
        )
    )
    return ServerProcess(process, await read_banner(process, "Ctrl+C"))


def test_init_writes_a_private_config_with_a_hashed_key(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "trioprovider", "init"], cwd=tmp_path, env=ENV, capture_output=True, text=True, check=True)
    config = tmp_path / "config" / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    key = re.search(r"API key \(shown once; only its hash is stored\): (\S+)", out.stdout).group(1)  # type: ignore[union-attr]
    text = config.read_text()
    assert key not in text
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest() in text
    again = subprocess.run([sys.executable, "-m", "trioprovider", "init"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr


def test_a_bad_config_value_stops_start_up_with_one_line(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "trioprovider"], cwd=tmp_path, env={**ENV, "LOCAL_PROVIDER_PORT": "eighty"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "LOCAL_PROVIDER_PORT (provider.port)" in bad.stderr
    exposed = subprocess.run([sys.executable, "-m", "trioprovider", "--host", "0.0.0.0"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert exposed.returncode == 2 and "not a loopback address" in exposed.stderr


async def test_one_command_demo_then_sigterm_exits_cleanly(tmp_path: Path) -> None:
    env = {**ENV, "LOCAL_PROVIDER_PORT": "0", "LOCAL_PROVIDER_BRIDGE_URL": "ws://127.0.0.1:0", "LOCAL_PROVIDER_ECHO_TOKENS": "4"}
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, "-m", "trioprovider", "--agent", "echo"], cwd=str(tmp_path), env=env,
                stdout=subprocess.PIPE, check=False, task_status=task_status,
            )
        )
        banner = await read_banner(process, "Ctrl+C")
        url = re.search(r"OpenAI API\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        key = re.search(r"API key\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        assert "echo" in re.search(r"models\s+(.*)", banner).group(1)  # type: ignore[union-attr]
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        answer = await trio.to_thread.run_sync(lambda: client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "ping pong"}]))
        assert answer.choices[0].message.content == echo_text("ping pong", 4)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
        assert process.returncode == 0


async def test_second_terminal_agent_with_a_config_from_init(tmp_path: Path) -> None:
    init = subprocess.run([sys.executable, "-m", "trioprovider", "init"], cwd=tmp_path, env=ENV, capture_output=True, text=True, check=True)
    key = re.search(r"stored\): (\S+)", init.stdout).group(1)  # type: ignore[union-attr]
    env = {**ENV, "LOCAL_PROVIDER_PORT": "0", "LOCAL_PROVIDER_BRIDGE_URL": "ws://127.0.0.1:0"}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, "-m", "trioprovider"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, check=False, task_status=task_status
            )
        )
        banner = await read_banner(server, "Ctrl+C")
        assert "no agent connected yet" in banner
        assert "reads the bridge token from the config" in banner
        url = re.search(r"OpenAI API\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        bridge = re.search(r"bridge\s+(ws://\S+)", banner).group(1)  # type: ignore[union-attr]
        agent = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, "-m", "trioprovider", "agent", "echo", "--bridge-url", bridge, "--tokens", "3"],
                cwd=str(tmp_path), env=ENV, check=False, task_status=task_status,
            )
        )
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        answer = await trio.to_thread.run_sync(lambda: client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}]))
        assert answer.choices[0].message.content == "a b a"
        agent.send_signal(signal.SIGINT)
        server.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            await server.wait()
            await agent.wait()
        assert server.returncode == 0


@pytest.mark.parametrize("argv", [["schema"]])
def test_schema_command_prints_the_committed_schema(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "trioprovider", *argv], env=ENV, capture_output=True, text=True, check=True)
    committed = (Path(__file__).parent.parent / "docs" / "bridge-protocol.schema.json").read_text()
    assert out.stdout == committed


async def test_bridge_alone_with_provider_and_agent_as_three_processes(tmp_path: Path) -> None:
    env = {**ENV, "LOCAL_PROVIDER_BRIDGE_TOKEN": "three-process-token", "LOCAL_PROVIDER_PORT": "0"}
    async with trio.open_nursery() as nursery:

        def start(argv: list[str], **extra: object):  # type: ignore[no-untyped-def]
            return nursery.start(
                lambda task_status: trio.run_process(
                    [sys.executable, "-m", "trioprovider", *argv], cwd=str(tmp_path), env=env,
                    check=False, task_status=task_status, **extra,
                )
            )

        bridge = await start(["bridge", "--bridge-url", "ws://127.0.0.1:0"], stdout=subprocess.PIPE)
        bridge_url = re.search(r"bridge on (ws://\S+)", await read_banner(bridge, "bridge on")).group(1)  # type: ignore[union-attr]
        agent = await start(["agent", "echo", "--bridge-url", bridge_url, "--tokens", "2"])
        server = await start(["--external-bridge", "--bridge-url", bridge_url], stdout=subprocess.PIPE)
        banner = await read_banner(server, "Ctrl+C")
        assert "(external)" in banner
        url = re.search(r"OpenAI API\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        key = re.search(r"API key\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        answer = await trio.to_thread.run_sync(lambda: client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x y"}]))
        assert answer.choices[0].message.content == "x y"
        for process in (server, agent, bridge):
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await server.wait()
        assert server.returncode == 0


async def test_sigterm_with_a_stream_in_flight_ends_it_cleanly_and_exits_0(tmp_path: Path) -> None:
    from functools import partial

    from support import RawHTTP, chat_body, sse_payloads
    from trioprovider.agents.echo import EchoAgent
    from trioprovider.agents.runner import run_agent

    token = "sigterm-test-token"
    env = {
        **ENV, "LOCAL_PROVIDER_PORT": "0", "LOCAL_PROVIDER_BRIDGE_URL": "ws://127.0.0.1:0",
        "LOCAL_PROVIDER_BRIDGE_TOKEN": token, "LOCAL_PROVIDER_GRACEFUL_TIMEOUT": "1",
    }
    async with trio.open_nursery() as nursery:
        server = await start_server_process(nursery, tmp_path, env)
        process, url, key, bridge = server.process, server.url, server.key, server.bridge
        # An answer far longer than the grace period.
        agent = EchoAgent(tokens=10_000, delay=0.01)
        # Keeps retrying once the server is gone, until the test ends it.
        nursery.start_soon(partial(run_agent, agent, bridge, token, reconnect_delay=0.1))
        stream = await RawHTTP.post(url, "/v1/chat/completions", chat_body(), api_key=key)
        await stream.read_until(b'"content"')
        process.send_signal(signal.SIGTERM)
        signalled = trio.current_time()
        with trio.fail_after(10):
            await stream.read_until(b"data: [DONE]")
            await agent.cancel_arrived.wait()
            await process.wait()
        took = trio.current_time() - signalled
        payloads = sse_payloads(stream.received)
        assert payloads[-1] == b"[DONE]"
        assert json.loads(payloads[-2])["error"]["code"] == "shutdown"
        assert process.returncode == 0
        # graceful_timeout (1 s) plus a second.
        assert took < 2.0, took
        nursery.cancel_scope.cancel()


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    from support import RawHTTP, chat_body

    env = {
        **ENV, "LOCAL_PROVIDER_PORT": "0", "LOCAL_PROVIDER_BRIDGE_URL": "ws://127.0.0.1:0",
        "LOCAL_PROVIDER_GRACEFUL_TIMEOUT": "60", "LOCAL_PROVIDER_ECHO_TOKENS": "100000", "LOCAL_PROVIDER_ECHO_DELAY_MS": "10",
    }
    async with trio.open_nursery() as nursery:
        server = await start_server_process(nursery, tmp_path, env, "--agent", "echo")
        process, url, key = server.process, server.url, server.key
        stream = await RawHTTP.post(url, "/v1/chat/completions", chat_body(model="echo"), api_key=key)
        await stream.read_until(b'"content"')
        process.send_signal(signal.SIGINT)
        # Draining would wait up to 60 s for this answer; the second signal does not.
        await trio.sleep(0.5)
        assert process.returncode is None
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await process.wait()
        assert process.returncode == 0
        nursery.cancel_scope.cancel()


def test_an_allowed_non_loopback_bind_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from trioprovider.server import preflight
    from support import make_settings

    settings = make_settings(**{"provider.host": "0.0.0.0", "provider.allow_non_loopback": True, "mcp.bridge_url": "ws://0.0.0.0:0"})
    with caplog.at_level(logging.WARNING):
        preflight(settings, warn=False)  # the CLI's early check: silent
        preflight(settings)  # the server's, as it starts: loud, once
    warnings = [record.getMessage() for record in caplog.records if "LISTENING ON" in record.getMessage()]
    assert warnings == ["LISTENING ON 0.0.0.0: any machine that can reach it can try your API keys and bridge token"]


def test_a_serving_process_tunes_the_garbage_collector() -> None:
    # In a fresh interpreter: freezing this one would keep every test's garbage for good.
    probe = (
        "import gc; from trioprovider.server import GC_YOUNG_THRESHOLD, tune_gc; tune_gc(); "
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD and gc.get_freeze_count() > 1000, "
        "(gc.get_threshold(), gc.get_freeze_count()); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


async def test_sigterm_lets_a_standalone_agent_finish_its_answer_and_refuse_new_ones(tmp_path: Path) -> None:
    import httpx

    from support import RawHTTP, chat_body, sse_payloads

    env = {
        **ENV, "LOCAL_PROVIDER_PORT": "0", "LOCAL_PROVIDER_BRIDGE_URL": "ws://127.0.0.1:0",
        "LOCAL_PROVIDER_BRIDGE_TOKEN": "drain-test-token",
    }
    async with trio.open_nursery() as nursery:
        server = await start_server_process(nursery, tmp_path, env)
        agent = await nursery.start(
            lambda task_status: trio.run_process(
                # 200 tokens 10 ms apart: the answer outlasts the signal by about two seconds.
                [sys.executable, "-m", "trioprovider", "agent", "echo", "--bridge-url", server.bridge, "--tokens", "200", "--delay-ms", "10"],
                cwd=str(tmp_path), env=env, stderr=subprocess.PIPE, check=False, task_status=task_status,
            )
        )
        await read_output(agent.stderr, "registered with the bridge")
        stream = await RawHTTP.post(server.url, "/v1/chat/completions", chat_body("one two"), api_key=server.key)
        await stream.read_until(b'"content"')
        agent.send_signal(signal.SIGTERM)
        await read_output(agent.stderr, "taking no new ones")

        # While it drains, a new request is refused as the agent stopping, retryably (503).
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}) as client:
            refused = await client.post("/v1/chat/completions", content=chat_body("three", stream=False))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutdown"

        # The answer in flight runs to its end, then the agent exits on its own.
        with trio.fail_after(30):
            await stream.read_until(b"data: [DONE]")
            await agent.wait()
        assert agent.returncode == 0
        chunks = [json.loads(p) for p in sse_payloads(stream.received)[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == echo_text("one two", 200)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await server.process.wait()
