"""The security audit trail: one JSON object per line in ``logging.audit_file`` (rotating).

Events (DESIGN.md section 6): ``authentication``, ``rate_limit_exceeded``, ``model_request``,
``security_violation``, ``session_revoked``. Records carry key labels and prefixes, client
addresses, ids, counts and outcomes, never prompt or answer text: nothing here takes text from
a request body, so even ``logging.log_prompts`` does not put prompts into this file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from trioprovider.logs import PrivateRotatingFileHandler

EVENTS = frozenset(
    {"authentication", "rate_limit_exceeded", "model_request", "security_violation", "session_revoked"}
)


def audit_line(event: str, fields: dict[str, Any], when: dt.datetime) -> str:
    """One audit record as a JSON line (without the newline); ``None`` fields are left out."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    record: dict[str, Any] = {"timestamp": when.isoformat(timespec="milliseconds"), "event": event}
    record.update((key, value) for key, value in fields.items() if value is not None)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class AuditLog:
    """Writes audit records through its own logger (never the root's: no other handler sees them).

    Writes are small and synchronous; a write that fails is reported by ``logging`` and never
    fails the request that caused it.
    """

    def __init__(self, handler: logging.Handler | None) -> None:
        # A private Logger, not logging.getLogger(): several servers (tests) may run in one
        # process, each with its own file.
        self._logger = logging.Logger("trioprovider.audit", logging.INFO)
        self._logger.propagate = False
        self._handler = handler
        if handler is not None:
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)

    @classmethod
    def to_file(cls, path: str | Path, *, max_bytes: int, backup_count: int) -> AuditLog:
        """An audit log rotating at ``max_bytes`` with ``backup_count`` old files, mode 0600."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        # 0600: it names keys (labels and prefixes, also of wrong keys pasted by mistake),
        # sessions and client addresses.
        handler = PrivateRotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=True
        )
        return cls(handler)

    @classmethod
    def disabled(cls) -> AuditLog:
        return cls(None)

    def record(self, event: str, **fields: Any) -> None:
        line = audit_line(event, fields, dt.datetime.now(dt.UTC))
        if self._handler is not None:
            self._logger.info(line)

    def flush(self) -> None:
        if self._handler is not None:
            self._handler.flush()

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._logger.removeHandler(self._handler)
            self._handler = None
