"""``agent mcp``: the Cursor IDE agent as an MCP stdio server, and a bridge agent, in one process.

Cursor starts this process from ``mcp.json`` and talks MCP over its stdin and stdout (the
official ``mcp`` SDK, v2, which runs on Trio through anyio); the process connects to the bridge
as an agent at the same time::

    trio.run(run_mcp_agent)
    └── nursery
        ├── run_agent(IdeAgent)       bridge connection; one task per request (IdeAgent.answer)
        └── MCP stdio server          one task per tool call (wait_for_request, send_chunk, ...)

When Cursor closes stdin the MCP server returns and the bridge connection is closed with it.
Logs go to stderr only: stdout carries the MCP messages.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import trio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from trioprovider import __version__
from trioprovider.agents.ide import MAX_WAIT, IdeAgent, Refusal
from trioprovider.agents.runner import AgentRejected, run_agent
from trioprovider.config import ConfigError, Settings

log = logging.getLogger(__name__)

TOOL_NAMES = ("wait_for_request", "send_chunk", "submit_response", "fail_request")

INSTRUCTIONS = """\
You are serving as the model behind a local OpenAI/Ollama-compatible provider (trioprovider).
Loop: call wait_for_request; on {"status": "idle"} call it again; on a request, write the answer
it asks for (you are the model: answer the conversation, or fill in the code between prompt and
suffix), stream it with send_chunk if it is long, finish with submit_response, or fail_request if
you cannot. Then call wait_for_request again. Do not edit files or run commands for a request.
"""


def make_ide_agent(settings: Settings) -> IdeAgent:
    ide = settings.agents.mcp
    return IdeAgent(
        models=ide.models,
        pickup_timeout=ide.pickup_timeout,
        wait_timeout=ide.wait_timeout,
        max_concurrency=ide.max_concurrency,
    )


def build_server(agent: IdeAgent) -> MCPServer:
    """The MCP server whose four tools drive ``agent``."""
    server: MCPServer = MCPServer("trioprovider", version=__version__, instructions=INSTRUCTIONS)

    @server.tool()
    async def wait_for_request(
        ctx: Context,
        timeout_s: Annotated[
            float, Field(ge=0, le=MAX_WAIT, description="seconds to wait for a request (keep it under 60)")
        ] = agent.wait_timeout,
    ) -> str:
        """Wait for the next request a client sent to the provider, and return it as JSON:
        request_id, model, kind ("chat": a conversation to continue; "completion": code to fill
        in between prompt and suffix), parameters and how_to_answer. Returns {"status": "idle"}
        if none arrived in time: then call it again. Answer each request with send_chunk /
        submit_response (or fail_request) before waiting for the next one."""

        async def progress(waited: float, total: float, message: str) -> None:
            await ctx.report_progress(waited, total, message)

        return await _refusing(agent.wait_for_request(timeout_s, progress))

    @server.tool()
    async def send_chunk(
        request_id: Annotated[str, Field(description="the request_id from wait_for_request")],
        text: Annotated[str, Field(description="the next part of the answer")],
    ) -> str:
        """Stream the next part of the answer to the waiting client (it sees it at once)."""
        return await _refusing(agent.send_chunk(request_id, text))

    @server.tool()
    async def submit_response(
        request_id: Annotated[str, Field(description="the request_id from wait_for_request")],
        text: Annotated[str, Field(description="the last part of the answer (the whole answer if nothing was streamed); may be empty")],
    ) -> str:
        """Send the last part of the answer and end the request."""
        return await _refusing(agent.submit_response(request_id, text))

    @server.tool()
    async def fail_request(
        request_id: Annotated[str, Field(description="the request_id from wait_for_request")],
        message: Annotated[str, Field(description="why the request cannot be answered; the client sees it")],
    ) -> str:
        """End the request with an error instead of an answer."""
        return await _refusing(agent.fail_request(request_id, message))

    return server


async def _refusing(call: Any) -> str:
    """A tool call's JSON answer; a :class:`Refusal` becomes an error result the IDE agent reads."""
    try:
        return _json(await call)
    except Refusal as refusal:
        raise ToolError(str(refusal)) from None


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1)


async def run_mcp_agent(settings: Settings) -> None:
    """Serve MCP on stdin/stdout and the bridge's requests until Cursor closes stdin."""
    if not settings.mcp.token:
        raise ConfigError("no bridge token: set LOCAL_PROVIDER_BRIDGE_TOKEN, pass --token, or run 'init'")
    agent = make_ide_agent(settings)
    server = build_server(agent)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_bridge_connection, agent, settings)
        await server.run_stdio_async()
        nursery.cancel_scope.cancel()


async def _bridge_connection(agent: IdeAgent, settings: Settings) -> None:
    """Run the agent's bridge connection; a fatal problem is reported through the tools.

    The process does not exit on one: Cursor owns its lifetime, and the IDE agent (hence the
    user) learns what is wrong from its next ``wait_for_request``. (It could not exit promptly
    anyway: the SDK reads stdin in a worker thread that only ends at end of input.)
    """
    url = settings.mcp.bridge_url
    problem = "the bridge connection ended; restart the trioprovider MCP server"
    # except*: the rejection surfaces from inside run_agent's nursery.
    try:
        await run_agent(
            agent,
            url,
            settings.mcp.token,
            # Keep trying for as long as Cursor keeps this server: the provider may start later.
            reconnect_attempts=None,
            reconnect_delay=max(0.5, settings.mcp.reconnect_delay),
            heartbeat_interval=settings.mcp.heartbeat_interval,
            max_frame_bytes=settings.mcp.max_frame_bytes,
        )
    except* AgentRejected as rejected:
        problem = (
            f"the bridge at {url} rejected this agent: {rejected.exceptions[0]}. Fix the bridge token "
            "(LOCAL_PROVIDER_BRIDGE_TOKEN, or mcp.token in the config) and restart the trioprovider MCP server."
        )
    except* Exception as failed:
        log.error("agent mcp: the bridge connection failed", exc_info=failed)
        problem = (
            f"the connection to the bridge at {url} failed ({failed.exceptions[0]!r}); see the trioprovider "
            "MCP server's log and restart it."
        )
    log.error("agent mcp: %s", problem)
    agent.bridge_failed(problem)
