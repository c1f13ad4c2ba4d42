"""The Cursor CLI agent: each request is one run of Cursor's headless CLI.

Per request: pick the chat (:class:`~.prompt.ChatBook`), start ``cursor-agent -p --output-format
stream-json --stream-partial-output --trust ...`` in its own process group with the prompt on
stdin, translate its output lines (:class:`~.events.EventTranslator`) into stream chunks, and
end the process group when the ``result`` arrives, when the request is cancelled, or when the
agent shuts down. No process outlives its request.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

from trioprovider.agents.cursor_cli.events import (
    ChatStarted,
    CursorEvent,
    EventTranslator,
    LineSplitter,
    ReasoningDelta,
    RunResult,
    TextDelta,
    ToolNote,
    note_text,
)
from trioprovider.agents.cursor_cli.process import (
    TailBuffer,
    drain,
    feed,
    kill_group_now,
    terminate_group,
)
from trioprovider.agents.cursor_cli.prompt import ChatBook, ChatPlan, render_completion
from trioprovider.agents.runner import AgentFailure, AnswerStream, text_choice, usage_of
from trioprovider.config import CursorCliSettings
from trioprovider.protocol import ModelCard, ModelInvoke, ModelResult, Usage
from trioprovider.tokens import estimate_prompt_tokens, estimate_tokens

log = logging.getLogger(__name__)

#: What the CLI is called, newest name last; the first found on PATH is used.
COMMAND_NAMES = ("cursor-agent", "agent")
INSTALL_HINT = (
    "Install it with 'curl https://cursor.com/install -fsS | bash' and log in with "
    "'cursor-agent login', or point --command (agents.cursor_cli.command) at it."
)
#: How long a CLI that closed its output may take to exit before it is ended.
EXIT_WAIT = 5.0
#: How long ``create-chat`` may take.
CREATE_CHAT_TIMEOUT = 15.0
_CHAT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

ToolNotes = Literal["reasoning", "content", "off"]


def resolve_command(configured: str, path: str | None = None) -> str:
    """The CLI to run: ``configured`` (a path, or a name looked up on PATH), else the first of
    :data:`COMMAND_NAMES` on PATH. Raises :class:`AgentFailure` saying how to fix it."""
    if configured:
        if os.sep in configured:
            if os.path.isfile(configured) and os.access(configured, os.X_OK):
                return configured
            raise AgentFailure(
                "cursor_cli_not_found", f"Cursor CLI {configured!r} is not an executable file. {INSTALL_HINT}"
            )
        found = shutil.which(configured, path=path)
        if found is None:
            raise AgentFailure("cursor_cli_not_found", f"Cursor CLI {configured!r} is not on PATH. {INSTALL_HINT}")
        return found
    for name in COMMAND_NAMES:
        found = shutil.which(name, path=path)
        if found is not None:
            return found
    raise AgentFailure(
        "cursor_cli_not_found",
        f"Cursor CLI not found: neither {' nor '.join(repr(n) for n in COMMAND_NAMES)} is on PATH. {INSTALL_HINT}",
    )


def cli_arguments(
    command: str,
    *,
    workspace: str,
    model: str | None = None,
    resume: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one run; the prompt goes on stdin (no argument-length limit)."""
    argv = [command, "-p", "--output-format", "stream-json", "--stream-partial-output", "--trust"]
    if model:
        argv += ["--model", model]
    argv += ["--workspace", workspace]
    if resume:
        argv += ["--resume", resume]
    return argv + list(extra)


