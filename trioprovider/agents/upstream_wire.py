"""What the ``openai`` agent says to an OpenAI-compatible upstream, and what it makes of the answers.

Sans-IO: a ``model_invoke`` becomes the JSON body of ``/v1/chat/completions`` or
``/v1/completions`` (streamed as the client asked, with usage); the upstream's SSE lines become
``data`` records (:class:`SseDecoder`), and each record becomes the chunks to forward
(:class:`UpstreamStream`), which also remembers the whole answer for ``model_result``. Every way
an upstream can fail becomes an :class:`AgentFailure` whose code maps to the right HTTP status.
The I/O lives in :mod:`trioprovider.agents.upstream`.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from trioprovider.agents.runner import AgentFailure
from trioprovider.events import DeltaEvent
from trioprovider.protocol import Chunk, Delta, ModelCard, ModelInvoke, Usage
from trioprovider.wire.answer import Answer

#: The most one SSE event (or an error body) may hold; an upstream sending more is broken.
MAX_EVENT_CHARS = 8 * 1024 * 1024
#: SSE line ends: CRLF, LF or CR.
_LINE_END = re.compile(rb"\r\n|\r|\n")
#: How much of an upstream's words an error message quotes.
QUOTE_CHARS = 500


def api_root(base_url: str) -> str:
    """The URL the API paths go under, as OpenAI clients take ``base_url``
    (``http://host:11434/v1``); a URL with no path at all means ``/v1`` there."""
    root = base_url.rstrip("/")
    if urllib.parse.urlsplit(root).path == "":
        root += "/v1"
    return root


def upstream_model(requested: str, advertised: list[str]) -> str:
    """The upstream model for a request: the one asked for if the upstream has it, else the
    first one (a request for the provider's default model may reach any agent)."""
    return requested if requested in advertised or not advertised else advertised[0]


def upstream_request(invoke: ModelInvoke, model: str) -> tuple[str, dict[str, Any]]:
    """The path (under :func:`api_root`) and JSON body that ask the upstream for ``invoke``'s answer.

    Streamed (with usage) when the client streams, whole when it does not, as every proxy asks:
    a streamed answer costs a parse and a message per chunk, and an unstreamed client reads
    none of them (the upstream agent did five times the work of the echo agent a request).
    """
    body: dict[str, Any] = {"model": model, "stream": invoke.stream}
    if invoke.stream:
        body["stream_options"] = {"include_usage": True}
    optional: tuple[str, ...]
    if invoke.kind == "chat":
        path = "/chat/completions"
        body["messages"] = invoke.messages or []
        optional = ("max_tokens", "temperature", "top_p", "stop", "tools", "tool_choice")
    else:
        path = "/completions"
        body["prompt"] = invoke.prompt or ""
        optional = ("suffix", "max_tokens", "temperature", "top_p", "stop")
    for name in optional:
        value = getattr(invoke, name)
        if value is not None:
            body[name] = value
    return path, body


def model_cards(listing: bytes) -> list[ModelCard]:
    """The models in an upstream's ``GET /v1/models`` answer; ValueError if it is not one."""
    try:
        data = json.loads(listing)["data"]
        entries = [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"not an OpenAI model list: {_quote(listing)}") from None
    cards: dict[str, ModelCard] = {}
    for entry in entries:
        # Some servers say how long a context the model takes (vLLM, OpenRouter, LM Studio).
        window = next(
            (entry[key] for key in ("context_window", "context_length", "max_model_len") if isinstance(entry.get(key), int) and entry[key] > 0),
            None,
        )
        cards.setdefault(entry["id"], ModelCard(id=entry["id"], context_window=window, supports_tools=True))
    return list(cards.values())


def error_detail(body: bytes) -> str:
    """The upstream's own words from an error body: OpenAI's ``error.message``, Ollama's
    ``error``, FastAPI's ``detail``, or the text itself."""
    try:
        value = json.loads(body)
    except ValueError:
        return _quote(body) or "(no body)"
    if isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _quote(str(error["message"]))
        for candidate in (error, value.get("detail"), value.get("message")):
            if candidate:
                return _quote(candidate if isinstance(candidate, str) else json.dumps(candidate))
    return _quote(body)


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
        code = error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) and code else None


#: An upstream HTTP status -> (model_error code, retryable). The codes are the ones the provider
#: turns into a status (``errors._AGENT_STATUS``): a client's bad request stays a 400, a busy
#: upstream a 503 or 429; a refused upstream key is our configuration's fault, not the client's
#: (not a 401, which would make the client doubt its own key).
_STATUS_CODES: dict[int, tuple[str, bool]] = {
    400: ("invalid_request", False),
    401: ("upstream_unauthorized", False),
    403: ("upstream_unauthorized", False),
    404: ("upstream_not_found", False),
    408: ("timeout", True),
    413: ("invalid_request", False),
    422: ("invalid_request", False),
    429: ("rate_limited", True),
    503: ("overloaded", True),
    504: ("timeout", True),
}


