"""The process log: formats, the request id on every line about a request, rotation, no prompts.

Pure parts first (formatters, filter, handler set-up, the access line), then a live server in
this process, then the real command (``python -m trioprovider --agent echo``) as a process with
a tiny rotation size, checked through the files it leaves under ``logs/``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from support import API_KEY, RawHTTP, chat_body, make_settings, start_server, wait_until
from trioprovider import logs
from trioprovider.config import LoggingSettings, load_settings

SECRET = "QUOKKA-prompt-5d1e-must-never-be-logged"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_PROVIDER_")}


def logging_settings(**values: Any) -> LoggingSettings:
    return load_settings(None, env={}, overrides={f"logging.{key}": value for key, value in values.items()}).logging


def record(message: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    line = logging.LogRecord("trioprovider.test", logging.INFO, __file__, 1, message, args or ("world",), None)
    line.__dict__.update(extra)
    return line


@pytest.fixture
def root_restored() -> Iterator[None]:
    """Whatever a test installs on the root logger is gone after it."""
    root = logging.getLogger()
    level = root.level
    yield
    logs.reset()
    root.setLevel(level)


# -- pure parts ------------------------------------------------------------------------------


def test_the_request_id_comes_from_the_context_or_an_explicit_extra() -> None:
    id_filter = logs.RequestIdFilter()
    outside = record()
    id_filter.filter(outside)
    assert outside.request_id is None and outside.request_tag == ""  # type: ignore[attr-defined]

    token = logs.current_request_id.set("req-in-context")
    try:
        inside = record()
        id_filter.filter(inside)
        explicit = record(**logs.about("req-explicit"))
        id_filter.filter(explicit)
    finally:
        logs.current_request_id.reset(token)
    assert inside.request_id == "req-in-context"  # type: ignore[attr-defined]
    assert inside.request_tag == " [req-in-context]"  # type: ignore[attr-defined]
    assert explicit.request_id == "req-explicit"  # type: ignore[attr-defined]


def test_json_lines_carry_message_id_extras_and_traceback_but_not_raw_arguments() -> None:
    formatter = logs.JsonFormatter()
    line = record("status %d", 200, request_id="abc", status=200, path="/v1/models")
    logs.RequestIdFilter().filter(line)
    data = json.loads(formatter.format(line))
    assert data["message"] == "status 200"
    assert data["level"] == "INFO" and data["logger"] == "trioprovider.test"
    assert data["request_id"] == "abc" and data["status"] == 200 and data["path"] == "/v1/models"
    assert data["time"].endswith("+00:00")
    assert "args" not in data and "request_tag" not in data and "msg" not in data

    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    data = json.loads(formatter.format(failed))
    assert "ValueError: boom" in data["exception"] and "request_id" not in data


def test_text_lines_show_the_request_id_only_when_there_is_one() -> None:
    formatter = logs.make_formatter(logging_settings())
    with_id, without = record(request_id="r1"), record()
    for line in (with_id, without):
        logs.RequestIdFilter().filter(line)
    assert re.search(r" INFO +trioprovider\.test \[r1\]: hello world$", formatter.format(with_id))
    assert re.search(r" INFO +trioprovider\.test: hello world$", formatter.format(without))


def test_text_lines_keep_loggings_time_format_formatted_once_a_second() -> None:
    formatter, standard = logs.make_formatter(logging_settings()), logging.Formatter(logs.TEXT_FORMAT)
    # Within one second, across its end, and back again: the cached text must never go stale.
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.5, 1_600_000_000.25, time.time()):
        line = record()
        line.created, line.msecs = created, int((created - int(created)) * 1000)
        assert formatter.formatTime(line) == standard.formatTime(line)
    assert formatter.formatTime(line, "%H") == standard.formatTime(line, "%H")


def test_a_second_handler_keeps_the_request_id_the_first_one_gave() -> None:
    line = record()
    token = logs.current_request_id.set("req-first")
    try:
        logs.RequestIdFilter().filter(line)
    finally:
        logs.current_request_id.reset(token)
    logs.RequestIdFilter().filter(line)
    assert line.request_id == "req-first" and line.request_tag == " [req-first]"  # type: ignore[attr-defined]


def test_each_process_has_its_own_file_beside_logging_file() -> None:
    settings = logging_settings(file="/var/log/tp/provider.log")
    assert logs.log_file(settings) == "/var/log/tp/provider.log"
    assert logs.log_file(settings, "bridge") == "/var/log/tp/bridge.log"
    assert logs.log_file(settings, "agent-echo") == "/var/log/tp/agent-echo.log"
    assert logs.log_file(logging_settings(file=""), "bridge") == ""


def test_the_access_line_has_no_query_string_and_says_when_the_client_left() -> None:
    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"token=s3cret", "client": ("127.0.0.1", 5000)}
    fields = logs.access_fields(scope, 200, 0.01234, "rid", complete=True)
    assert fields == {"client": "127.0.0.1", "method": "GET", "path": "/metrics", "status": 200, "duration_ms": 12.3, "request_id": "rid", "complete": True}
    assert logs.access_message(fields) == '127.0.0.1 "GET /metrics" 200 12.3ms'
    left = logs.access_fields({**scope, "client": None}, None, 1.5, None, complete=False)
    assert logs.access_message(left) == '- "GET /metrics" - 1500.0ms (client left)'
    assert "s3cret" not in json.dumps(fields)


def test_configure_replaces_its_handlers_and_closes_its_files(tmp_path: Path, root_restored: None) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    first = logs.configure(logging_settings(level="DEBUG"), str(tmp_path / "a.log"), io.StringIO())
    second = logs.configure(logging_settings(level="WARNING"), str(tmp_path / "b.log"), io.StringIO())
    assert root.handlers == [*before, *second]
    assert root.level == logging.WARNING
    assert all(getattr(handler, "stream", None) is None for handler in first if isinstance(handler, logging.FileHandler))
    assert logs.configure(logging_settings(console=False), "", io.StringIO()) == []
    logs.reset()
    assert root.handlers == before


def test_the_file_rotates_at_max_bytes_keeping_backup_count_private_files(tmp_path: Path, root_restored: None) -> None:
    file = tmp_path / "logs" / "provider.log"  # the directory is made on start
    logs.configure(logging_settings(max_bytes=600, backup_count=2, json=True), str(file), io.StringIO())
    log = logging.getLogger("trioprovider.test")
    for number in range(60):
        log.warning("line %03d of a log that must rotate", number)
    logs.reset()
    files = sorted(path.name for path in file.parent.iterdir())
    assert files == ["provider.log", "provider.log.1", "provider.log.2"]
    for path in file.parent.iterdir():
        assert 0 < path.stat().st_size <= 600
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert all(json.loads(line)["level"] == "WARNING" for line in path.read_text().splitlines())
    assert "line 059" in file.read_text()


# -- a live server in this process ------------------------------------------------------------


@pytest.fixture
def captured(root_restored: None) -> io.StringIO:
    """The JSON lines every logger writes through the real handlers, while a test runs."""
    stream = io.StringIO()
    logs.configure(logging_settings(level="DEBUG", json=True), "", stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_lines_about_a_request_carry_the_id_the_client_saw(captured: io.StringIO) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(
            nursery, make_settings(**{"logging.access_log": True, "agents.echo.delay_ms": 20}), agents=("echo",)
        )
        await wait_until(lambda: running.provider.bridge.agents())
        async with httpx.AsyncClient(base_url=running.provider_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            answer = await http.post("/v1/chat/completions", content=chat_body(SECRET, stream=False))
            assert answer.status_code == 200
            query = await http.get("/v1/models?secret=in-the-query")
        # A client that leaves mid-stream: the agent's cancel line is about its request too.
        raw = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(SECRET))
        head = await raw.read_until(b"data: ")
        left_id = re.search(rb"x-request-id: (\w+)", head, re.IGNORECASE).group(1).decode()  # type: ignore[union-attr]
        await raw.hang_up()
        await wait_until(lambda: any(line.get("complete") is False for line in json_lines(captured)))
        await wait_until(lambda: not running.provider.scopes)
        running.shutdown.set()

    # The test's own client (httpx) logs here too, URLs and headers included; the server's lines:
    lines = [line for line in json_lines(captured) if line["logger"].startswith("trioprovider")]
    request_id = answer.headers["x-request-id"]
    about_it = [line for line in lines if line.get("request_id") == request_id]
    assert {line["logger"] for line in about_it} >= {"trioprovider.access", "trioprovider.provider"}
    access = next(line for line in about_it if line["logger"] == "trioprovider.access")
    assert (access["method"], access["path"], access["status"], access["complete"]) == ("POST", "/v1/chat/completions", 200, True)
    models = next(line for line in lines if line.get("request_id") == query.headers["x-request-id"])
    assert models["path"] == "/v1/models" and "in-the-query" not in json.dumps(lines)
    about_left = {line["logger"] for line in lines if line.get("request_id") == left_id}
    assert about_left >= {"trioprovider.access", "trioprovider.provider", "trioprovider.agents.runner"}
    # Every line that names a request in its text carries that request's id.
    for line in lines:
        for named in (request_id, left_id):
            if named in line["message"]:
                assert line.get("request_id") == named, line
    assert SECRET not in captured.getvalue()


async def test_access_log_off_writes_no_access_lines(captured: io.StringIO) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"logging.access_log": False}))
        async with httpx.AsyncClient(base_url=running.provider_url) as http:
            assert (await http.get("/health")).status_code == 200
        running.shutdown.set()
    assert not [line for line in json_lines(captured) if line["logger"] == "trioprovider.access"]


# -- the real command, as a process ------------------------------------------------------------


async def run_provider_with_traffic(tmp_path: Path, config: str, env: dict[str, str]) -> tuple[dict[str, int], str]:
    """Start ``python -m trioprovider --agent echo`` in ``tmp_path``, send requests carrying
    SECRET, stop it with SIGTERM; the status each X-Request-Id got, and what it wrote on stderr."""
    (tmp_path / "provider.toml").write_text(config)
    env = {**ENV, "LOCAL_PROVIDER_API_KEY": API_KEY, "LOCAL_PROVIDER_ECHO_TOKENS": "6", **env}
    seen: dict[str, int] = {}
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    [sys.executable, "-m", "trioprovider", "--agent", "echo", "--config", "provider.toml"],
                    cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=stderr, check=False, task_status=task_status,
                )
            )
            banner = b""
            with trio.fail_after(60):
                while b"Ctrl+C" not in banner:
                    data = await process.stdout.receive_some(4096)
                    assert data, f"the server ended before its banner: {banner!r}"
                    banner += data
            url = re.search(rb"OpenAI API\s+(\S+)/v1", banner).group(1).decode()  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
                answers = []
                for number in range(12):
                    answers.append(await http.post("/v1/chat/completions", content=chat_body(f"{SECRET} {number}", stream=number % 2 == 0)))
                fim = {"model": "echo", "prompt": f"def {SECRET}():", "suffix": f"# {SECRET}", "max_tokens": 20}
                answers.append(await http.post("/v1/completions", json=fim))
                answers.append(await http.post("/api/chat", json={"model": "echo", "messages": [{"role": "user", "content": SECRET}]}))
                answers.append(await http.post("/v1/chat/completions", content=chat_body(SECRET, temperature=9)))
                answers.append(await http.post("/v1/chat/completions", content=chat_body(SECRET), headers={"Authorization": "Bearer wrong"}))
            assert [answer.status_code for answer in answers] == [200] * 14 + [400, 401]
            assert SECRET.split("-")[0] in answers[0].text  # the echo agent did get the prompt
            seen = {answer.headers["x-request-id"]: answer.status_code for answer in answers}
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()
            assert process.returncode == 0
    return seen, (tmp_path / "stderr.txt").read_text()


def assert_no_secret_under(directory: Path, stderr: str) -> None:
    files = [path for path in directory.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in stderr


async def test_the_command_rotates_json_lines_with_request_ids_and_no_prompt(tmp_path: Path) -> None:
    config = """
