"""The Cursor CLI agent through the real server, driving a stand-in CLI as real processes.

The stand-in (``tests/fake_cursor_agent.py``) writes the events the real CLI does, with their
repeated flushes, thinking, a tool call and noise lines; it logs how it was run and its pid
(which is its process group id: every run gets its own group).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from support import BRIDGE_TOKEN, RawHTTP, chat_body, in_thread, make_settings, openai_client, sse_payloads, start_server
from trioprovider.agents.cursor_cli.process import group_alive

FAKE = Path(__file__).parent / "fake_cursor_agent.py"
ANSWER = "Reading the file first.\nYou said: {}"
REASONING = "Let me look at this.\n[read: notes.txt]\n"


@dataclass
class FakeCli:
    command: Path
    workspace: Path
    log_path: Path
    pid_path: Path

    def runs(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def pids(self) -> list[int]:
        if not self.pid_path.exists():
            return []
        return [int(line) for line in self.pid_path.read_text().split()]

    def settings(self, **extra: Any) -> Any:
        return make_settings(
            **{
                "agents.cursor_cli.command": str(self.command),
                "agents.cursor_cli.workspace": str(self.workspace),
                "agents.cursor_cli.models": ["fake-sonnet"],
                "agents.cursor_cli.kill_grace": 0.5,
                **extra,
            }
        )


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCli:
    # A wrapper, as an installed CLI is: a program on its own (the stand-in is a Python script).
    command = tmp_path / "bin" / "cursor-agent"
    command.parent.mkdir()
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    command.chmod(0o755)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    fake = FakeCli(command, workspace, tmp_path / "runs.jsonl", tmp_path / "pids")
    monkeypatch.setenv("FAKE_CURSOR_LOG", str(fake.log_path))
    monkeypatch.setenv("FAKE_CURSOR_PIDFILE", str(fake.pid_path))
    monkeypatch.setenv("LOCAL_PROVIDER_BRIDGE_TOKEN", "must-not-reach-cursor")
    return fake


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def deltas(raw: bytes) -> list[dict[str, Any]]:
    chunks = [json.loads(p) for p in sse_payloads(raw) if p != b"[DONE]"]
    return [c["choices"][0]["delta"] for c in chunks if c.get("choices")]


def killpg_finds_nothing(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def all_gone(pids: list[int]) -> bool:
    return all(not group_alive(pid) for pid in pids)


async def test_streamed_answer_arrives_once_with_reasoning_and_usage(fake_cli: FakeCli) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        body = chat_body("hello there", model="cursor-agent-local", stream_options={"include_usage": True})
        raw = await (await RawHTTP.post(running.provider_url, "/v1/chat/completions", body)).read_all()
        payloads = sse_payloads(raw)
        assert payloads[-1] == b"[DONE]"
        got = deltas(raw)
        assert "".join(d.get("content") or "" for d in got) == ANSWER.format("hello there")
        assert len([d for d in got if d.get("content")]) > 3  # it streamed, in pieces
        assert "".join(d.get("reasoning_content") or "" for d in got) == REASONING
        assert not any("tool_calls" in d for d in got)  # Cursor ran the tool itself
        usage = json.loads(payloads[-2])["usage"]
        assert usage == {"prompt_tokens": 130, "completion_tokens": 30, "total_tokens": 160}

        [run] = [r for r in fake_cli.runs() if "argv" in r]
        argv = run["argv"]
        for flag in ("-p", "--stream-partial-output", "--trust"):
            assert flag in argv
        assert argv[argv.index("--output-format") + 1] == "stream-json"
        assert argv[argv.index("--workspace") + 1] == str(fake_cli.workspace)
        assert "--model" not in argv  # no default Cursor model configured: Cursor's own
        assert run["cwd"] == str(fake_cli.workspace)
        assert run["prompt"] == "hello there"
        assert run["leaked_env"] == []
        await wait_until(lambda: all_gone(fake_cli.pids()), timeout=5)
        running.shutdown.set()


async def test_plain_answer_through_the_openai_client_with_a_listed_model(fake_cli: FakeCli) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        client = openai_client(running)
        models = {m.id for m in (await in_thread(client.models.list)).data}
        assert {"cursor-agent-local", "fake-sonnet"} <= models
        answer = await in_thread(
            client.chat.completions.create, model="fake-sonnet", messages=[{"role": "user", "content": "ping"}]
        )
        assert answer.choices[0].message.content == ANSWER.format("ping")
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens == 30
        argv = [r for r in fake_cli.runs() if "argv" in r][0]["argv"]
        assert argv[argv.index("--model") + 1] == "fake-sonnet"
        running.shutdown.set()


@pytest.mark.parametrize("create_chat", [True, False], ids=["create-chat", "id-from-init-event"])
async def test_a_conversation_continues_its_cursor_chat(fake_cli: FakeCli, create_chat: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not create_chat:
        monkeypatch.setenv("FAKE_CURSOR_NO_CREATE_CHAT", "1")
    system = {"role": "system", "content": "Answer in one line."}
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        client = openai_client(running)

        async def ask(messages: list[dict[str, Any]]) -> str:
            answer = await in_thread(client.chat.completions.create, model="cursor-agent-local", messages=messages)
            return str(answer.choices[0].message.content)

        turns: list[dict[str, Any]] = [system, {"role": "user", "content": "first question"}]
        first = await ask(turns)
        turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "second question"}]
        second = await ask(turns)
        assert second == ANSWER.format("second question")
        runs = [r for r in fake_cli.runs() if "argv" in r]
        created = [r["create_chat"] for r in fake_cli.runs() if r.get("create_chat")]
        assert len(runs) == 2
        assert "Answer in one line." in runs[0]["prompt"] and "first question" in runs[0]["prompt"]
        assert runs[1]["prompt"] == "second question"  # only the new turn: Cursor has the rest
        resumed = runs[1]["argv"][runs[1]["argv"].index("--resume") + 1]
        if create_chat:
            assert created and resumed == created[0]
            assert runs[0]["argv"][runs[0]["argv"].index("--resume") + 1] == created[0]
        else:
            assert "--resume" not in runs[0]["argv"]
            assert re.fullmatch(r"[0-9a-f-]{36}", resumed)

        # An edited history is not what the chat holds: a new chat gets all of it.
        edited = [*turns[:2], {"role": "assistant", "content": "something else"}, {"role": "user", "content": "third"}]
        await ask(edited)
        third = [r for r in fake_cli.runs() if "argv" in r][2]
        assert "--resume" not in third["argv"] or third["argv"][third["argv"].index("--resume") + 1] != resumed
        assert "something else" in third["prompt"] and "first question" in third["prompt"]
        attempts = [r["create_chat"] for r in fake_cli.runs() if "create_chat" in r]
        # One create-chat per new chat, or, where it fails, one attempt only.
        if create_chat:
            assert len(attempts) == 2 and attempts[0] == resumed and attempts[1] not in (None, resumed)
            assert third["argv"][third["argv"].index("--resume") + 1] == attempts[1]
        else:
            assert attempts == [None]
        running.shutdown.set()


async def test_fill_in_the_middle_is_one_fresh_run(fake_cli: FakeCli) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        client = openai_client(running)
        answer = await in_thread(
            client.completions.create, model="cursor-agent-local", prompt="def add(a, b):\n", suffix="\nprint(add(1, 2))", max_tokens=300
        )
        assert answer.choices[0].text == ANSWER.format("print(add(1, 2))")
        runs = fake_cli.runs()
        assert len(runs) == 1 and "--resume" not in runs[0]["argv"]  # no chat for a completion
        assert "def add(a, b):\n<|fill-here|>\nprint(add(1, 2))" in runs[0]["prompt"]
        running.shutdown.set()


@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        ("crash", "cursor_cli_failed", "failed (exit status 3): Error: lost the connection to Cursor (stand-in)"),
        ("silent", "cursor_cli_failed", "exited without a result"),
        ("error_result", "cursor_error", "Usage limit reached (stand-in)"),
    ],
)
async def test_failures_end_the_stream_with_an_error_record(fake_cli: FakeCli, mode: str, code: str, message: str) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        body = chat_body(f"please [[mode:{mode}]]", model="cursor-agent-local")
        raw = await (await RawHTTP.post(running.provider_url, "/v1/chat/completions", body)).read_all()
        payloads = sse_payloads(raw)
        assert payloads[-1] == b"[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == code and message in error["message"]
        # Not streamed: an error status with the same message.
        with pytest.raises(openai.APIStatusError) as raised:
            await in_thread(
                openai_client(running).chat.completions.create,
                model="cursor-agent-local", messages=[{"role": "user", "content": f"[[mode:{mode}]]"}],
            )
        assert raised.value.status_code == 502 and message in str(raised.value.message)
        await wait_until(lambda: all_gone(fake_cli.pids()), timeout=5)
        running.shutdown.set()


async def test_a_missing_cli_is_an_error_that_says_how_to_install_it(fake_cli: FakeCli, tmp_path: Path) -> None:
    settings = fake_cli.settings(**{"agents.cursor_cli.command": str(tmp_path / "nowhere" / "cursor-agent")})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("cursor-cli",))
        with pytest.raises(openai.APIStatusError) as raised:
            await in_thread(openai_client(running).chat.completions.create, model="cursor-agent-local", messages=[{"role": "user", "content": "hi"}])
        body = raised.value.body
        assert isinstance(body, dict) and body["code"] == "cursor_cli_not_found"
        assert "cursor.com/install" in body["message"] and "--command" in body["message"]
        running.shutdown.set()


@pytest.mark.parametrize("mode", ["linger", "stubborn"])
async def test_a_cli_that_keeps_running_after_its_result_is_ended(fake_cli: FakeCli, mode: str) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        answer = await in_thread(
            openai_client(running).chat.completions.create,
            model="cursor-agent-local", messages=[{"role": "user", "content": f"[[mode:{mode}]]\nhi"}],
        )
        assert answer.choices[0].message.content == ANSWER.format("hi")
        [pid] = fake_cli.pids()
        # The answer came once the group was ended: SIGTERM, or SIGKILL after the grace for one
        # that ignores SIGTERM.
        assert not group_alive(pid)
        running.shutdown.set()


async def test_a_client_disconnect_kills_the_process_group_within_a_second(fake_cli: FakeCli) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(), agents=("cursor-cli",))
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body("[[mode:slow]]", model="cursor-agent-local"))
        await http.read_until(b'"content":"tick')
        [pgid] = fake_cli.pids()
        assert group_alive(pgid)
        hung_up = await http.hang_up()
        await wait_until(lambda: not group_alive(pgid), timeout=10)
        elapsed = trio.current_time() - hung_up
        print(f"client disconnect -> process group gone in {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0
        # Its helper process too, by the kernel's own account (once PID 1 has reaped the zombie).
        await wait_until(lambda: killpg_finds_nothing(pgid), timeout=10)
        await wait_until(lambda: not running.provider.scopes)
        running.shutdown.set()


async def test_shutdown_ends_running_clis(fake_cli: FakeCli) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, fake_cli.settings(**{"provider.graceful_timeout": 0.2}), agents=("cursor-cli",))
        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body("[[mode:slow]]", model="cursor-agent-local"))
        await http.read_until(b'"content":"tick')
        [pgid] = fake_cli.pids()
        running.shutdown.set()
    assert not group_alive(pgid)


async def test_the_agent_as_its_own_process_ends_its_clis_on_sigterm(fake_cli: FakeCli, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_PROVIDER_")}
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"mcp.agent_wait_timeout": 30}))
        agent = await nursery.start(
            partial(
                trio.run_process,
                [
                    sys.executable, "-m", "trioprovider", "agent", "cursor-cli", "--bridge-url", running.bridge_url,
                    "--command", str(fake_cli.command), "--workspace", str(fake_cli.workspace), "--models", "fake-sonnet",
                ],
                cwd=str(tmp_path),
                env={**env, "LOCAL_PROVIDER_BRIDGE_TOKEN": BRIDGE_TOKEN},
                check=False,
            )
        )
        client = openai_client(running)
        answer = await in_thread(client.chat.completions.create, model="fake-sonnet", messages=[{"role": "user", "content": "standalone"}])
        assert answer.choices[0].message.content == ANSWER.format("standalone")

        http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body("[[mode:slow]]", model="fake-sonnet"))
        await http.read_until(b'"content":"tick')
        pgid = fake_cli.pids()[-1]
        agent.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await agent.wait()
        assert not group_alive(pgid)
        raw = await http.read_all()
        assert json.loads(sse_payloads(raw)[-2])["error"]["code"] == "agent_disconnected"
        running.shutdown.set()


def test_the_stand_in_refuses_to_run_without_trust(fake_cli: FakeCli) -> None:
    refused = subprocess.run(
        [str(fake_cli.command), "-p", "--output-format", "stream-json"], input="hi", capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "--trust" in refused.stderr and refused.stdout == ""