def cursor_model(requested: str, listed: Sequence[str], default: str) -> str | None:
    """The ``--model`` for a request: a model the user listed is a Cursor model name and passed
    through; any other name (the provider's default model) gets the configured default."""
    if requested in listed:
        return requested
    return default or None


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The CLI's environment: ours without trioprovider's own settings. Cursor runs shell tools
    an LLM chooses; the bridge token and API keys are none of their business."""
    return {name: value for name, value in environ.items() if not name.startswith("LOCAL_PROVIDER_")}


def scratch_workspace(base: Path | None = None) -> Path:
    """The default workspace: a directory only this user can enter, the same across runs so
    that continued chats find what they left there."""
    path = (base or Path(tempfile.gettempdir())) / f"trioprovider-cursor-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    # Someone else may have made it first (a shared /tmp): never work in their directory.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise AgentFailure(
            "cursor_cli_misconfigured",
            f"the scratch workspace {path} is not a private directory of this user; "
            "set agents.cursor_cli.workspace (--workspace) to a directory of yours",
        )
    return path


def failure_text(stderr: str, limit: int = 1000) -> str:
    """What the CLI said on stderr, for an error message: colour codes out, the end kept."""
    text = _ANSI.sub("", stderr).strip()
    return text if len(text) <= limit else "…" + text[-limit:]


@dataclass
class _Answer:
    """What one run has sent so far, as the client saw it."""

    content: list[str] = field(default_factory=list)
    reasoning_ends_line: bool = True
    content_ends_line: bool = True

    @property
    def text(self) -> str:
        return "".join(self.content)


class CursorCliAgent:
    """Serves requests with Cursor's headless CLI, one process group per request."""

    def __init__(
        self,
        *,
        command: str = "",
        workspace: str = "",
        models: Sequence[str] = ("cursor-agent-local",),
        listed_models: Sequence[str] = (),
        model: str = "",
        max_concurrency: int = 4,
        kill_grace: float = 2.0,
        tool_notes: ToolNotes = "reasoning",
        extra_args: Sequence[str] = (),
        agent_id: str = "cursor-cli",
    ) -> None:
        self.agent_id = agent_id
        self.command = command
        self.workspace = workspace
        self.listed_models = list(listed_models)
        self.default_model = model
        self.max_concurrency = max_concurrency
        self.kill_grace = kill_grace
        self.tool_notes: ToolNotes = tool_notes
        self.extra_args = list(extra_args)
        names = list(dict.fromkeys([*models, *listed_models]))
        self.models = [
            ModelCard(id=name, context_window=200_000, supports_tools=False, supports_fim=True) for name in names
        ]
        self.chats = ChatBook()
        #: False once ``create-chat`` has failed: older CLIs lack it, and asking again costs a run.
        self.create_chat_works = True

    async def answer(self, invoke: ModelInvoke, out: AnswerStream) -> ModelResult:
        command = resolve_command(self.command)
        workspace = self._workspace()
        chat = invoke.kind == "chat"
        if chat:
            plan = self.chats.plan(invoke.session_id, invoke.messages or [])
        else:
            plan = ChatPlan(None, render_completion(invoke.prompt or "", invoke.suffix), ())
        chat_id = plan.chat_id
        if chat and chat_id is None and self.create_chat_works:
            chat_id = await self._create_chat(command, workspace)
            self.create_chat_works = chat_id is not None
        argv = cli_arguments(
            command,
            workspace=workspace,
            model=cursor_model(invoke.model, self.listed_models, self.default_model),
            resume=chat_id,
            extra=self.extra_args,
        )
        log.debug("cursor-cli: request %s runs %s", invoke.id, argv)
        translator = EventTranslator()
        answer = _Answer()
        result = await self._run(argv, plan.prompt.encode("utf-8", "surrogatepass"), workspace, translator, answer, out)
        if result.is_error:
            detail = result.text or result.subtype
            raise AgentFailure("cursor_error", f"Cursor ended the run with an error: {detail}")
        if chat:
            kept = translator.chat_id or chat_id
            if kept:
                self.chats.record(invoke.session_id, kept, plan.conversation, answer.text)
        return self._result(invoke, plan.prompt, answer.text, result.usage)

    def _workspace(self) -> str:
        if not self.workspace:
            return str(scratch_workspace())
        path = Path(self.workspace).expanduser()
        if not path.is_dir():
            raise AgentFailure(
                "cursor_cli_misconfigured",
                f"the Cursor workspace {str(path)!r} is not a directory (agents.cursor_cli.workspace, --workspace)",
            )
        return str(path.resolve())

    async def _create_chat(self, command: str, workspace: str) -> str | None:
        """A new chat id from ``create-chat``; None if that does not work (then the run starts a
        chat of its own and its ``init`` event says which)."""
        with trio.move_on_after(CREATE_CHAT_TIMEOUT):
            try:
                done = await trio.run_process(
                    [command, "create-chat"],
                    stdin=b"",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    cwd=workspace,
                    env=child_environment(os.environ),
                    start_new_session=True,
                    deliver_cancel=kill_group_now,
                )
            except OSError as error:
                raise AgentFailure("cursor_cli_not_found", f"cannot run {command!r}: {error}. {INSTALL_HINT}") from None
            lines = done.stdout.decode("utf-8", "replace").split()
            if done.returncode == 0 and lines and _CHAT_ID.match(lines[-1]):
                return lines[-1]
            log.warning(
                "cursor-cli: '%s create-chat' gave no chat id (exit %s): %s",
                command, done.returncode, failure_text(done.stderr.decode("utf-8", "replace"), 200),
            )
            return None
        log.warning("cursor-cli: '%s create-chat' took over %ss", command, CREATE_CHAT_TIMEOUT)
        return None

    async def _run(
        self,
        argv: list[str],
        prompt: bytes,
        workspace: str,
        translator: EventTranslator,
        answer: _Answer,
        out: AnswerStream,
    ) -> RunResult:
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workspace,
                env=child_environment(os.environ),
                start_new_session=True,
            )
        except OSError as error:
            raise AgentFailure("cursor_cli_not_found", f"cannot run {argv[0]!r}: {error}. {INSTALL_HINT}") from None
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        stderr = TailBuffer()
        stderr_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed, process.stdin, prompt)
                nursery.start_soon(drain, process.stderr, stderr, stderr_done)
                result = await self._read(process.stdout, translator, answer, out)
                if result is None:
                    # The output ended without a result: let the CLI exit and finish saying why.
                    with trio.move_on_after(EXIT_WAIT):
                        await process.wait()
                        await stderr_done.wait()
                nursery.cancel_scope.cancel()
            exit_status = process.poll()
        finally:
            with trio.move_on_after(self.kill_grace + 2.0, shield=True):
                await terminate_group(process, self.kill_grace)
            for stream in (process.stdin, process.stdout, process.stderr):
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        if result is not None:
            return result
        said = failure_text(stderr.text())
        name = Path(argv[0]).name
        if exit_status is None:
            problem = f"{name} closed its output without a result and did not exit"
        elif exit_status == 0:
            problem = f"{name} exited without a result"
        else:
            problem = f"{name} failed (exit status {exit_status})"
        raise AgentFailure("cursor_cli_failed", f"{problem}: {said}" if said else f"{problem}.")

    async def _read(
        self, stdout: trio.abc.ReceiveStream, translator: EventTranslator, answer: _Answer, out: AnswerStream
    ) -> RunResult | None:
        """Forward events until the ``result`` (returned) or the end of the output (None)."""
        lines = LineSplitter()
        while True:
            data = await stdout.receive_some(65536)
            batch = lines.feed(data) if data else lines.close()
            for line in batch:
                for event in translator.feed(line):
                    if isinstance(event, RunResult):
                        return event
                    await self._forward(event, answer, out)
            if not data:
                if lines.dropped:
                    log.warning("cursor-cli: dropped %d over-long output lines", lines.dropped)
                return None

    async def _forward(self, event: CursorEvent, answer: _Answer, out: AnswerStream) -> None:
        if isinstance(event, TextDelta):
            answer.content.append(event.text)
            answer.content_ends_line = event.text.endswith("\n")
            await out.text(event.text)
        elif isinstance(event, ReasoningDelta):
            answer.reasoning_ends_line = event.text.endswith("\n")
            await out.reasoning(event.text)
        elif isinstance(event, ToolNote):
            text = note_text(event)
            if not text or self.tool_notes == "off":
                return
            if self.tool_notes == "content":
                text = ("" if answer.content_ends_line else "\n") + text
                answer.content.append(text)
                answer.content_ends_line = True
                await out.text(text)
            else:
                text = ("" if answer.reasoning_ends_line else "\n") + text
                answer.reasoning_ends_line = True
                await out.reasoning(text)
        elif isinstance(event, ChatStarted):
            log.debug("cursor-cli: chat %s (model %s)", event.chat_id, event.model)

    @staticmethod
    def _result(invoke: ModelInvoke, prompt: str, text: str, usage: Usage | None) -> ModelResult:
        if usage is None:
            prompt_tokens = estimate_prompt_tokens(invoke.messages, invoke.prompt) or estimate_tokens(prompt)
            usage = usage_of(prompt_tokens, estimate_tokens(text))
        return ModelResult(id=invoke.id, choices=[text_choice(invoke, text)], usage=usage)


def make_cursor_cli_agent(settings: CursorCliSettings, default_model: str) -> CursorCliAgent:
    """The agent as configured by an ``[agents.cursor_cli]`` section."""
    return CursorCliAgent(
        command=settings.command,
        workspace=settings.workspace,
        models=[default_model],
        listed_models=settings.models,
        model=settings.model,
        max_concurrency=settings.max_concurrency,
        kill_grace=settings.kill_grace,
        tool_notes=settings.tool_notes,
        extra_args=settings.extra_args,
    )

