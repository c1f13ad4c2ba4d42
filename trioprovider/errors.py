"""Errors a client sees, in one place, with their HTTP status and OpenAI/Ollama bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trioprovider.protocol import ModelError

#: How an agent's ``model_error`` code maps to an HTTP status. Unlisted codes: 502.
_AGENT_STATUS = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "no_agent": 503,
    "overloaded": 503,
    "agent_disconnected": 503,
    # The agent's process is stopping: it finishes what it has and takes nothing new.
    "shutdown": 503,
    "timeout": 504,
    "rate_limited": 429,
    # The Cursor IDE agent (agent mcp) did not take the request in time.
    "pickup_timeout": 504,
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass
class ApiError(Exception):
    """An error answer: ``status``, a message for humans and an OpenAI ``code``."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "server_error")

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of this error as an answer to a request for ``path``
        (Ollama's shape under ``/api/``, OpenAI's elsewhere)."""
        body = self.ollama_body() if path.startswith("/api/") else self.openai_body()
        headers = {"Content-Type": "application/json", **self.headers}
        if self.status in (408, 413):
            # The unread rest of the body would otherwise be taken for the next request: close,
            # and say so, so that clients do not send their next request on this connection.
            headers["Connection"] = "close"
        return self.status, headers, json.dumps(body).encode()

    def with_headers(self, headers: dict[str, str]) -> ApiError:
        return ApiError(self.status, self.message, self.code, self.param, {**headers, **self.headers})

    @classmethod
    def from_agent(cls, error: ModelError) -> ApiError:
        return cls(_AGENT_STATUS.get(error.code, 502), error.message, code=error.code)


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_request", param=param)


def request_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def unauthorized(message: str = "Invalid or missing API key. Send 'Authorization: Bearer <key>'.") -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str, available: list[str]) -> ApiError:
    return ApiError(
        404,
        f"The model {model!r} does not exist. Available models: {', '.join(available) or 'none'}.",
        code="model_not_found",
        param="model",
    )


def no_agent(model: str, bridge_url: str) -> ApiError:
    return ApiError(
        503,
        f"No agent is connected to serve {model!r}. Start one: "
        f"'python -m trioprovider agent echo' (connects to {bridge_url}), "
        "or start the server with '--agent echo'.",
        code="no_agent",
        headers={"Retry-After": "5"},
    )
