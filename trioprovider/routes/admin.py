"""``/admin/*``: sessions and agents, guarded by ``security.admin_token`` (not an API key)."""

from __future__ import annotations

import hmac
import time

import trio
from quart import Blueprint, Response, jsonify

from trioprovider.app import current_provider
from trioprovider.auth import presented_prefix
from trioprovider.errors import ApiError, unauthorized
from trioprovider.provider import Provider, current_incoming
from trioprovider.sessions import Session

blueprint = Blueprint("admin", __name__)


@blueprint.before_request
async def require_admin_token() -> None:
    provider = current_provider()
    incoming = current_incoming()
    token = provider.settings.security.admin_token
    if not token:
        raise ApiError(
            403,
            "The admin API is off: set security.admin_token (or LOCAL_PROVIDER_ADMIN_TOKEN).",
            code="admin_disabled",
        )
    if provider.on_keyless_listener(incoming):
        raise ApiError(403, "The admin API is not served on the key-less Ollama listener.", code="forbidden")
    authorization = incoming.header("authorization") or ""
    scheme, _, presented = authorization.partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())
    provider.audit.record(
        "authentication",
        success=valid,
        key="admin" if valid else None,
        key_prefix=None if valid else (presented_prefix(authorization) or None),
        client=incoming.client,
        path=incoming.path,
        request_id=incoming.request_id,
    )
    if not valid:
        raise unauthorized("Invalid or missing admin token. Send 'Authorization: Bearer <security.admin_token>'.")


def _describe(session: Session, now: float, wall: float) -> dict[str, object]:
    return {
        "id": session.id,
        "owner": session.owner,
        "created_at": round(wall - (now - session.created_at), 3),
        "expires_in_seconds": round(max(0.0, session.expires_at - now), 3),
        "idle_seconds": round(now - session.last_used, 3) if session.active_requests == 0 else 0.0,
        "active_requests": session.active_requests,
    }


@blueprint.get("/admin/sessions")
async def sessions() -> Response:
    provider = current_provider()
    now, wall = trio.current_time(), time.time()
    listed = [_describe(session, now, wall) for session in provider.gate.sessions]
    return jsonify({"object": "list", "data": listed})


def _revoke(provider: Provider, session: Session) -> None:
    provider.gate.sessions.revoke(session.id)
    provider.audit.record(
        "session_revoked",
        session_id=session.id,
        owner=session.owner,
        active_requests=session.active_requests,
        by="admin",
        client=current_incoming().client,
    )


@blueprint.delete("/admin/sessions/<session_id>")
async def revoke_session(session_id: str) -> Response:
    provider = current_provider()
    session = provider.gate.sessions.get(session_id)
    if session is None:
        raise ApiError(404, f"No live session {session_id[:128]!r}.", code="session_not_found", param="session_id")
    _revoke(provider, session)
    return jsonify({"id": session.id, "revoked": True, "stopped_requests": session.active_requests})


@blueprint.post("/admin/revoke_all_sessions")
async def revoke_all_sessions() -> Response:
    provider = current_provider()
    revoked = list(provider.gate.sessions)
    for session in revoked:
        _revoke(provider, session)
    return jsonify({"revoked": len(revoked), "stopped_requests": sum(s.active_requests for s in revoked)})


@blueprint.get("/admin/agents")
async def agents() -> Response:
    provider = current_provider()
    return jsonify({"object": "list", "data": [agent.model_dump() for agent in provider.bridge.agents()]})
