"""Which ``Host`` and ``Origin`` headers a local server should accept (DESIGN.md section 6).

A web page in the user's browser can reach 127.0.0.1: through DNS rebinding (a hostile name that
resolves to 127.0.0.1, so ``Host`` is that name) or a cross-site request (``Origin`` is the page).
Pure functions; the HTTP layer answers 403 when they say no.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def host_allowed(host: str | None, port: int, extra_names: Iterable[str] = ()) -> bool:
    """A loopback name (or one of ``extra_names``), with this server's port or none."""
    if not host:
        return False
    host = host.strip().lower()
    names = (*LOOPBACK_NAMES, *(name.lower() for name in extra_names))
    return any(host in (name, f"{name}:{port}") for name in names)


def origin_allowed(origin: str | None, patterns: list[str]) -> bool:
    """No ``Origin`` (not a browser) is fine; otherwise it must match one of ``patterns``
    (``*`` matches any run of characters, e.g. ``http://127.0.0.1:*``)."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in patterns)


def preflight_headers(origin: str, requested_headers: str | None) -> dict[str, str]:
    """The headers of the answer to a CORS preflight from an allowed ``origin`` (any route,
    any method we serve); ``requested_headers`` is its Access-Control-Request-Headers."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": (requested_headers or "Authorization, Content-Type")[:1000],
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }
