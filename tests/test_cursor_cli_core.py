"""The Cursor CLI agent's pure cores, without processes: event translation, prompts, chats."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from trioprovider.agents.cursor_cli.agent import (
    INSTALL_HINT,
    child_environment,
    cli_arguments,
    cursor_model,
    failure_text,
    resolve_command,
    scratch_workspace,
)
from trioprovider.agents.cursor_cli.events import (
    ChatStarted,
    EventTranslator,
    LineSplitter,
    ReasoningDelta,
    RunResult,
    TextDelta,
    ToolNote,
    note_text,
)
from trioprovider.agents.cursor_cli.prompt import ChatBook, render_completion, render_conversation
from trioprovider.agents.runner import AgentFailure
from trioprovider.protocol import Usage

S = "chat-1"


def line(**event: Any) -> str:
    return json.dumps({"session_id": S, **event})


def assistant(text: str, **extra: Any) -> str:
    return line(type="assistant", message={"role": "assistant", "content": [{"type": "text", "text": text}]}, **extra)


def delta(text: str) -> str:
    return assistant(text, timestamp_ms=1)


def tool(subtype: str, call: dict[str, Any]) -> str:
    return line(type="tool_call", subtype=subtype, call_id="c1", tool_call=call)


RESULT = line(
    type="result", subtype="success", is_error=False, result="Hello world. Done.", duration_ms=12,
    usage={"inputTokens": 100, "outputTokens": 20, "cacheReadTokens": 5, "cacheWriteTokens": 1},
)


def translate(lines: list[str]) -> tuple[list[object], EventTranslator]:
    translator = EventTranslator()
    events = [event for text in lines for event in translator.feed(text)]
    return events, translator


def texts(events: list[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_deltas_are_forwarded_and_both_kinds_of_repeat_are_skipped() -> None:
    events, translator = translate(
        [
            line(type="system", subtype="init", model="gpt-5"),
            line(type="user", message={"role": "user", "content": [{"type": "text", "text": "hi"}]}),
            delta("Hello"),
            delta(" world."),
            assistant("Hello world.", timestamp_ms=2, model_call_id="m1"),  # flush before a tool call
            tool("started", {"readToolCall": {"args": {"path": "a.py"}}}),
            tool("completed", {"readToolCall": {"args": {"path": "a.py"}, "result": {"success": {}}}}),
            delta(" Done."),
            assistant(" Done."),  # flush at the end of the turn
            RESULT,
        ]
    )
    assert texts(events) == "Hello world. Done."
    assert translator.text == "Hello world. Done."
    assert events[0] == ChatStarted(S, "gpt-5")
    assert translator.chat_id == S
    result = events[-1]
    assert isinstance(result, RunResult) and not result.is_error and result.duration_ms == 12
    assert result.usage == Usage(prompt_tokens=106, completion_tokens=20, total_tokens=126)


def test_without_deltas_the_whole_segments_are_the_answer() -> None:
    events, _ = translate(
        [assistant("Part one. ", model_call_id="m1"), tool("started", {"shellToolCall": {"args": {"command": "ls"}}}), assistant("Part two."), RESULT]
    )
    assert texts(events) == "Part one. Part two."


def test_the_result_text_is_the_answer_when_nothing_else_came() -> None:
    events, translator = translate([line(type="system", subtype="init"), RESULT])
    assert texts(events) == "Hello world. Done."
    assert isinstance(events[-1], RunResult)
    # ...but never when text was already forwarded.
    events, _ = translate([delta("Hi"), RESULT])
    assert texts(events) == "Hi"


def test_thinking_becomes_reasoning() -> None:
    events, _ = translate(
        [
            line(type="thinking", subtype="delta", text="Let me "),
            line(type="thinking", subtype="delta", text="think."),
            line(type="thinking", subtype="completed"),
        ]
    )
    assert events == [ReasoningDelta("Let me "), ReasoningDelta("think.")]


def test_noise_is_ignored() -> None:
    events, _ = translate(
        ["", "   ", "Cursor Agent v1", "[1,2]", "{not json", '"text"', "null", b"\xff\xfe garbage", line(type="mystery", text="x"), delta("ok")]  # type: ignore[list-item]
    )
    assert events == [TextDelta("ok")]


def test_errors_and_what_comes_after_the_result() -> None:
    events, translator = translate([line(type="result", subtype="error", is_error=True, result="quota")])
    assert events == [RunResult(text="quota", is_error=True, subtype="error", duration_ms=None, usage=None)]
    assert translator.feed(delta("late")) == []
    events, _ = translate([line(type="result", subtype="error_max_turns", is_error=False)])
    assert isinstance(events[0], RunResult) and events[0].is_error


def test_tool_calls_become_notes_never_tool_calls() -> None:
    events, _ = translate(
        [
            tool("started", {"readToolCall": {"args": {"path": "src/a.py", "limit": 10}}}),
            tool("completed", {"readToolCall": {"args": {"path": "src/a.py"}, "result": {"success": {"content": "x"}}}}),
            tool("completed", {"editToolCall": {"args": {"path": "b"}, "result": {"error": {"errorMessage": "denied"}}}}),
            tool("started", {"function": {"name": "mcp_search", "arguments": '{"query": "trio nursery"}'}}),
            tool("started", {"weirdToolCall": {"args": {"n": 1}}}),
            tool("started", {"listToolCall": {"args": {}}}),
        ]
    )
    notes = [e for e in events if isinstance(e, ToolNote)]
    assert [(n.tool, n.phase, n.summary, n.failed) for n in notes] == [
        ("read", "started", "src/a.py", False),
        ("read", "completed", "src/a.py", False),
        ("edit", "completed", "denied", True),
        ("mcp_search", "started", "trio nursery", False),
        ("weird", "started", '{"n":1}', False),
        ("list", "started", "", False),
    ]
    assert [note_text(n) for n in notes] == [
        "[read: src/a.py]\n", "", "[edit failed: denied]\n", "[mcp_search: trio nursery]\n", '[weird: {"n":1}]\n', "[list]\n",
    ]
    events, _ = translate([tool("started", {"shellToolCall": {"args": {"command": "echo " + "x " * 500}}})])
    assert isinstance(events[0], ToolNote) and len(note_text(events[0])) < 150


def test_line_splitter_joins_pieces_and_drops_overlong_lines() -> None:
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b':1}\r\nshort\n') == [b'{"a":1}\r', b"short"]
    assert splitter.feed(b"x" * 25) == []  # too long already: dropped unread
    assert splitter.feed(b"yyy\nok\n") == [b"ok"]
    assert splitter.feed(b"0123456789AB\nend") == []
    assert splitter.dropped == 2
    assert splitter.close() == [b"end"]
    assert splitter.close() == []


def test_a_lone_user_message_is_the_prompt_itself() -> None:
    assert render_conversation([{"role": "user", "content": "fix the bug\n  in main.py"}]) == "fix the bug\n  in main.py"


def test_instructions_come_first_then_the_turns() -> None:
    prompt = render_conversation(
        [
            {"role": "user", "content": "q1"},
            {"role": "system", "content": "Be brief."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function", "function": {"name": "grep", "arguments": '{"q":"x"}'}}]},
            {"role": "tool", "tool_call_id": "t", "content": "found x"},
            {"role": "developer", "content": [{"type": "text", "text": "Use tabs."}]},
            {"role": "user", "content": "q2"},
        ]
    )
    assert prompt.index("Be brief.") < prompt.index("Use tabs.") < prompt.index("q1") < prompt.index("q2")
    assert prompt.startswith("# Instructions\n\nBe brief.\n\nUse tabs.")
    assert "## Tool result (t)\n\nfound x" in prompt
    assert "called grep with {\"q\":\"x\"}" in prompt
    assert prompt.endswith("Answer the last message above, as the assistant.")


def test_completion_prompts_mark_the_gap() -> None:
    fim = render_completion("def f(", "):\n    pass")
    assert fim.endswith("def f(<|fill-here|>):\n    pass")
    assert "only" in fim
    assert render_completion("Once upon", None).endswith("\n\nOnce upon")


def conversation(*turns: str) -> list[dict[str, Any]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def test_a_continued_conversation_sends_only_its_new_turns() -> None:
    book = ChatBook()
    first = book.plan("s", conversation("q1"))
    assert first.chat_id is None and first.prompt == "q1"
    book.record("s", "chat-a", first.conversation, "a1")
    second = book.plan("s", [*conversation("q1", "a1 \n"), {"role": "user", "content": "q2"}, {"role": "user", "content": "q3"}])
    assert second.chat_id == "chat-a"
    assert second.prompt == "q2\n\nq3"
    book.record("s", "chat-a", second.conversation, "a2")
    assert book.plan("s", conversation("q1", "a1", "q2", "a2", "q4")).chat_id is None  # q3 went missing
    assert book.chats("s") == ["chat-a"]


@pytest.mark.parametrize(
    "messages",
    [
        conversation("q1", "another answer", "q2"),  # the answer was edited
        conversation("q1"),  # the same question again (a retry)
        conversation("q1", "a1"),  # nothing new
        [*conversation("q1", "a1"), {"role": "tool", "tool_call_id": "x", "content": "r"}],
        [{"role": "system", "content": "new rules"}, *conversation("q1", "a1", "q2")],
    ],
)
def test_anything_but_an_extension_starts_a_new_chat(messages: list[dict[str, Any]]) -> None:
    book = ChatBook()
    book.record("s", "chat-a", book.plan("s", conversation("q1")).conversation, "a1")
    plan = book.plan("s", messages)
    assert plan.chat_id is None
    assert plan.prompt == render_conversation(messages)
    assert book.chats("s") == ["chat-a"]


def test_a_chat_in_use_is_not_handed_out_twice_and_sessions_are_apart() -> None:
    book = ChatBook()
    book.record("s", "chat-a", book.plan("s", conversation("q1")).conversation, "a1")
    follow_up = conversation("q1", "a1", "q2")
    assert book.plan("other", follow_up).chat_id is None
    assert book.plan("s", follow_up).chat_id == "chat-a"
    assert book.plan("s", follow_up).chat_id is None  # still being answered


def test_the_book_is_bounded() -> None:
    book = ChatBook(max_sessions=2, chats_per_session=2)
    for i in range(3):
        book.record("s", f"chat-{i}", book.plan("s", conversation(f"q{i}")).conversation, "a")
    assert book.chats("s") == ["chat-2", "chat-1"]
    book.record("t", "t1", (), "a")
    book.record("u", "u1", (), "a")
    assert book.chats("s") == [] and book.chats("t") == ["t1"] and book.chats("u") == ["u1"]


def test_command_line() -> None:
    argv = cli_arguments("/bin/cursor-agent", workspace="/w", model="sonnet-4", resume="c1", extra=["--force"])
    assert argv == [
        "/bin/cursor-agent", "-p", "--output-format", "stream-json", "--stream-partial-output", "--trust",
        "--model", "sonnet-4", "--workspace", "/w", "--resume", "c1", "--force",
    ]
    assert cli_arguments("agent", workspace="/w") == [
        "agent", "-p", "--output-format", "stream-json", "--stream-partial-output", "--trust", "--workspace", "/w",
    ]
    assert cursor_model("sonnet-4", ["sonnet-4"], "") == "sonnet-4"
    assert cursor_model("cursor-agent-local", ["sonnet-4"], "") is None
    assert cursor_model("cursor-agent-local", [], "gpt-5") == "gpt-5"


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_command_is_found_or_the_error_says_how_to_get_it(tmp_path: Path) -> None:
    newer, both, empty = tmp_path / "newer", tmp_path / "both", tmp_path / "empty"
    for directory in (newer, both, empty):
        directory.mkdir()
    executable(newer / "agent")
    executable(both / "agent")
    executable(both / "cursor-agent")
    assert resolve_command("", path=str(newer)) == str(newer / "agent")
    assert resolve_command("", path=str(both)) == str(both / "cursor-agent")
    assert resolve_command("agent", path=str(both)) == str(both / "agent")
    assert resolve_command(str(newer / "agent")) == str(newer / "agent")
    with pytest.raises(AgentFailure) as missing:
        resolve_command("", path=str(empty))
    assert missing.value.code == "cursor_cli_not_found"
    assert "'cursor-agent' nor 'agent'" in missing.value.message and INSTALL_HINT in missing.value.message
    (tmp_path / "plain").write_text("not a program")
    for configured in (str(tmp_path / "plain"), str(tmp_path / "absent")):
        with pytest.raises(AgentFailure, match="not an executable file.*--command"):
            resolve_command(configured)
    with pytest.raises(AgentFailure, match="'cursor' is not on PATH"):
        resolve_command("cursor", path=str(empty))


def test_the_child_gets_no_trioprovider_settings() -> None:
    env = child_environment({"PATH": "/bin", "LOCAL_PROVIDER_BRIDGE_TOKEN": "secret", "CURSOR_API_KEY": "k"})
    assert env == {"PATH": "/bin", "CURSOR_API_KEY": "k"}


def test_the_scratch_workspace_is_private(tmp_path: Path) -> None:
    path = scratch_workspace(tmp_path)
    assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert scratch_workspace(tmp_path) == path
    path.chmod(0o755)  # as if another user had made it first, open to all
    with pytest.raises(AgentFailure, match="not a private directory"):
        scratch_workspace(tmp_path)
    path.rmdir()
    os.symlink(tmp_path, path)
    with pytest.raises(AgentFailure):
        scratch_workspace(tmp_path)


def test_failure_text_is_plain_and_short() -> None:
    assert failure_text("\x1b[31mError:\x1b[0m not logged in\n") == "Error: not logged in"
    tail = failure_text("x" * 5000 + "the end", limit=100)
    assert tail.endswith("the end") and len(tail) == 101
