"""The Quart-Trio application for every route but the model routes (see
:mod:`trioprovider.model_routes`): health, metrics, the dashboard, model lists, admin."""

from __future__ import annotations

from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from trioprovider.errors import ApiError, request_too_large
from trioprovider.incoming import Incoming
from trioprovider.origins import preflight_headers
from trioprovider.provider import Provider, current_exchange, current_incoming
from trioprovider.validation import parse_json


def current_provider() -> Provider:
    from quart import current_app

    return current_app.config["PROVIDER"]


async def read_json() -> Any:
    """The request body as JSON: 413 past the size limit (checked before parsing), else 400."""
    try:
        data = await request.get_data(cache=False, as_text=False)
    except RequestEntityTooLarge:
        raise request_too_large(current_provider().settings.provider.max_body_bytes) from None
    assert isinstance(data, bytes)
    return parse_json(data)


def error_response(error: ApiError, incoming: Incoming) -> Response:
    status, headers, body = error.answer(incoming.path)
    return Response(body, status=status, headers=headers)


def create_app(provider: Provider) -> QuartTrio:
    from trioprovider.routes import admin, health, metrics, ollama, openai

    app = QuartTrio("trioprovider")
    app.config["PROVIDER"] = provider
    app.config["MAX_CONTENT_LENGTH"] = provider.settings.provider.max_body_bytes
    # A body slower than this gets 408; its connection's task is the only one it holds up.
    app.config["BODY_TIMEOUT"] = provider.settings.provider.body_timeout or None
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(health.blueprint)
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(ollama.blueprint)
    app.register_blueprint(admin.blueprint)
    app.register_blueprint(metrics.blueprint)

    @app.before_request
    async def note_route() -> None:
        # First of the hooks: a request refused by the next ones is still counted by its route.
        exchange = current_exchange()
        if exchange is not None and request.url_rule is not None:
            exchange.route = request.url_rule.rule

    @app.before_request
    async def check_host_and_origin() -> Response | None:
        incoming = current_incoming()
        provider.check_host_and_origin(incoming)
        origin = incoming.header("origin")
        if request.method == "OPTIONS" and origin and "access-control-request-method" in incoming.headers:
            return Response("", status=204, headers=preflight_headers(origin, incoming.header("access-control-request-headers")))
        return None

    @app.after_request
    async def tag_response(response: Response) -> Response:
        incoming = current_incoming()
        response.headers.setdefault("X-Request-Id", incoming.request_id)
        for name, value in provider.cors_headers(incoming).items():
            if name == "Vary":
                response.vary.add(value)
            else:
                response.headers[name] = value
        return response

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return error_response(error, current_incoming())

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = {
            404: f"Unknown route {request.method} {request.path}.",
            405: f"Method {request.method} is not allowed on {request.path}.",
            408: "The request body did not arrive in time (provider.body_timeout).",
        }.get(status, error.description or error.name)
        return error_response(ApiError(status, message, code=error.name.lower().replace(" ", "_")), current_incoming())

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=error)
        return error_response(ApiError(500, "Internal error in trioprovider (see its log).", code="internal_error"), current_incoming())

    return app
