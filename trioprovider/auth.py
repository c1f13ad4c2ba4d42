"""API keys: kept only as SHA-256 hashes, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's label (never the key) and the client's address."""

    key_label: str
    client: str

    @property
    def owner(self) -> str:
        return f"{self.key_label}@{self.client}"


class KeyRing:
    def __init__(self, keys: list[tuple[str, str]]) -> None:
        """``keys``: (label, sha256 hex) pairs."""
        self._keys = [(label, bytes.fromhex(digest)) for label, digest in keys]

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, label: str, digest: str) -> None:
        self._keys.append((label, bytes.fromhex(digest)))

    def check(self, authorization: str | None) -> str | None:
        """The label of the key in an ``Authorization: Bearer`` header, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        # Compare against every key, match or not, so timing does not tell which one matched.
        for label, expected in self._keys:
            if hmac.compare_digest(digest, expected) and found is None:
                found = label
        return found