def status_failure(status: int, body: bytes, root: str) -> AgentFailure:
    """The failure for an upstream's non-2xx answer, saying its status and its message."""
    code, retryable = _STATUS_CODES.get(status, ("upstream_error", status >= 500))
    if code == "invalid_request" and _error_code(body) == "context_length_exceeded":
        code = "context_length_exceeded"
    hint = " (check agents.openai.api_key / --api-key)" if code == "upstream_unauthorized" else ""
    return AgentFailure(code, f"upstream {root} answered HTTP {status}: {error_detail(body)}{hint}", retryable=retryable)


def bad_response(root: str, what: str) -> AgentFailure:
    return AgentFailure("upstream_bad_response", f"upstream {root} sent a malformed answer: {what}", retryable=True)


def _quote(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


class SseDecoder:
    """Server-sent events from the bytes of a response, as the HTML standard parses them.

    Lines end at CRLF, LF or CR only (not at the other breaks ``str.splitlines`` and httpx's
    ``aiter_lines`` honour: U+2028 inside a JSON string is no line end); ``data:`` lines join,
    a blank line dispatches; comments, ``id:`` and ``retry:`` are ignored.
    """

    def __init__(self, max_chars: int = MAX_EVENT_CHARS) -> None:
        self._max_chars = max_chars
        self._pending = bytearray()
        self._first_line = True
        self._event = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, data: bytes) -> list[SseEvent]:
        """Take the next bytes; the events they complete. ValueError when an event (or a
        line) grows past ``max_chars``."""
        self._pending += data
        events: list[SseEvent] = []
        if b"\r" not in self._pending:
            # Lines end at LF alone, as nearly every server sends them: split, no regex.
            *lines, rest = self._pending.split(b"\n")
            for raw in lines:
                event = self._line(raw.decode("utf-8", "replace"))
                if event is not None:
                    events.append(event)
            self._pending = bytearray(rest)
            if len(self._pending) > self._max_chars:
                raise ValueError(f"a line longer than {self._max_chars} characters")
            return events
        start = 0
        for match in _LINE_END.finditer(self._pending):
            # A CR at the very end may be the first half of a CRLF: wait for the next bytes.
            if match.group() == b"\r" and match.end() == len(self._pending):
                break
            event = self._line(self._pending[start : match.start()].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = match.end()
        del self._pending[:start]
        if len(self._pending) > self._max_chars:
            raise ValueError(f"a line longer than {self._max_chars} characters")
        return events

    def _line(self, line: str) -> SseEvent | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data, self._size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._size += len(value) + 1
            if self._size > self._max_chars:
                raise ValueError(f"an event longer than {self._max_chars} characters")
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int = 0
    delta: dict[str, Any] | None = None
    text: str | None = None
    message: dict[str, Any] | None = None
    finish_reason: str | None = None


class _Record(BaseModel):
    """One upstream chunk (or a whole non-streamed answer): only the fields we read."""

    model_config = ConfigDict(extra="ignore")

    choices: list[_Choice] | None = None
    usage: Usage | None = None
    error: Any = None


@dataclass(frozen=True, slots=True)
class _ChoiceFields:
    """What a chunk's first choice says (the fields of :class:`_Choice`, without pydantic)."""

    delta: dict[str, Any] | None
    text: str | None
    finish_reason: str | None


def _plain_chunk(data: str) -> tuple[_ChoiceFields | None] | None:
    """The usual upstream chunk, read with ``json.loads`` and type checks alone: its first
    choice (in a tuple). None when anything is unusual (then pydantic reads it, and words the
    error): a hundred chunks an answer made pydantic the upstream agent's largest cost."""
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("usage") is not None or record.get("error") is not None:
        return None
    choices = record.get("choices")
    if choices is None:
        return (None,)
    if not isinstance(choices, list):
        return None
    first = None
    for choice in choices:
        if not isinstance(choice, dict):
            return None
        index = choice.get("index", 0)
        delta = choice.get("delta")
        text = choice.get("text")
        finish_reason = choice.get("finish_reason")
        if (
            type(index) is not int
            or not (delta is None or isinstance(delta, dict))
            or not (text is None or isinstance(text, str))
            or not (finish_reason is None or isinstance(finish_reason, str))
            or not (choice.get("message") is None or isinstance(choice.get("message"), dict))
        ):
            return None
        if index == 0 and first is None:
            first = _ChoiceFields(delta, text, finish_reason)
    return (first,)


def _delta(choice: _Choice | _ChoiceFields) -> Delta:
    """Our delta for an upstream chunk's first choice (chat ``delta``, or completion ``text``)."""
    if choice.delta is None:
        return Delta(content=choice.text or None)
    delta = choice.delta
    content = delta.get("content")
    # DeepSeek and vLLM say reasoning_content; Ollama and OpenRouter say reasoning.
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    calls = delta.get("tool_calls")
    fragments = [dict(call) for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []
    return Delta(
        content=content if isinstance(content, str) and content else None,
        reasoning_content=reasoning if isinstance(reasoning, str) and reasoning else None,
        tool_calls=fragments or None,
    )


class UpstreamStream:
    """One streamed upstream answer: each SSE event in, the chunks to forward out.

    It also joins the answer, so that :meth:`result` can repeat it in ``model_result``, and keeps
    the usage the upstream reports (``stream_options.include_usage``: a last chunk with empty
    ``choices``). Failures raise :class:`AgentFailure`.
    """

    def __init__(self, kind: str, root: str) -> None:
        self.kind = kind
        self.root = root
        self.answer = Answer()
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        #: ``data: [DONE]`` arrived: the answer is complete.
        self.done = False

    def feed(self, event: SseEvent) -> list[Chunk]:
        if self.done:
            return []
        if event.data.strip() == "[DONE]":
            self.done = True
            return []
        plain = _plain_chunk(event.data) if event.event == "message" else None
        choice: _Choice | _ChoiceFields | None
        if plain is not None:
            choice = plain[0]
        else:
            try:
                record = _Record.model_validate_json(event.data)
            except pydantic.ValidationError:
                if event.event == "error":
                    raise AgentFailure("upstream_error", f"upstream {self.root} failed mid-answer: {_quote(event.data)}", retryable=True) from None
                raise bad_response(self.root, f"not an OpenAI chunk: {_quote(event.data)}") from None
            if record.error is not None:
                raise _stream_error(record.error, self.root)
            if record.usage is not None:
                self.usage = record.usage
            choice = _first_choice(record.choices)
        if choice is None:
            return []
        delta = _delta(choice)
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        if not (delta.content or delta.reasoning_content or delta.tool_calls or choice.finish_reason):
            return []
        self.answer.feed([DeltaEvent(delta)])
        return [Chunk(delta=delta, finish_reason=choice.finish_reason)]

    def end(self) -> None:
        """The upstream closed the stream: fine after ``[DONE]`` or a finish reason (some servers
        leave ``[DONE]`` out), a truncated answer otherwise."""
        if not (self.done or self.finish_reason):
            raise AgentFailure("upstream_error", f"upstream {self.root} ended the stream before the answer was complete", retryable=True)

    def result(self) -> tuple[list[dict[str, Any]], Usage | None]:
        """``model_result``'s ``choices`` and ``usage``: the answer the chunks carried."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": self.answer.content or None}
            if self.answer.reasoning:
                message["reasoning_content"] = self.answer.reasoning
            if self.answer.tool_calls:
                message["tool_calls"] = self.answer.tool_calls
            choice["message"] = message
        else:
            choice["text"] = self.answer.content
        return [choice], self.usage


def whole_answer(body: bytes, root: str) -> tuple[list[dict[str, Any]], Usage | None]:
    """``model_result``'s ``choices`` and ``usage`` from a non-streamed answer (asked for, or from
    an upstream that ignored ``stream: true``)."""
    try:
        record = _Record.model_validate_json(body)
    except pydantic.ValidationError:
        raise bad_response(root, f"not an OpenAI completion: {_quote(body)}") from None
    if record.error is not None:
        raise _stream_error(record.error, root)
    choice = _first_choice(record.choices)
    if choice is None:
        raise bad_response(root, f"an answer without choices: {_quote(body)}")
    answer = choice.model_dump(exclude_none=True, exclude={"delta"})
    message = answer.get("message")
    if isinstance(message, dict) and "reasoning_content" not in message and message.get("reasoning"):
        message["reasoning_content"] = message["reasoning"]
    return [answer], record.usage


def _first_choice(choices: list[_Choice] | None) -> _Choice | None:
    # We ask for one choice (no ``n``); index 0 is it.
    return next((choice for choice in choices or () if choice.index == 0), None)


def _stream_error(error: Any, root: str) -> AgentFailure:
    """The failure for an error record the upstream sent after its 200 (mid-stream)."""
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    text = message if isinstance(message, str) else json.dumps(message)
    return AgentFailure(
        code if isinstance(code, str) and code and len(code) <= 64 else "upstream_error",
        f"upstream {root} failed mid-answer: {_quote(text)}",
        retryable=True,
    )
