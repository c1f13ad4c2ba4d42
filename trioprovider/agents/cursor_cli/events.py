"""Cursor CLI ``stream-json`` output → what the agent forwards. Pure: no I/O, no clocks.

``cursor-agent -p --output-format stream-json --stream-partial-output`` writes one JSON event per
line, each with ``type`` and ``session_id``:

- ``system`` (``subtype`` ``init``): the chat id (``session_id``) and model;
- ``user``: the prompt, echoed (ignored);
- ``thinking``: ``subtype`` ``delta`` with ``text``, then ``completed``;
- ``assistant``: ``message.content[].text``, in three flavours (see :class:`EventTranslator`);
- ``tool_call``: ``subtype`` ``started``/``completed``, ``call_id``, and ``tool_call`` holding one
  key such as ``readToolCall`` with ``args`` and, once completed, ``result``;
- ``result``: ``subtype`` ``success``, ``is_error``, ``result`` (the whole answer), ``duration_ms``,
  ``usage`` (``inputTokens``, ``outputTokens``, ``cacheReadTokens``, ``cacheWriteTokens``).

Lines that are not JSON objects turn up too (warnings, progress); they are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from trioprovider.protocol import Usage

#: A line longer than this is dropped unread: it can only be a tool result (a whole file, say),
#: never text to forward, and keeping it would let one event take unbounded memory.
MAX_LINE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChatStarted:
    """The ``system``/``init`` event: which Cursor chat this run belongs to."""

    chat_id: str
    model: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolNote:
    """A tool Cursor ran itself. Shown to the user as a note, never as an OpenAI tool call
    (that would ask the client to run it again)."""

    call_id: str
    tool: str
    phase: str  # "started" or "completed"
    summary: str
    failed: bool = False


@dataclass(frozen=True, slots=True)
class RunResult:
    """The ``result`` event: the run is over (though the process may linger)."""

    text: str
    is_error: bool
    subtype: str
    duration_ms: int | None
    usage: Usage | None


CursorEvent = Union[ChatStarted, TextDelta, ReasoningDelta, ToolNote, RunResult]


class EventTranslator:
    """Turns the CLI's output lines into :data:`CursorEvent` s, forwarding every text once.

    With ``--stream-partial-output`` an ``assistant`` event is one of:

    - ``timestamp_ms`` without ``model_call_id``: a delta (new text) → forwarded;
    - ``timestamp_ms`` and ``model_call_id``: the segment before a tool call, repeated → skipped;
    - neither: the segment at the end of the turn, repeated → skipped.

    A CLI that streams no deltas at all (older versions, or without the flag) only sends whole
    segments, so those are forwarded until the first delta is seen. If no text came at all, the
    ``result`` text is forwarded before the result.
    """

    def __init__(self) -> None:
        self.saw_delta = False
        self.chat_id: str | None = None
        #: Everything forwarded as text (the answer, as the client saw it).
        self.text_parts: list[str] = []
        self.finished = False

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def feed(self, line: bytes | str) -> list[CursorEvent]:
        """The events of one output line (without its newline)."""
        if self.finished:
            return []
        event = parse_line(line)
        if event is None:
            return []
        events: list[CursorEvent] = []
        session = event.get("session_id")
        if isinstance(session, str) and session and self.chat_id is None:
            self.chat_id = session
        kind = event.get("type")
        if kind == "system" and event.get("subtype", "init") == "init" and self.chat_id:
            model = event.get("model")
            events.append(ChatStarted(self.chat_id, model if isinstance(model, str) else None))
        elif kind == "thinking":
            text = event.get("text")
            if event.get("subtype", "delta") == "delta" and isinstance(text, str) and text:
                events.append(ReasoningDelta(text))
        elif kind == "assistant":
            events.extend(self._assistant(event))
        elif kind == "tool_call":
            note = tool_note(event)
            if note is not None:
                events.append(note)
        elif kind == "result":
            events.extend(self._result(event))
        return events

    def _assistant(self, event: dict[str, Any]) -> list[CursorEvent]:
        text = message_text(event.get("message"))
        is_delta = "timestamp_ms" in event and "model_call_id" not in event
        if is_delta:
            self.saw_delta = True
        elif self.saw_delta:
            return []  # a repeat of text already forwarded as deltas
        if not text:
            return []
        self.text_parts.append(text)
        return [TextDelta(text)]

    def _result(self, event: dict[str, Any]) -> list[CursorEvent]:
        self.finished = True
        text = event.get("result")
        text = text if isinstance(text, str) else ""
        subtype = event.get("subtype")
        subtype = subtype if isinstance(subtype, str) else "success"
        is_error = bool(event.get("is_error")) or subtype != "success"
        duration = event.get("duration_ms")
        events: list[CursorEvent] = []
        if not is_error and not self.text_parts and text:
            self.text_parts.append(text)
            events.append(TextDelta(text))
        events.append(
            RunResult(
                text=text,
                is_error=is_error,
                subtype=subtype,
                duration_ms=duration if isinstance(duration, int) else None,
                usage=cursor_usage(event.get("usage")),
            )
        )
        return events


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """The JSON object on one line, or None for anything else (noise, blank, arrays)."""
    line = line.strip()
    if not line or line[:1] not in ("{", b"{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def message_text(message: object) -> str:
    """The text parts of an ``assistant`` event's ``message``, joined."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)
    )