[provider]
port = 0
[mcp]
bridge_url = "ws://127.0.0.1:0"
[logging]
level = "DEBUG"
json = true
max_bytes = 1500
backup_count = 3
"""
    seen, stderr = await run_provider_with_traffic(tmp_path, config, {})
    log_dir = tmp_path / "logs"
    names = ["provider.log.3", "provider.log.2", "provider.log.1", "provider.log"]  # oldest first
    assert sorted(path.name for path in log_dir.glob("provider.log*")) == sorted(names)
    files = [log_dir / name for name in names]
    assert all(path.stat().st_size <= 1500 for path in files)
    lines = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])

    access = [line for line in lines if line["logger"] == "trioprovider.access"]
    assert access and all(line["request_id"] in seen and line["status"] == seen[line["request_id"]] for line in access)
    # The last requests were not rotated away: their access lines are there, with their ids.
    assert [line["status"] for line in access[-2:]] == [400, 401]
    for line in lines:
        if line.get("request_id") is not None:
            assert line["request_id"] in seen, line
        for request_id in seen:
            if request_id in line["message"]:
                assert line.get("request_id") == request_id, line
    assert any(line["logger"] == "trioprovider.provider" and line.get("request_id") in seen for line in lines)
    # The console has every line, the same JSON; the files keep the newest of them.
    console = [json.loads(line) for line in stderr.splitlines()]
    assert console[-len(lines):] == lines and len(console) > len(lines)
    assert_no_secret_under(log_dir, stderr)


async def test_the_command_with_text_lines_and_no_access_log(tmp_path: Path) -> None:
    config = """
