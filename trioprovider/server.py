"""The whole process at a glance: the nursery tree of ``python -m trioprovider``.

::

    trio.run(serve)
    └── root nursery
        ├── bridge hub on ws://127.0.0.1:8787     (embedded; or a RemoteBridge link to an external one)
        │     └── per peer: reader, liveness pings; per relayed request: a relay task
        ├── embedded agents                        (each a bridge peer over an in-process stream, after
        │                                           its start-up: openai lists its upstream's models)
        ├── session reaper                         (ends expired and idle sessions)
        ├── HTTP: hypercorn.trio.serve(RequestGuard(ModelRoutes(Quart app)))   (http://127.0.0.1:8788)
        │     └── per connection → per request
        │           ├── model routes (model_routes.py): the request task runs the agent stream
        │           │   and writes the answer itself; the client hanging up cancels it (noticed
        │           │   by the request task itself while it waits for a whole answer, by a task
        │           │   while it is queued or streams: client_watch.py); a streamed answer also
        │           │   has a stall watch (a write stalled past CLIENT_STALL_TIMEOUT)
        │           └── every other route: Quart-Trio (its own nursery, cancelled on disconnect)
        └── signal watcher                         (SIGINT/SIGTERM: drain; a second one: stop now)

When the HTTP server returns (after a graceful drain) the root nursery is cancelled and every
other task ends with it.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import math
import signal
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from trioprovider.admission import Gate
from trioprovider.agents.echo import EchoAgent
from trioprovider.audit import AuditLog
from trioprovider.agents.runner import Agent, lifetime, run_agent, serve_agent
from trioprovider.app import create_app
from trioprovider.guard import RequestGuard
from trioprovider.model_routes import ModelRoutes
from trioprovider.provider import Provider
from trioprovider.auth import KeyRing
from trioprovider.bridge.calls import Bridge
from trioprovider.bridge.hub import BridgeHub
from trioprovider.bridge.remote import RemoteBridge
from trioprovider.bridge.server import serve_bridge
from trioprovider.bridge.streams import local_stream_pair
from trioprovider.config import Settings, hash_key, key_prefix, new_secret
from trioprovider.ratelimit import RateLimiter
from trioprovider.sessions import SessionStore

log = logging.getLogger(__name__)

#: Seconds Hypercorn waits past ``graceful_timeout`` for the terminal records to be written.
SHUTDOWN_MARGIN = 3.0
#: How often a draining server looks whether its requests are done.
SHUTDOWN_POLL = 0.05

AGENT_NAMES = ("echo", "openai", "cursor-cli")


class StartupError(Exception):
    """The server cannot start as configured; ``str()`` is one line saying why."""


@dataclass
class Running:
    """What a started server tells its caller (the CLI banner, tests)."""

    provider: Provider
    provider_url: str
    bridge_url: str
    bridge_token: str
    #: The key-less Ollama listener's URL, when ``ollama.listen`` is set.
    ollama_url: str | None
    #: The plain API key when one was generated for this run only (no key configured).
    ephemeral_api_key: str | None
    hub: BridgeHub | None
    shutdown: trio.Event


def make_agent(name: str, settings: Settings) -> Agent:
    if name == "echo":
        echo = settings.agents.echo
        return EchoAgent(
            tokens=echo.tokens,
            delay=echo.delay_ms / 1000,
            models=echo.models,
            max_concurrency=echo.max_concurrency,
        )
    if name == "openai":
        from trioprovider.agents.upstream import UpstreamAgent

        upstream = settings.agents.openai
        if not upstream.base_url:
            raise StartupError(
                "agents.openai.base_url is not set: pass --base-url URL ('agent openai'), "
                "set LOCAL_PROVIDER_UPSTREAM_BASE_URL, or set it under [agents.openai]"
            )
        return UpstreamAgent(
            base_url=upstream.base_url,
            api_key=upstream.api_key,
            models=upstream.models,
            timeout=upstream.timeout,
            max_concurrency=upstream.max_concurrency,
        )
    if name in ("cursor-cli", "cursor_cli"):
        from trioprovider.agents.cursor_cli import make_cursor_cli_agent

        return make_cursor_cli_agent(settings.agents.cursor_cli, settings.provider.model_name)
    if name == "mcp":
        raise StartupError(
            "agent 'mcp' is an MCP stdio server that Cursor starts ('python -m trioprovider agent mcp' "
            "in .cursor/mcp.json); it cannot run inside the server"
        )
    raise StartupError(f"unknown agent {name!r}; known agents: {', '.join(AGENT_NAMES)}")


def check_bind(host: str, allow_non_loopback: bool) -> bool:
    """Refuse a non-loopback ``host`` unless allowed (StartupError); True if it is one (exposed)."""
    if host == "localhost":
        return False
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_non_loopback:
        raise StartupError(
            f"provider.host: refusing to listen on {host!r}, which is not a loopback address; "
            "set provider.allow_non_loopback = true to expose the server to the network"
        )
    return not loopback


def warn_exposed(hosts: Sequence[str]) -> None:
    if hosts:
        log.warning(
            "LISTENING ON %s: any machine that can reach it can try your API keys and bridge token",
            ", ".join(sorted(set(hosts))),
        )


#: Net allocations of container objects between two young-generation collections (Python's
#: default: 700). See :func:`tune_gc`.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Set the cyclic garbage collector up for serving; call once, after start-up, in a process
    that only serves (the command line does; tests do not).

    A request's objects nearly all die by reference counting; the collector is there for the
    rare cycle. At its default it ran every 700 net allocations, which a handful of requests in
    flight reach many times a second, walking every young object each time (7 % of an
    unstreamed request's CPU in our own code). The objects alive at start-up (modules, settings,
    the app) are moved out of its sight for good, and it runs every 10,000 net allocations.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def make_hub(settings: Settings, token: str, audit: AuditLog | None = None) -> BridgeHub:
    return BridgeHub(
        token=token,
        default_model=settings.provider.model_name,
        queue_limit=settings.mcp.queue_limit,
        heartbeat_interval=settings.mcp.heartbeat_interval,
        hello_timeout=settings.mcp.connection_timeout,
        audit=audit,
    )


def open_audit_log(settings: Settings) -> AuditLog:
    """The audit log of ``logging.audit_file`` (empty: none), rotating like the main log."""
    logs = settings.logging
    if not logs.audit_file:
        return AuditLog.disabled()
    try:
        return AuditLog.to_file(logs.audit_file, max_bytes=logs.max_bytes, backup_count=logs.backup_count)
    except OSError as error:
        raise StartupError(f"logging.audit_file: cannot write {logs.audit_file}: {error.strerror or error}") from None


def preflight(settings: Settings, agents: Sequence[str] = (), *, warn: bool = True) -> list[Agent]:
    """Check what can be checked before any task starts; the embedded agents to run.

    ``warn``: say (once) which addresses are exposed; the CLI checks early without it, and the
    server says it as it starts."""
    exposed = [settings.provider.host] if check_bind(settings.provider.host, settings.provider.allow_non_loopback) else []
    if settings.ollama.listen:
        # No key on that listener: loopback only, whatever allow_non_loopback says.
        check_bind(settings.ollama.listen.rsplit(":", 1)[0].strip("[]"), allow_non_loopback=False)
    if settings.mcp.embedded_bridge:
        bridge_host = urllib.parse.urlsplit(settings.mcp.bridge_url).hostname or "127.0.0.1"
        if check_bind(bridge_host, settings.provider.allow_non_loopback):
            exposed.append(bridge_host)
    if warn:
        warn_exposed(exposed)
    return [make_agent(name, settings) for name in (*settings.agents.embedded, *agents)]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    settings: Settings,
    *,
    agents: Sequence[str] = (),
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the provider until shut down: the root of the nursery tree above."""
    embedded_agents = preflight(settings, agents)
    bridge_token = settings.mcp.token or new_secret()
    # Follows the config file: keys added or revoked there apply without a restart.
    keys = KeyRing.from_settings(settings)
    ephemeral_key = None
    if not len(keys):
        ephemeral_key = new_secret()
        keys.add("ephemeral", hash_key(ephemeral_key), key_prefix(ephemeral_key))
    sessions = SessionStore(
        ttl=settings.security.session_ttl,
        max_idle=settings.sessions.max_idle_time,
        max_sessions=settings.security.max_sessions,
        max_per_owner=settings.security.max_sessions_per_client,
    )
    limits = settings.rate_limiting
    limiter = RateLimiter(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        burst=limits.burst_allowance,
        enabled=limits.enabled,
    )
    shutdown = trio.Event()

    audit = open_audit_log(settings)
    try:
        async with trio.open_nursery() as root:
            bridge: Bridge
            hub: BridgeHub | None = None
            if settings.mcp.embedded_bridge:
                hub = make_hub(settings, bridge_token, audit)
                url = urllib.parse.urlsplit(settings.mcp.bridge_url)
                bridge_host = url.hostname or "127.0.0.1"
                bridge_port = await root.start(
                    partial(
                        serve_bridge,
                        hub,
                        bridge_host,
                        8787 if url.port is None else url.port,
                        max_frame_bytes=settings.mcp.max_frame_bytes,
                    )
                )
                bridge_url = f"{url.scheme}://{_hostport(bridge_host, bridge_port)}"
                bridge = hub
                for agent in embedded_agents:
                    hub_end, agent_end = local_stream_pair(agent.agent_id, "bridge")
                    root.start_soon(hub.accept, hub_end)
                    await root.start(_run_embedded, agent, partial(serve_agent, agent, agent_end, bridge_token))
            else:
                bridge_url = settings.mcp.bridge_url
                remote = RemoteBridge(
                    url=bridge_url,
                    token=bridge_token,
                    provider_id=settings.mcp.agent_id,
                    default_model=settings.provider.model_name,
                    connection_timeout=settings.mcp.connection_timeout,
                    heartbeat_interval=settings.mcp.heartbeat_interval,
                    reconnect_attempts=settings.mcp.reconnect_attempts,
                    reconnect_delay=settings.mcp.reconnect_delay,
                    max_frame_bytes=settings.mcp.max_frame_bytes,
                )
                await root.start(remote.run)
                bridge = remote
                for agent in embedded_agents:
                    await root.start(
                        _run_embedded,
                        agent,
                        partial(
                            run_agent,
                            agent,
                            bridge_url,
                            bridge_token,
                            reconnect_delay=settings.mcp.reconnect_delay,
                            heartbeat_interval=settings.mcp.heartbeat_interval,
                            max_frame_bytes=settings.mcp.max_frame_bytes,
                        )
                    )

            provider = Provider(
                settings=settings,
                bridge=bridge,
                keys=keys,
                gate=Gate(sessions, limiter),
                bridge_url=bridge_url,
                audit=audit,
            )
            root.start_soon(_reap_sessions, provider.gate, settings.sessions.cleanup_interval)
            if handle_signals:
                root.start_soon(drain_on_signals, shutdown, root.cancel_scope)
            binds = await root.start(_serve_http, provider, shutdown, root.cancel_scope)
            task_status.started(
                Running(
                    provider=provider,
                    provider_url=binds[0],
                    ollama_url=binds[1] if len(binds) > 1 else None,
                    bridge_url=bridge_url,
                    bridge_token=bridge_token,
                    ephemeral_api_key=ephemeral_key,
                    hub=hub,
                    shutdown=shutdown,
                )
            )
    finally:
        audit.close()


