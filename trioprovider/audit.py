"""The security audit trail: one JSON object per line in ``logging.audit_file`` (rotating).

Events (DESIGN.md section 6): ``authentication``, ``rate_limit_exceeded``, ``model_request``,
``security_violation``, ``session_revoked``. Records carry key labels and prefixes, client
addresses, ids, counts and outcomes, never prompt or answer text: nothing here takes text from
a request body, so even ``logging.log_prompts`` does not put prompts into this file.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from trioprovider.clock import MillisecondClock
from trioprovider.wire.framing import json_text

log = logging.getLogger(__name__)

EVENTS = frozenset(
    {"authentication", "rate_limit_exceeded", "model_request", "security_violation", "session_revoked"}
)


#: The records' time: ISO 8601 UTC with milliseconds (``2026-11-21T17:00:00.123+00:00``).
_clock = MillisecondClock("+00:00")


def audit_line(event: str, fields: dict[str, Any], timestamp: str) -> str:
    """One audit record as a JSON line (without the newline); ``None`` fields are left out."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    record: dict[str, Any] = {"timestamp": timestamp, "event": event}
    for key, value in fields.items():
        if value is not None:
            record[key] = value
    return json_text(record)


def _open_private(path: Path) -> BinaryIO:
    """``path`` opened for appending, readable by its owner only: the audit log names keys
    (labels and prefixes, also of wrong keys pasted by mistake), sessions and client addresses."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    # The mode given to os.open only applies to a new file; never chmod a device or a pipe.
    if stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.fchmod(descriptor, 0o600)
    return os.fdopen(descriptor, "ab")


class RotatingFile:
    """Lines appended to a file, each written and flushed at once (a crash loses no record),
    rotated as ``logging``'s RotatingFileHandler does: before a line would take the file past
    ``max_bytes``, ``path`` becomes ``path.1`` (``path.1`` becomes ``path.2``, and so on up to
    ``backup_count``; none kept: no rotation).

    Not a ``logging`` handler: a record costs one formatted line and one write, where the
    logging machinery (a LogRecord, the caller's frame, two stat calls to decide on rollover)
    cost several times that on every request.
    """

    def __init__(self, path: Path, *, max_bytes: int, backup_count: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self._file: BinaryIO | None = None  # opened at the first line
        self._size = 0
        self._rotates = False

    def write(self, line: str) -> None:
        data = line.encode() + b"\n"
        if self._file is None:
            self._file = _open_private(self.path)
            # Never rename what is not a regular file (an audit_file of /dev/null, a pipe).
            regular = os.path.isfile(self.path)
            self._size = self._file.tell() if regular else 0
            self._rotates = regular and self.backup_count > 0
        elif self._rotates and self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _rotate(self) -> None:
        self.close()
        for number in range(self.backup_count - 1, 0, -1):
            older = Path(f"{self.path}.{number}")
            if older.exists():
                older.replace(f"{self.path}.{number + 1}")
        self.path.replace(f"{self.path}.1")
        self._file = _open_private(self.path)
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class AuditLog:
    """Writes audit records to their own file (never through the root logger: no other handler
    sees them).

    Writes are small and synchronous; a write that fails is logged and never fails the request
    that caused it.
    """

    def __init__(self, file: RotatingFile | None) -> None:
        self._file = file

    @classmethod
    def to_file(cls, path: str | Path, *, max_bytes: int, backup_count: int) -> AuditLog:
        """An audit log rotating at ``max_bytes`` with ``backup_count`` old files, mode 0600."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        return cls(RotatingFile(file, max_bytes=max_bytes, backup_count=backup_count))

    @classmethod
    def disabled(cls) -> AuditLog:
        return cls(None)

    def record(self, event: str, **fields: Any) -> None:
        if self._file is None:
            if event not in EVENTS:
                raise ValueError(f"unknown audit event {event!r}")
            return  # disabled: no line to build
        line = audit_line(event, fields, _clock.now())
        try:
            self._file.write(line)
        except OSError as error:
            log.error("audit: cannot write %s: %s", self._file.path, error)

    def flush(self) -> None:
        """Nothing to do: every record is flushed as it is written."""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
