"""Command line: ``python -m trioprovider [serve|init|key|agent|bridge|schema] ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from trioprovider import __version__
from trioprovider.agents.runner import AgentStartError
from trioprovider.config import (
    API_KEY_VAR,
    CONFIG_VAR,
    DEFAULT_PATH,
    ConfigError,
    Settings,
    load_settings,
    new_api_key,
    new_secret,
    write_initial_config,
)

COMMANDS = ("serve", "init", "key", "agent", "bridge", "schema")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trioprovider",
        description="A local OpenAI- and Ollama-compatible provider whose models are agents.",
    )
    parser.add_argument("--version", action="version", version=f"trioprovider {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", type=Path, help="config file (default: config/config.toml if present)")
        sub.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")

    serve = commands.add_parser("serve", help="run the provider (the default command)")
    common(serve)
    serve.add_argument("--host", help="provider address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="provider port (default 8788)")
    serve.add_argument("--agent", action="append", default=[], metavar="NAME", help="run agent NAME inside the server (e.g. echo); repeatable")
    serve.add_argument("--bridge-url", help="where the bridge listens or is (default ws://127.0.0.1:8787)")
    serve.add_argument("--external-bridge", action="store_true", help="connect to a bridge run by 'python -m trioprovider bridge'")
    serve.add_argument("--echo-tokens", type=int, help="tokens per echo answer")
    serve.add_argument("--echo-delay-ms", type=float, help="delay per echo token")

    init = commands.add_parser("init", help="write config/config.toml with a fresh API key and bridge token")
    common(init)
    init.add_argument("--force", action="store_true", help="overwrite an existing config")

    key = commands.add_parser("key", help="add, list or revoke API keys in the config file")
    key_commands = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    key_new = key_commands.add_parser("new", help="add a key (printed once; only its hash is stored)")
    key_new.add_argument("--label", required=True, help="a unique name for the key (who or what uses it)")
    key_list = key_commands.add_parser("list", help="show each key's label, prefix and creation time")
    key_revoke = key_commands.add_parser("revoke", help="remove a key; a running server refuses it within seconds")
    key_revoke.add_argument("which", metavar="LABEL|PREFIX", help="the key's label, or its prefix as 'key list' shows it (put -- before a prefix starting with -)")
    for sub in (key_new, key_list, key_revoke):
        sub.add_argument("--config", type=Path, help=f"config file (default: ${CONFIG_VAR}, else {DEFAULT_PATH})")

    agent = commands.add_parser("agent", help="run an agent that connects to the bridge")
    common(agent)
    agent.add_argument(
        "name",
        choices=["echo", "openai", "cursor-cli", "mcp"],
        help="which agent (openai: forwards to an OpenAI-compatible server; mcp: the Cursor IDE agent, an MCP stdio server)",
    )
    agent.add_argument("--bridge-url", help="the bridge (default from config, or ws://127.0.0.1:8787)")
    agent.add_argument("--token", help="bridge token (default from config or LOCAL_PROVIDER_BRIDGE_TOKEN)")
    agent.add_argument("--tokens", type=int, help="echo: tokens per answer")
    agent.add_argument("--delay-ms", type=float, help="echo: delay per token")
    agent.add_argument("--models", help="comma-separated model names to advertise (cursor-cli: Cursor models, passed as --model)")
    agent.add_argument("--command", dest="cli_command", metavar="PATH", help="cursor-cli: the Cursor CLI (default: cursor-agent, else agent, on PATH)")
    agent.add_argument("--workspace", help="cursor-cli: the directory Cursor works in (default: a private scratch directory)")
    agent.add_argument(
        "--model",
        action="append",
        metavar="M",
        help="openai: a model to advertise (repeatable; default: the upstream's /v1/models); "
        "cursor-cli: Cursor model for requests for the default model",
    )
    agent.add_argument("--pickup-timeout", type=float, help="mcp: seconds a request waits for wait_for_request")
    agent.add_argument("--wait-timeout", type=float, help="mcp: wait_for_request's default long-poll in seconds")
    agent.add_argument("--base-url", help="openai: the upstream's API, e.g. http://127.0.0.1:11434/v1")
    agent.add_argument("--api-key", help="openai: the upstream's API key (or LOCAL_PROVIDER_UPSTREAM_API_KEY)")
    agent.add_argument("--timeout", type=float, help="openai: seconds the upstream may stay silent")
    agent.add_argument("--max-concurrency", type=int, help="requests the agent handles at once")

    bridge = commands.add_parser("bridge", help="run the bridge alone (for mcp.embedded_bridge = false)")
    common(bridge)
    bridge.add_argument("--bridge-url", help="where to listen (default ws://127.0.0.1:8787)")

    schema = commands.add_parser("schema", help="print the bridge protocol's JSON Schema")
    schema.add_argument("--output", type=Path, help="write it to this file instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in COMMANDS and args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "schema":
            return _schema(args)
        if args.command == "key":
            return _key(args)
        settings = load_settings(args.config, overrides=_overrides(args))
        _setup_logging(settings, _process_name(args))
        from trioprovider.server import StartupError, preflight, tune_gc

        # Every command from here on serves until it is stopped.
        tune_gc()
        if args.command == "agent":
            try:
                trio.run(_run_agent, settings, args)
            except (StartupError, AgentStartError) as error:
                raise ConfigError(str(error)) from None
        elif args.command == "bridge":
            trio.run(_run_bridge, settings)
        else:
            try:
                preflight(settings, args.agent, warn=False)
                trio.run(_run_server, settings, args.agent)
            except StartupError as error:
                raise ConfigError(str(error)) from None
            except BaseExceptionGroup as group:
                # An embedded agent that cannot start stops the server from inside its nurseries.
                failure = _start_failure(group)
                if failure is None:
                    raise
                raise ConfigError(str(failure)) from None
    except ConfigError as error:
        print(f"trioprovider: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    get = partial(getattr, args)
    # The config section of the agent 'agent NAME' runs (echo for the other commands).
    section = (get("name", None) or "echo").replace("-", "_")
    named_models: list[str] = get("model", None) or []
    overrides: dict[str, Any] = {
        "logging.level": get("log_level", None),
        "provider.host": get("host", None),
        "provider.port": get("port", None),
        "mcp.bridge_url": get("bridge_url", None),
        "mcp.token": get("token", None),
        "agents.echo.tokens": get("echo_tokens", None) or get("tokens", None),
        "agents.echo.delay_ms": _first(get("echo_delay_ms", None), get("delay_ms", None)),
        "agents.cursor_cli.command": get("cli_command", None),
        "agents.cursor_cli.workspace": get("workspace", None),
        "agents.cursor_cli.model": named_models[-1] if section == "cursor_cli" and named_models else None,
        "agents.mcp.pickup_timeout": get("pickup_timeout", None),
        "agents.mcp.wait_timeout": get("wait_timeout", None),
        "agents.openai.base_url": get("base_url", None),
        "agents.openai.api_key": get("api_key", None),
        "agents.openai.timeout": get("timeout", None),
        f"agents.{section}.max_concurrency": get("max_concurrency", None),
    }
    if get("external_bridge", False):
        overrides["mcp.embedded_bridge"] = False
    models = [name.strip() for name in (get("models", None) or "").split(",") if name.strip()]
    if section == "openai":
        models += named_models
    if models:
        overrides[f"agents.{section}.models"] = models
    return {key: value for key, value in overrides.items() if value is not None}


def _start_failure(group: BaseExceptionGroup[BaseException]) -> AgentStartError | None:
    """The agent start-up failure a group holds, if that is all it holds."""
    match, rest = group.split(AgentStartError)
    if match is None or rest is not None:
        return None
    failure: BaseException = match
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    return failure if isinstance(failure, AgentStartError) else None


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _process_name(args: argparse.Namespace) -> str | None:
    """Whose log file this process writes (see logs.log_file); None: console only."""
    if args.command == "agent":
        # Cursor starts 'agent mcp' in a directory of its choosing: no logs/ appears there.
        return None if args.name == "mcp" else f"agent-{args.name}"
    return "bridge" if args.command == "bridge" else "provider"


def _setup_logging(settings: Settings, process: str | None) -> None:
    from trioprovider import logs

    file = logs.log_file(settings.logging, process) if process else ""
    try:
        logs.configure(settings.logging, file)
    except OSError as error:
        raise ConfigError(f"logging.file: cannot write {file}: {error.strerror or error}") from None


def _init(args: argparse.Namespace) -> int:
    path = args.config or Path("config/config.toml")
    api_key, _token = write_initial_config(path, force=args.force)
    print(f"Wrote {path} (mode 0600).")
    print(f"API key (shown once; only its hash is stored): {api_key}")
    print("Agents started from this directory read the bridge token from the same file.")
    return 0


def _key(args: argparse.Namespace) -> int:
    from trioprovider import apikeys

    path = args.config or Path(os.environ.get(CONFIG_VAR) or DEFAULT_PATH)
    apikeys.existing_config(path)
    if args.key_command == "new":
        # Checked before a key is made, so a refused label never prints one.
        apikeys.check_label(args.label, apikeys.read_keys(path))
        plain, entry = new_api_key(args.label)
        apikeys.edit_keys(path, lambda data: (apikeys.with_key(data, entry), None))
        print(f"Added key {entry.label!r} (prefix {entry.prefix}) to {path}; a running server accepts it within seconds.")
        print(f"API key (shown once; only its hash is stored): {plain}")
    elif args.key_command == "list":
        keys = apikeys.read_keys(path)
        print(apikeys.key_table(keys) if keys else f"No API keys in {path}.")
        if os.environ.get(API_KEY_VAR):
            print(f"(and one more from {API_KEY_VAR}, for processes started with it)")
    else:
        removed = apikeys.edit_keys(path, lambda data: apikeys.without_key(data, args.which))
        prefix = f" (prefix {removed.prefix})" if removed.prefix else ""
        print(f"Revoked key {removed.label!r}{prefix} in {path}; a running server refuses it within seconds.")
        if not apikeys.read_keys(path):
            print("No keys are left in the file: a server started now makes a key for its run only.")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from trioprovider.protocol import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


async def _run_server(settings: Settings, agents: list[str]) -> None:
    from trioprovider.server import serve

    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(serve, settings, agents=agents, handle_signals=True))
        print(banner(running, settings), flush=True)


def banner(running: Any, settings: Settings) -> str:
    provider = running.provider
    models = sorted({card.id for agent in provider.bridge.agents() for card in agent.models})
    source = settings.source or "defaults (no config file)"
    lines = [
        f"trioprovider {__version__}  ·  config: {source}",
        f"  OpenAI API   {running.provider_url}/v1",
        *([f"  Ollama API   {running.ollama_url} (no key; loopback; Host/Origin checked)"] if running.ollama_url else []),
        f"  bridge       {running.bridge_url} ({'embedded' if running.hub else 'external'})",
        f"  models       {', '.join([settings.provider.model_name, *models])}"
        + ("" if models else "  (no agent connected yet)"),
    ]
    if running.ephemeral_api_key:
        lines.append(f"  API key      {running.ephemeral_api_key}  (this run only; 'python -m trioprovider init' makes a lasting one)")
    else:
        lines.append(f"  API key      the key 'init' printed (stored hashed in {source})")
    if settings.mcp.token:
        lines.append("  agents       python -m trioprovider agent echo   (reads the bridge token from the config)")
    else:
        lines.append(
            f"  agents       LOCAL_PROVIDER_BRIDGE_TOKEN={running.bridge_token} "
            f"python -m trioprovider agent echo --bridge-url {running.bridge_url}"
        )
    lines.append("  Ctrl+C drains and stops.")
    return "\n".join(lines)


async def _run_agent(settings: Settings, args: argparse.Namespace) -> None:
    from trioprovider.agents.runner import lifetime, run_agent
    from trioprovider.server import drain_on_signals, make_agent

    if args.name == "mcp":
        from trioprovider.agents.mcp_stdio import run_mcp_agent

        await run_mcp_agent(settings)
        return
    if not settings.mcp.token:
        raise ConfigError("no bridge token: set LOCAL_PROVIDER_BRIDGE_TOKEN, pass --token, or run 'init'")
    agent = make_agent(args.name, settings)
    stopping = trio.Event()
    async with lifetime(agent), trio.open_nursery() as nursery:
        # SIGTERM would otherwise end the process on the spot, cutting off the answers in flight
        # and skipping the cleanup that stops what agents started (the Cursor CLI's process
        # groups): it drains instead, as the server does.
        nursery.start_soon(partial(drain_on_signals, stopping, nursery.cancel_scope, grace=settings.provider.graceful_timeout))
        await run_agent(
            agent,
            settings.mcp.bridge_url,
            settings.mcp.token,
            reconnect_delay=max(0.5, settings.mcp.reconnect_delay),
            heartbeat_interval=settings.mcp.heartbeat_interval,
            max_frame_bytes=settings.mcp.max_frame_bytes,
            stopping=stopping,
        )
        nursery.cancel_scope.cancel()


async def _run_bridge(settings: Settings) -> None:
    import urllib.parse

    from trioprovider.bridge.server import serve_bridge
    from trioprovider.server import check_bind, make_hub, warn_exposed

    token = settings.mcp.token or new_secret()
    url = urllib.parse.urlsplit(settings.mcp.bridge_url)
    host = url.hostname or "127.0.0.1"
    warn_exposed([host] if check_bind(host, settings.provider.allow_non_loopback) else [])
    hub = make_hub(settings, token)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_bridge, hub, host, 8787 if url.port is None else url.port, max_frame_bytes=settings.mcp.max_frame_bytes))
        print(f"trioprovider bridge on ws://{host}:{port}", flush=True)
        if not settings.mcp.token:
            print(f"  bridge token (this run only): {token}", flush=True)
