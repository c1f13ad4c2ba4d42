"""``GET /health``: no key needed; what is up, and the counts a leak check reads."""

from __future__ import annotations

import datetime as dt
import time

from quart import Blueprint, Response, jsonify

from trioprovider import __version__
from trioprovider.app import current_provider

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health() -> Response:
    provider = current_provider()
    agents = provider.bridge.agents()
    if provider.draining:
        status = "draining"
    elif agents:
        status = "healthy"
    else:
        status = "degraded"
    gate = provider.gate
    response = jsonify(
        {
            "status": status,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "version": __version__,
            "uptime_seconds": round(time.time() - provider.started_at, 3),
            "mcp_connection": provider.bridge.connection(),
            "default_model": provider.settings.provider.model_name,
            "agents": [agent.model_dump() for agent in agents],
            "active_requests": len(provider.scopes),
            "active_sessions": len(gate.sessions),
            "session_requests": gate.sessions.active_requests,
            "open_reservations": gate.limiter.open_reservations,
        }
    )
    response.status_code = 503 if provider.draining else 200
    return response