async def _run_embedded(
    agent: Agent,
    run: Callable[[], Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start an embedded agent (a failure, such as an unreachable upstream, stops the server at
    start), then ``run`` it."""
    async with lifetime(agent):
        task_status.started()
        await run()


async def _serve_http(
    provider: Provider,
    shutdown: trio.Event,
    root: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    settings = provider.settings.provider
    config = hypercorn.config.Config()
    config.bind = [_hostport(settings.host, settings.port)]
    if provider.settings.ollama.listen:
        config.bind.append(provider.settings.ollama.listen)
    # Hypercorn's own limit comes after ours: by then every stream has had its terminal record.
    config.graceful_timeout = settings.graceful_timeout + SHUTDOWN_MARGIN
    # Clients send nothing while a stream runs: no read timeout may cut them off.
    config.read_timeout = None
    config.keep_alive_timeout = 75
    config.include_server_header = False
    # RequestGuard writes the access log: Hypercorn's has no request id and logs every
    # keep-alive request twice (once as if the client had left).
    config.accesslog = None
    config.errorlog = logging.getLogger("trioprovider.http")

    access_log = logging.getLogger("trioprovider.access") if provider.settings.logging.access_log else None

    async with trio.open_nursery() as nursery:

        async def drain() -> None:
            await shutdown.wait()
            provider.draining = True
            log.info("shutting down: finishing in-flight requests (up to %.0fs)", settings.graceful_timeout)
            nursery.start_soon(_end_in_flight, provider, settings.graceful_timeout)

        async def serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            await hypercorn.trio.serve(
                RequestGuard(ModelRoutes(provider, create_app(provider)), provider, access_log=access_log), config, shutdown_trigger=drain, task_status=task_status
            )

        binds = await nursery.start(serve)
        if len(binds) > 1:
            provider.keyless_port = int(binds[1].rsplit(":", 1)[1])
        task_status.started(binds)
    # HTTP is done: close the bridge connections properly before everything is cancelled.
    await provider.bridge.aclose()
    root.cancel()


async def _end_in_flight(provider: Provider, grace: float) -> None:
    """Let in-flight requests finish for ``grace`` seconds, then stop the rest with a terminal
    record for the client and ``model_cancel`` for the agent (reason ``shutdown``)."""
    with trio.move_on_after(grace):
        while provider.scopes:
            await trio.sleep(SHUTDOWN_POLL)
    if provider.scopes:
        log.warning("shutting down: stopping %d requests still running", len(provider.scopes))
    for scope in list(provider.scopes):
        scope.cancel("shutdown")


async def _reap_sessions(gate: Gate, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        ended = gate.sessions.purge(now)
        gate.limiter.forget_full(now)
        if ended:
            log.debug("session reaper: %d sessions ended", ended)


async def drain_on_signals(draining: trio.Event, stop_now: trio.CancelScope, *, grace: float = math.inf) -> None:
    """The first SIGINT or SIGTERM sets ``draining``; a second one, or ``grace`` seconds after
    the first, cancels ``stop_now``. The server bounds its drain itself; an agent process, whose
    drain is only waiting for its answers, passes ``grace``."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: draining", signal.Signals(signum).name)
            draining.set()
            break
        with trio.move_on_after(grace):
            async for _ in signals:
                log.warning("second signal: stopping now")
                break
    stop_now.cancel()

