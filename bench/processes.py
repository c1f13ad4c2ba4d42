"""Starting and talking to the processes of a benchmark run: servers under test and clients."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's packages (bench and trioprovider) come first, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss(pid: int) -> int:
    """Resident set size of a process and its descendants (LiteLLM's workers), in bytes."""
    total = 0
    for child in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{child}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            direct = [int(part) for part in file.read().split()]
    except FileNotFoundError:
        return []
    for child in direct:
        children += [child, *_descendants(child)]
    return children


class Server:
    """A server process that speaks the control line of :mod:`bench.control`, or any HTTP
    server (``ready_url`` given) that is polled until it answers."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, ready_url: str | None = None, env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if ready_url is None else self._log,
            stderr=self._log,
            env={**_env(), **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        self.pid = self.process.pid
        if ready_url is None:
            self.info = self._read_line(timeout)
            self.url: str = self.info["url"]
        else:
            self.info = {}
            self.url = ready_url
            self._wait_http(ready_url, timeout)

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"{self.name} did not start; see {self.log_path}")
        return json.loads(line)

    def _wait_http(self, url: str, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(url + "/health/liveliness", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f}s; see {self.log_path}")

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"stats\n")
        self.process.stdin.flush()
        return self._read_line(timeout)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in [self.pid, *_descendants(self.pid)])

    def rss(self) -> int:
        return tree_rss(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.process.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
        self._log.close()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_client(scenario: str, url: str, *, timeout: float = 300.0, **options: Any) -> dict[str, Any]:
    """Run one load-generator scenario in a fresh process; its JSON result."""
    argv = python_module("bench.loadgen", scenario, url)
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, env=_env(), cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({scenario} on {url}): {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


class HeldStreams:
    """A load generator holding idle streams open, step by step (see ``loadgen.hold``)."""

    def __init__(self, url: str, steps: list[int], **options: Any) -> None:
        argv = python_module("bench.loadgen", "hold", url, "--steps", ",".join(map(str, steps)))
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)

    def wait_step(self, timeout: float = 300.0) -> dict[str, Any]:
        """Wait until the current step's streams are open; how many are (and were refused)."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.process.kill()
            _out, err = self.process.communicate()
            raise RuntimeError(f"holding streams failed: {err.decode()[-2000:]}")
        return json.loads(line)

    def next_step(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        self.next_step()
        self.process.communicate(timeout=60)
