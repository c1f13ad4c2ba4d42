"""The service files in deploy/ agree with the code: the commands they run parse, the variables
they set exist and give settings the server accepts, the hardening is there.

(No image is built and no service installed here: CI has neither a Docker daemon nor systemd.)
"""

from __future__ import annotations

import json
import plistlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import trio

from support import make_settings, start_server
from trioprovider.cli import _parser
from trioprovider.config import ENV_VARS, Settings, load_settings
from trioprovider.logs import log_file
from trioprovider.server import SHUTDOWN_MARGIN, preflight

DEPLOY = Path(__file__).parent.parent / "deploy"


def unit_entries(text: str) -> dict[str, list[str]]:
    """``Key=Value`` lines of a systemd unit (keys may repeat), sections ignored."""
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def assignments(items: list[str]) -> dict[str, str]:
    """``NAME=value`` items as a mapping."""
    return {name: value for name, _, value in (item.partition("=") for item in items)}


#: Seconds a drain may take before the process exits by itself (default settings).
DRAIN = Settings().provider.graceful_timeout + SHUTDOWN_MARGIN


def check_command(argv: list[str]) -> Settings:
    """``python -m trioprovider ARGS``: the arguments parse, the host is loopback; the settings."""
    assert argv[1:3] == ["-m", "trioprovider"], argv
    args = _parser().parse_args(["serve", *argv[3:]])
    assert args.host == "127.0.0.1"
    return load_settings(None, env={}, overrides={"provider.host": args.host})


def check_variables(variables: dict[str, str]) -> Settings:
    """Every LOCAL_PROVIDER_* variable exists, and the settings they give pass the start-up checks."""
    ours = {name: value for name, value in variables.items() if name.startswith("LOCAL_PROVIDER_")}
    assert set(ours) <= set(ENV_VARS), set(ours) - set(ENV_VARS)
    settings = load_settings(None, env=ours)
    preflight(settings)
    return settings


def test_the_systemd_unit_runs_the_module_on_loopback_hardened() -> None:
    unit = unit_entries((DEPLOY / "trioprovider.service").read_text())
    check_command(shlex.split(unit["ExecStart"][0]))
    environment = assignments([item for value in unit.get("Environment", []) for item in shlex.split(value)])
    check_variables(environment)
    hardening = {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "IPAddressAllow": "localhost",
        "IPAddressDeny": "any",
        "UMask": "0077",
    }
    for key, value in hardening.items():
        assert unit.get(key) == [value], key
    assert unit["User"] != ["root"]
    # The only writable place is where the provider's logs (and audit log) go.
    working = Path(unit["WorkingDirectory"][0])
    default = Settings().logging
    assert unit["ReadWritePaths"] == [str(working / Path(log_file(default)).parent)]
    assert Path(default.audit_file).parent == Path(default.file).parent
    # systemd waits for the drain before SIGKILL.
    assert unit["KillSignal"] == ["SIGTERM"]
    assert float(unit["TimeoutStopSec"][0]) > DRAIN


def test_the_launchd_agent_runs_the_module_on_loopback() -> None:
    with (DEPLOY / "com.trioprovider.provider.plist").open("rb") as file:
        plist = plistlib.load(file)
    assert plist["Label"] == "com.trioprovider.provider"
    check_command(plist["ProgramArguments"])
    settings = check_variables(plist["EnvironmentVariables"])
    assert settings.logging.console is False and settings.logging.file  # the rotated file, not stderr
    assert plist["ExitTimeOut"] > DRAIN
    assert plist["KeepAlive"] == {"SuccessfulExit": False}


def test_the_nssm_notes_run_the_module_on_loopback() -> None:
    text = (DEPLOY / "windows-nssm.md").read_text()
    parameters = re.search(r'nssm set trioprovider AppParameters "(.*)"', text).group(1)  # type: ignore[union-attr]
    check_command(["python.exe", *parameters.split()])
    extra = re.search(r"nssm set trioprovider AppEnvironmentExtra (.*)", text).group(1)  # type: ignore[union-attr]
    check_variables(assignments(extra.split()))
    stop_ms = int(re.search(r"AppStopMethodConsole (\d+)", text).group(1))  # type: ignore[union-attr]
    assert stop_ms / 1000 > DRAIN


def test_the_dockerfile_is_minimal_non_root_and_its_settings_start() -> None:
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    kinds = [kind for kind, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    user = next(argument for kind, argument in instructions if kind == "USER")
    assert user not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    assert "8788" in next(argument for kind, argument in instructions if kind == "EXPOSE").split()
    assert json.loads(next(argument for kind, argument in instructions if kind == "CMD")) == ["python", "-m", "trioprovider"]
    environment: dict[str, str] = {}
    for kind, argument in instructions:
        if kind == "ENV":
            environment.update(assignments(shlex.split(argument)))
    # The container listens on 0.0.0.0, which the server refuses unless told it may.
    settings = check_variables(environment)
    assert settings.provider.host == "0.0.0.0" and settings.provider.allow_non_loopback
    assert settings.logging.json_format and settings.logging.file == ""  # docker logs is the log
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    stop_timeout = re.search(r"--stop-timeout (\d+)", (DEPLOY / "Dockerfile").read_text()).group(1)  # type: ignore[union-attr]
    assert int(stop_timeout) > DRAIN
    # The build context is an allowlist, and never takes config/ (tokens) or logs/.
    assert "*" in ignore and not [line for line in ignore if line.startswith(("!config", "!logs"))]


async def test_the_docker_healthcheck_command_passes_against_a_live_server() -> None:
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    healthcheck = next(argument for kind, argument in instructions if kind == "HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings())
        port = running.provider_url.rsplit(":", 1)[1]
        probe = command[2].replace(":8788/", f":{port}/")
        result = await trio.run_process([sys.executable, "-c", probe], capture_stderr=True, check=False)
        assert result.returncode == 0, result.stderr
        running.shutdown.set()
    # And it fails when nothing answers.
    failed = await trio.run_process([sys.executable, "-c", probe], stderr=subprocess.DEVNULL, check=False)
    assert failed.returncode != 0