def cursor_usage(usage: object) -> Usage | None:
    """OpenAI usage from Cursor's. Cache reads and writes are prompt tokens too (Cursor counts them
    apart from ``inputTokens``, as Anthropic does; OpenAI's ``prompt_tokens`` includes them)."""
    if not isinstance(usage, dict):
        return None

    def count(name: str) -> int:
        value = usage.get(name)
        return value if isinstance(value, int) and value >= 0 else 0

    prompt = count("inputTokens") + count("cacheReadTokens") + count("cacheWriteTokens")
    completion = count("outputTokens")
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


#: Argument names that say best what a tool call is about, most telling first.
_TELLING_ARGS = ("path", "command", "pattern", "query", "url", "globPattern", "targetDirectory", "file")
_SUMMARY_CHARS = 120


def tool_note(event: dict[str, Any]) -> ToolNote | None:
    """The note for a ``tool_call`` event (None if it is not one we understand)."""
    phase = event.get("subtype")
    call = event.get("tool_call")
    if phase not in ("started", "completed") or not isinstance(call, dict) or not call:
        return None
    key, body = next(iter(call.items()))
    body = body if isinstance(body, dict) else {}
    if key == "function":
        # The generic shape: {"function": {"name": ..., "arguments": "<json>"}}.
        name = body.get("name")
        tool = name if isinstance(name, str) and name else "tool"
        args = body.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"arguments": args}
    else:
        tool = key.removesuffix("ToolCall") or key
        args = body.get("args")
    call_id = event.get("call_id")
    call_id = call_id if isinstance(call_id, str) else ""
    result = body.get("result")
    failed = isinstance(result, dict) and phase == "completed" and ("error" in result or "rejected" in result)
    summary = _failure(result) if failed and isinstance(result, dict) else _argument_summary(args)
    return ToolNote(call_id=call_id, tool=tool, phase=phase, summary=summary, failed=failed)


def _argument_summary(args: object) -> str:
    if isinstance(args, dict):
        for name in _TELLING_ARGS:
            value = args.get(name)
            if isinstance(value, str) and value:
                return _shorten(value)
        if not args:
            return ""
    return _shorten(json.dumps(args, ensure_ascii=False, separators=(",", ":")))


def _failure(result: dict[str, Any]) -> str:
    reason = result.get("error") or result.get("rejected")
    if isinstance(reason, dict):
        reason = next((reason[k] for k in ("errorMessage", "message", "error", "reason") if isinstance(reason.get(k), str)), reason)
    return _shorten(reason if isinstance(reason, str) else json.dumps(reason, ensure_ascii=False))


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 1] + "…"


def note_text(note: ToolNote) -> str:
    """A tool note as one line of text, or "" for notes not worth showing (a call that went well
    is already told by its start)."""
    if note.phase == "started":
        return f"[{note.tool}{': ' + note.summary if note.summary else ''}]\n"
    if note.failed:
        return f"[{note.tool} failed{': ' + note.summary if note.summary else ''}]\n"
    return ""


class LineSplitter:
    """Bytes from a pipe → complete lines (without their newline); lines over ``max_line`` bytes
    are dropped whole."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False
        self.dropped = 0

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._buffer += data[start:end]
                if len(self._buffer) <= self.max_line:
                    lines.append(bytes(self._buffer))
                else:
                    self.dropped += 1
            self._buffer.clear()
            start = end + 1
        if not self._skipping:
            self._buffer += data[start:]
            if len(self._buffer) > self.max_line:
                self._buffer.clear()
                self._skipping = True
                self.dropped += 1
        return lines

    def close(self) -> list[bytes]:
        """The last line, if the output did not end with a newline."""
        rest = b"" if self._skipping else bytes(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return [rest] if rest.strip() else []
