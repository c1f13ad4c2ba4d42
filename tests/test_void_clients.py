"""VoidEditor's own npm clients (openai@4.96.0, ollama@0.5.15) against the live server, via Node.

``.ci/run`` installs them (``npm ci`` in tests/node); the test fails, not skips, without them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import trio

from support import API_KEY, make_settings, start_server
from trioprovider.agents.echo import echo_text

NODE_DIR = Path(__file__).parent / "node"


async def test_void_clients_read_what_void_expects(nursery: trio.Nursery) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for the VoidEditor client tests"
    assert (NODE_DIR / "node_modules" / "openai").exists(), "run 'npm ci' in tests/node (.ci/run does)"
    running = await start_server(nursery, make_settings(**{"ollama.listen": "127.0.0.1:0", "agents.echo.tokens": 4}), agents=("echo",))
    env = {**os.environ, "PROVIDER_URL": running.provider_url, "API_KEY": API_KEY, "OLLAMA_URL": running.ollama_url or ""}
    with trio.fail_after(60):
        result = await trio.run_process([node, "void_clients.mjs"], cwd=NODE_DIR, env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    tool = seen["toolChat"]
    assert tool["name"] == "read_file" and tool["args"] == {"text": "open main.py"}
    assert tool["finish"] == "tool_calls" and tool["indexes"] == [0] and tool["id"].startswith("call_")
    assert seen["chat"] == echo_text("hello void", 4)
    assert seen["fim"] == echo_text("def add(a, b):", 4)
    assert seen["wrongKey"] == {"status": 401, "isAuthError": True}
    assert set(seen["tags"]) == {"echo", "cursor-agent-local"}
    fim = seen["ollamaFim"]
    assert fim["response"] == echo_text("const x = ", 4)
    assert fim["done"] is True and fim["evalCount"] == 4 and fim["totalDuration"] >= 0
    assert seen["noopChat"] == echo_text("via ollama", 4)
    running.shutdown.set()
