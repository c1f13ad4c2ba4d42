"""``GET /metrics`` (key required): Prometheus text, or JSON for ``Accept: application/json``;
``GET /dashboard`` (no key: the page holds no data, it asks for the key and reads ``/metrics``)."""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import re

from quart import Blueprint, Response, jsonify, request

from trioprovider.app import current_provider
from trioprovider.errors import ApiError, invalid_request
from trioprovider.provider import current_incoming

blueprint = Blueprint("metrics", __name__)

FORMATS = ("json", "prometheus")


def wants_json(accept: str, format_param: str | None) -> bool:
    """JSON if asked by ``?format=json`` or by an Accept header preferring it; Prometheus text
    otherwise (a scraper, curl, a browser's ``*/*``)."""
    if format_param is not None:
        return format_param == "json"
    return "application/json" in accept.lower() and "openmetrics" not in accept.lower()


@blueprint.get("/metrics")
async def metrics() -> Response:
    provider = current_provider()
    if provider.on_keyless_listener(current_incoming()):
        raise ApiError(403, "/metrics needs an API key; it is not served on the key-less Ollama listener.", code="forbidden")
    provider.authenticate(current_incoming())
    format_param = request.args.get("format")
    if format_param is not None and format_param not in FORMATS:
        raise invalid_request(f"format must be one of {', '.join(FORMATS)}.", param="format")
    accept = request.headers.get("Accept", "")
    if wants_json(accept, format_param):
        response = jsonify(provider.metrics.summary())
    else:
        body, content_type = provider.metrics.exposition(accept)
        response = Response(body, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response


@functools.cache
def dashboard_page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: only its own inline script and style may run,
    and it may connect only to this server."""
    page = importlib.resources.files("trioprovider").joinpath("dashboard.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in bodies
        )

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy


@blueprint.get("/dashboard")
async def dashboard() -> Response:
    page, policy = dashboard_page()
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = policy
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response
