"""Byte framing shared by the wire formats: compact JSON, SSE records, NDJSON lines."""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON. Never contains a raw newline, so it is safe in SSE and NDJSON."""
    return _encoder.encode(value).encode()


def sse_record(payload: bytes) -> bytes:
    """One SSE ``data:`` record (no ``event:`` lines: the OpenAI JS SDK hides named events)."""
    return b"data: " + payload + b"\n\n"


def ndjson_line(value: Any) -> bytes:
    return dumps(value) + b"\n"
