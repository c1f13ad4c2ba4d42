#!/usr/bin/env python3
"""A stand-in for Cursor's headless CLI (``cursor-agent``), for tests. Standard library only.

Run as ``fake_cursor_agent.py -p --output-format stream-json --stream-partial-output --trust
[--model M] [--workspace DIR] [--resume CHAT]`` with the prompt on stdin (read to end of file),
or ``fake_cursor_agent.py create-chat``. It writes ``stream-json`` events the way the real CLI
does: deltas and their repeated flushes, thinking, a tool call, noise lines.

Its behaviour comes from ``[[mode:NAME]]`` in the prompt, else ``$FAKE_CURSOR_MODE``:

- ``answer`` (default): thinks, says a sentence, reads a file, answers ``You said: <the
  prompt's last line>``, reports usage, exits 0;
- ``no_partial``: the same answer without deltas (whole segments only);
- ``tool_fail``: the tool call fails;
- ``crash``: a few words, then a message on stderr and exit status 3, without a result;
- ``silent``: exits 0 and says nothing;
- ``error_result``: a ``result`` with ``is_error``;
- ``linger``: answers, then keeps running;
- ``stubborn``: answers, then keeps running and ignores SIGTERM;
- ``slow``: starts a helper process in its group, then says ``tick`` forever.

``$FAKE_CURSOR_LOG`` names a file that gets one JSON line per run (argv, prompt, cwd, pid,
whether LOCAL_PROVIDER_* variables were passed on); ``$FAKE_CURSOR_PIDFILE`` one that gets the
pid of every run. ``$FAKE_CURSOR_NO_CREATE_CHAT`` makes ``create-chat`` fail (older CLIs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

SEGMENT_ONE = "Reading the file first.\n"
THINKING = ["Let me", " look at", " this."]
USAGE = {"inputTokens": 120, "outputTokens": 30, "cacheReadTokens": 7, "cacheWriteTokens": 3}


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def noise(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def log_run(record: dict) -> None:
    path = os.environ.get("FAKE_CURSOR_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def create_chat() -> int:
    if os.environ.get("FAKE_CURSOR_NO_CREATE_CHAT"):
        log_run({"create_chat": None})
        print("error: unknown command 'create-chat'", file=sys.stderr)
        return 1
    chat = str(uuid.uuid4())
    log_run({"create_chat": chat})
    print(chat)
    return 0


def parse(argv: list[str]) -> tuple[set[str], dict[str, str], list[str]]:
    flags: set[str] = set()
    options: dict[str, str] = {}
    positional: list[str] = []
    with_value = {"--output-format", "--model", "--workspace", "--resume"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in with_value:
            options[arg] = argv[i + 1]
            i += 2
            continue
        if arg.startswith("-"):
            flags.add(arg)
        else:
            positional.append(arg)
        i += 1
    return flags, options, positional


def main(argv: list[str]) -> int:
    if argv[:1] == ["create-chat"]:
        return create_chat()
    flags, options, positional = parse(argv)
    if "-p" not in flags and "--print" not in flags:
        print("error: no terminal: run with -p for headless use", file=sys.stderr)
        return 2
    if "--trust" not in flags:
        print(
            "Workspace Trust Required: this workspace is not trusted. Pass --trust to trust it in "
            "headless mode.",
            file=sys.stderr,
        )
        return 1
    if options.get("--output-format") != "stream-json":
        print("error: this stand-in only speaks stream-json", file=sys.stderr)
        return 2
    prompt = positional[-1] if positional else sys.stdin.read()
    pidfile = os.environ.get("FAKE_CURSOR_PIDFILE")
    found = re.search(r"\[\[mode:(\w+)\]\]", prompt)
    mode = found.group(1) if found else os.environ.get("FAKE_CURSOR_MODE", "answer")
    log_run(
        {
            "argv": argv,
            "prompt": prompt,
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "mode": mode,
            "leaked_env": sorted(name for name in os.environ if name.startswith("LOCAL_PROVIDER_")),
        }
    )
    if mode == "slow":
        # A helper in the same process group, as Cursor's own shells and servers are.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if pidfile:
        with open(pidfile, "a", encoding="utf-8") as file:
            file.write(f"{os.getpid()}\n")

    session = options.get("--resume") or str(uuid.uuid4())
    partial = "--stream-partial-output" in flags and mode != "no_partial"
    last_line = next((line for line in reversed(prompt.strip().splitlines()) if line.strip()), "")
    segment_two = f"You said: {last_line}"
    clock = [1_760_000_000_000]

    def stamp() -> int:
        clock[0] += 7
        return clock[0]

    def say(text: str) -> None:
        """One segment: deltas, when streaming partial output; the caller flushes."""
        if partial:
            for piece in pieces(text):
                emit({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": piece}]}, "session_id": session, "timestamp_ms": stamp()})

    def flush(text: str, *, before_tool: bool) -> None:
        event = {"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": text}]}, "session_id": session}
        if partial and before_tool:
            event["timestamp_ms"] = stamp()
            event["model_call_id"] = str(uuid.uuid4())
        emit(event)

    noise("Cursor Agent (stand-in) starting")
    emit({"type": "system", "subtype": "init", "apiKeySource": "login", "cwd": os.getcwd(), "session_id": session, "model": options.get("--model", "auto"), "permissionMode": "default"})
    emit({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": prompt}]}, "session_id": session})

    if mode == "silent":
        return 0
    if mode == "crash":
        say("Starting to")
        print("Error: lost the connection to Cursor (stand-in)", file=sys.stderr)
        return 3
    if mode == "error_result":
        emit({"type": "result", "subtype": "error", "is_error": True, "duration_ms": 5, "result": "Usage limit reached (stand-in)", "session_id": session})
        return 1
    if mode == "slow":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            say("tick ")
            time.sleep(0.05)

    for piece in THINKING:
        emit({"type": "thinking", "subtype": "delta", "text": piece, "session_id": session, "timestamp_ms": stamp()})
    emit({"type": "thinking", "subtype": "completed", "session_id": session, "timestamp_ms": stamp()})
    say(SEGMENT_ONE)
    flush(SEGMENT_ONE, before_tool=True)
    call = {"readToolCall": {"args": {"path": "notes.txt"}}}
    emit({"type": "tool_call", "subtype": "started", "call_id": "call-1", "tool_call": call, "session_id": session, "timestamp_ms": stamp()})
    noise("[stand-in] reading notes.txt")
    if mode == "tool_fail":
        call["readToolCall"]["result"] = {"error": {"errorMessage": "File not found: notes.txt"}}
    else:
        call["readToolCall"]["result"] = {"success": {"content": "a\nb\nc\n", "totalLines": 3}}
    emit({"type": "tool_call", "subtype": "completed", "call_id": "call-1", "tool_call": call, "session_id": session, "timestamp_ms": stamp()})
    say(segment_two)
    flush(segment_two, before_tool=False)
    emit({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 1234, "duration_api_ms": 1000, "result": SEGMENT_ONE + segment_two, "session_id": session, "request_id": "req-1", "usage": USAGE})

    if mode in ("linger", "stubborn"):
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