[provider]
port = 0
[mcp]
bridge_url = "ws://127.0.0.1:0"
"""
    env = {"LOCAL_PROVIDER_ACCESS_LOG": "false", "LOCAL_PROVIDER_LOG_FILE": "logs/text.log", "LOCAL_PROVIDER_LOG_LEVEL": "debug"}
    seen, stderr = await run_provider_with_traffic(tmp_path, config, env)
    text = (tmp_path / "logs" / "text.log").read_text()
    assert not (tmp_path / "logs" / "provider.log").exists()
    assert "trioprovider.access" not in text and "trioprovider.access" not in stderr
    assert re.search(r"^\S+ \S+ INFO +trioprovider\.server: SIGTERM received: draining$", text, re.MULTILINE)
    tagged = re.findall(r" trioprovider\.provider \[(\w+)\]: model request", text)
    assert tagged and set(tagged) <= set(seen)
    assert text in stderr  # the same lines on the console
    assert_no_secret_under(tmp_path / "logs", stderr)


def test_a_log_file_that_cannot_be_written_stops_start_up_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, where the log directory should be")
    env = {**ENV, "LOCAL_PROVIDER_LOG_FILE": "blocker/provider.log", "LOCAL_PROVIDER_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "trioprovider"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "logging.file: cannot write blocker/provider.log" in result.stderr
