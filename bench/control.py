"""The control line between the bench driver and a server process it started.

A server prints one JSON line when it is ready (``{"url": ...}`` and whatever else the driver
needs), then answers each ``stats`` line on its standard input with one JSON line. Logs go to
standard error, so standard output carries nothing but these lines.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import trio


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def announce(**fields: Any) -> None:
    sys.stdout.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


async def answer_stats(stats: Callable[[], dict[str, Any]]) -> None:
    """Answer ``stats`` lines on standard input until it closes (the driver went away)."""
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        if line.strip() == "stats":
            sys.stdout.write(json.dumps(stats()) + "\n")
            sys.stdout.flush()
