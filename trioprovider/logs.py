"""The process log: console and a rotating file, text or JSON lines, the request id on every line.

- :func:`configure` installs the handlers that ``logging.*`` settings describe on the root logger;
  calling it again replaces them (the CLI calls it once per process; tests may call it often).
- :data:`current_request_id` is set for the duration of each HTTP request (by the ASGI wrapper)
  and of each answer an agent writes; :class:`RequestIdFilter` copies it onto every record
  emitted meanwhile. Code that logs about a request from elsewhere passes ``extra=about(id)``.
- :func:`access_fields` and :func:`access_message` make the access line (written by the ASGI
  wrapper, once per request): client, method, path (never the query string), status, duration,
  request id, and whether the client stayed to the end; in JSON, each is a field.

Prompt text never reaches these handlers through this module: the access line takes nothing from
a request body or its headers, and JSON lines carry a record's message and its explicit ``extra``
fields only, never its raw arguments.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

from trioprovider.config import LoggingSettings

#: The id of the request being handled (the client's ``X-Request-Id``), or None.
current_request_id: ContextVar[str | None] = ContextVar("trioprovider_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(request_tag)s: %(message)s"

#: What every LogRecord carries; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "request_id",
    "request_tag",
}

#: Handlers installed by :func:`configure`, removed by the next call.
_installed: list[logging.Handler] = []


def about(request_id: str) -> dict[str, str]:
    """``extra=`` for a line about ``request_id`` logged outside that request's context."""
    return {"request_id": request_id}


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` (an explicit one, else the current request's, else
    None) and a ``request_tag`` for the text format (`` [id]`` or nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_tag" in record.__dict__:
            return True  # the handler before this one gave it its id already
        request_id = getattr(record, "request_id", None) or current_request_id.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class OncePerRecord(logging.Formatter):
    """A formatter that formats each record once, however many handlers share it (console and
    file by default: the access line, one a request, was formatted twice)."""

    def format(self, record: logging.LogRecord) -> str:
        done: tuple[logging.Formatter, str] | None = record.__dict__.get("_formatted")
        if done is not None and done[0] is self:
            return done[1]
        text = self.format_once(record)
        record._formatted = (self, text)
        return text

    def format_once(self, record: logging.LogRecord) -> str:
        return super().format(record)

    #: (second, its date and time): replaced whole, as records may be formatted in threads.
    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The standard ``2026-11-21 17:00:00,123`` (local time), its date and time formatted
        once a second rather than once a line."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, self.converter(second)))
        msec_format = self.default_msec_format
        return msec_format % (cached[1], record.msecs) if msec_format else cached[1]


class JsonFormatter(OncePerRecord):
    """One JSON object per line: time (UTC), level, logger, message, request_id when there is
    one, the record's ``extra`` fields, and the traceback of an exception."""

    def format_once(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are readable by their owner only: with
    ``logging.log_prompts`` they hold prompts, which are often private code.

    It keeps the file's size itself: the standard handler formats every record twice and asks
    the file system three times (exists, isfile, seek) whether to roll over, which made the
    access line the most expensive line of a request. Each process writes its own file (see
    :func:`log_file`), so nobody else changes the size meanwhile.
    """

    _size: int | None = None
    _rotates = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            if self._size is None:
                self._size = self.stream.tell()
                # Never roll over what is not a regular file (a log file of /dev/null).
                self._rotates = self.maxBytes > 0 and os.path.isfile(self.baseFilename)
            if self._rotates and self._size and self._size + len(line) >= self.maxBytes:
                self.doRollover()
                if self.stream is None:
                    self.stream = self._open()
                self._size = 0
            self.stream.write(line)
            self.flush()
            self._size += len(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _open(self) -> io.TextIOWrapper:
        stream = open(
            self.baseFilename,
            self.mode,
            encoding=self.encoding,
            errors=self.errors,
            opener=lambda path, flags: os.open(path, flags, 0o600),
        )
        assert isinstance(stream, io.TextIOWrapper)  # a text mode ("a"): for the type checker
        return stream


def log_file(settings: LoggingSettings, process: str = "provider") -> str:
    """The file process ``process`` writes: ``logging.file`` for the provider, a sibling named
    after the process for the others (``bridge.log``, ``agent-echo.log``); empty: no file.

    Each process has its own file because rotating a file that several processes write
    loses lines.
    """
    if not settings.file or process == "provider":
        return settings.file
    return str(Path(settings.file).with_name(f"{process}.log"))


def make_formatter(settings: LoggingSettings) -> logging.Formatter:
    return JsonFormatter() if settings.json_format else OncePerRecord(TEXT_FORMAT)


def make_handlers(settings: LoggingSettings, file: str, stream: IO[str] | None = None) -> list[logging.Handler]:
    """A console handler on ``stream`` (default stderr) if ``logging.console``, and, if ``file``
    is not empty, a file handler rotating at ``logging.max_bytes`` with ``logging.backup_count``
    old files.

    Raises OSError if the file cannot be opened: better at start than at the first line.
    """
    handlers: list[logging.Handler] = []
    if settings.console:
        handlers.append(logging.StreamHandler(sys.stderr if stream is None else stream))
    if file:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            PrivateRotatingFileHandler(
                file, maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
            )
        )
    formatter = make_formatter(settings)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
    return handlers


def configure(settings: LoggingSettings, file: str, stream: IO[str] | None = None) -> list[logging.Handler]:
    """Make the root logger write to ``make_handlers(...)`` at ``logging.level``, replacing what
    an earlier call installed (and closing its files); returns the new handlers."""
    handlers = make_handlers(settings, file, stream)
    # No format of ours shows the caller's file and line, thread or process: skip finding them
    # for every record (the logging HOWTO's "Optimization"; the access line is one a request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    reset()
    for handler in handlers:
        root.addHandler(handler)
    _installed.extend(handlers)
    root.setLevel(settings.level)
    return handlers


def reset() -> None:
    """Remove and close the handlers :func:`configure` installed."""
    root = logging.getLogger()
    while _installed:
        handler = _installed.pop()
        root.removeHandler(handler)
        handler.close()


def access_fields(
    scope: Mapping[str, Any], status: int | None, seconds: float, request_id: str | None, complete: bool
) -> dict[str, Any]:
    """What the access line says about one HTTP exchange (its ASGI scope): no query string, no
    header. ``complete`` is False when the client left before the last byte of the answer."""
    client = scope.get("client")
    return {
        "client": client[0] if client else None,
        "method": scope.get("method", "GET"),
        "path": scope.get("path", ""),
        "status": status,
        "duration_ms": round(seconds * 1000, 1),
        "request_id": request_id,
        "complete": complete,
    }


def access_message(fields: Mapping[str, Any]) -> str:
    """The access line's text: ``127.0.0.1 "POST /v1/chat/completions" 200 12.5ms``."""
    status = "-" if fields["status"] is None else fields["status"]
    left = "" if fields["complete"] else " (client left)"
    return f'{fields["client"] or "-"} "{fields["method"]} {fields["path"]}" {status} {fields["duration_ms"]}ms{left}'
