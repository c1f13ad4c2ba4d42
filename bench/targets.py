"""The servers a benchmark run compares, and how to start each in a fresh process.

Every target serves the same answers (see :mod:`bench.canned`) in three paces: ``fast`` (all at
once), ``slow`` (a token every 50 ms: cancellation probes) and ``hold`` (the first token, then
silence: idle streams). Proxies pass the model name to the mock upstream, which paces by it; the
echo agent is paced by its per-token delay instead.
"""

from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import canned
from bench.processes import ROOT, Server, python_module

LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
#: A release from before LiteLLM's compromised uploads (1.82.7 and 1.82.8 carried a credential
#: stealer): pinned exactly, and installed into its own virtualenv.
LITELLM_REQUIREMENT = "litellm[proxy]==1.82.6"
PACE_MODELS = {"fast": "bench", "slow": "bench-slow", "hold": "bench-hold"}
ECHO_DELAY_MS = {"fast": 0.0, "slow": canned.SLOW_TOKEN_DELAY * 1000, "hold": 3_600_000.0}


@dataclass
class Target:
    name: str
    #: What the target is, for tables.
    description: str
    #: Whether it needs the mock upstream (a proxy in front of it).
    proxy: bool
    start: Callable[[str, str, Path], Server]
    #: Why it cannot run here, if it cannot.
    unavailable: str | None = None

    def model(self, pace: str, server: Server) -> str:
        return server.info.get("model") or PACE_MODELS[pace]


def _floor(pace: str, upstream: str, logs: Path) -> Server:
    return Server(f"floor-{pace}", python_module("bench.mock_upstream"), logs)


def _ceiling(pace: str, upstream: str, logs: Path) -> Server:
    return Server(f"ceiling-{pace}", python_module("bench.ceiling"), logs)


def _echo(pace: str, upstream: str, logs: Path) -> Server:
    argv = python_module("bench.trioprovider_target", "--agent", "echo", "--delay-ms", str(ECHO_DELAY_MS[pace]))
    return Server(f"trioprovider-echo-{pace}", argv, logs)


def _upstream(pace: str, upstream: str, logs: Path) -> Server:
    argv = python_module("bench.trioprovider_target", "--agent", "openai", "--upstream", upstream + "/v1")
    server = Server(f"trioprovider-upstream-{pace}", argv, logs)
    server.info["model"] = PACE_MODELS[pace]
    return server


def _litellm(pace: str, upstream: str, logs: Path) -> Server:
    config = logs / f"litellm-{pace}.yaml"
    entries = "".join(
        f"  - model_name: {model}\n    litellm_params: {{model: openai/{model}, api_base: \"{upstream}/v1\", api_key: none}}\n"
        for model in canned.MODELS
    )
    config.write_text("model_list:\n" + entries)
    port = _free_port()
    argv = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    # The cost map ships in the package; without this it is fetched from the network at start.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    return Server(f"litellm-{pace}", argv, logs, ready_url=f"http://127.0.0.1:{port}", env=env, timeout=120)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def litellm_status(install: bool) -> str | None:
    """None if the LiteLLM proxy can run; else why not. Installs it first when asked."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists() and install:
        try:
            subprocess.run(["python3", "-m", "venv", str(LITELLM_VENV)], check=True, capture_output=True)
            subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT], check=True, capture_output=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as error:
            return f"pip install '{LITELLM_REQUIREMENT}' into {LITELLM_VENV.relative_to(ROOT)} failed: {str(error)[:200]}"
    if not binary.exists():
        return f"not installed (run with --install-litellm, or pip install '{LITELLM_REQUIREMENT}' into {LITELLM_VENV.relative_to(ROOT)})"
    return None


def upstream_status() -> str | None:
    if importlib.util.find_spec("trioprovider.agents.upstream") is None:  # before the upstream branch
        return "the upstream agent (trioprovider/agents/upstream.py) is not on this branch yet"
    return None


def all_targets(*, install_litellm: bool) -> list[Target]:
    return [
        Target("floor", "mock OpenAI-compatible server, reached directly (raw Trio sockets)", False, _floor),
        Target("ceiling", "bare ASGI app on hypercorn.trio, same canned answers", False, _ceiling),
        Target("trioprovider-echo", "trioprovider, embedded echo agent (no delay)", False, _echo),
        Target("trioprovider-upstream", "trioprovider, embedded upstream agent -> mock", True, _upstream, upstream_status()),
        Target("litellm", f"LiteLLM proxy ({LITELLM_REQUIREMENT.split('[')[0]} 1.82.6, 1 worker) -> mock", True, _litellm, litellm_status(install_litellm)),
    ]
