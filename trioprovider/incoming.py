"""One HTTP request as the provider needs to know it, read once from the ASGI scope.

The model routes answer on plain ASGI and the other routes through Quart; both ask the same
questions of a request (who sent it, to which listener, with which Host, Origin and key), so
both get them from this one value instead of from a framework's request object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Incoming:
    method: str
    #: The path as routed (``//v1/...`` already folded to ``/v1/...``).
    path: str
    #: Header names in lower case; of a repeated header, the first value (as Werkzeug's ``get``).
    headers: dict[str, str]
    #: The peer's address (``unknown`` when the server does not say).
    client: str
    #: The port of the listener the request came in on (0 when the server does not say).
    server_port: int
    request_id: str
    #: The Host header as sent, when it had to be replaced before routing (see app._with_safe_host).
    original_host: str | None = None

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (lower case), or None."""
        return self.headers.get(name)

    @classmethod
    def from_scope(cls, scope: Any, request_id: str, original_host: str | None = None) -> Incoming:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        client = scope.get("client")
        server = scope.get("server")
        return cls(
            method=scope["method"],
            path=scope["path"],
            headers=headers,
            client=client[0] if client else "unknown",
            server_port=(server[1] if server else None) or 0,
            request_id=request_id,
            original_host=original_host,
        )
