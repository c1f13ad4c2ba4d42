"""Child processes in their own process group, and ending the whole group.

The Cursor CLI starts helpers of its own (shells for its tools, language servers), so stopping
only the process we started would leave them running. Each CLI run gets a new session (hence a
process group whose id is its pid); ending a run signals the group: SIGTERM, then SIGKILL for
whatever is left after a grace period.
"""

from __future__ import annotations

import os
import signal

import trio


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only a group whose id was reused by someone else's processes can refuse us: ours is gone.
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: a helper orphaned by the
    CLI waits as a zombie until PID 1 reaps it, which some container inits do only now and then."""
    if not signal_group(pgid, 0):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc to tell zombies apart: assume the worst
    for entry in entries:
        if entry.isdigit() and _running_member(int(entry), pgid):
            return True
    return False


def _running_member(pid: int, pgid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after it.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")


async def terminate_group(process: trio.Process, grace: float) -> None:
    """End ``process`` and everything in its group: SIGTERM, then SIGKILL after ``grace`` seconds.

    Returns once the leader is reaped and the group is gone (or SIGKILLed). Callers bound it and
    shield it: it runs in ``finally`` blocks of cancelled requests.
    """
    pgid = process.pid
    if not signal_group(pgid, signal.SIGTERM):
        await process.wait()
        return
    with trio.move_on_after(grace):
        await process.wait()
        # Reaping the leader does not end its group: helpers it started may still be running.
        while group_alive(pgid):
            await trio.sleep(0.02)
        return
    signal_group(pgid, signal.SIGKILL)
    await process.wait()


async def kill_group_now(process: trio.Process) -> None:
    """A ``deliver_cancel`` for :func:`trio.run_process`: short-lived helpers get no grace."""
    signal_group(process.pid, signal.SIGKILL)


class TailBuffer:
    """The last ``limit`` bytes written to it: what a process said on stderr before it failed."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._data = bytearray()

    def write(self, data: bytes | bytearray) -> None:
        self._data += data
        if len(self._data) > self.limit:
            del self._data[: len(self._data) - self.limit]

    def text(self) -> str:
        return self._data.decode("utf-8", "replace")


async def drain(stream: trio.abc.ReceiveStream, into: TailBuffer, done: trio.Event) -> None:
    """Read ``stream`` to its end (a full pipe would stall the writer), keeping its tail."""
    try:
        while data := await stream.receive_some(65536):
            into.write(data)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        done.set()


async def feed(stream: trio.abc.SendStream, data: bytes) -> None:
    """Write ``data`` and close the stream (the CLI reads its prompt to end of file)."""
    try:
        await stream.send_all(data)
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # The process stopped reading (it exited, or failed early): its exit status and stderr
        # say why, not this.
        pass
