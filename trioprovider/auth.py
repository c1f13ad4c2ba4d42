"""API keys: kept only as SHA-256 hashes, checked in constant time, re-read when the config changes."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trioprovider.config import API_KEY_VAR, KEY_PREFIX_LENGTH, ApiKey, ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

#: What a presented token must look like before any of it is logged: URL-safe or base64
#: characters, long enough that its first characters are a small part of it.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9._~+/=-]{20,512}")


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's label (never the key) and the client's address."""

    key_label: str
    client: str

    @property
    def owner(self) -> str:
        return f"{self.key_label}@{self.client}"


@dataclass(frozen=True)
class KeyMatch:
    """The key a request presented: its label and its stored prefix (empty for old entries)."""

    label: str
    prefix: str


@dataclass(frozen=True)
class _Entry:
    label: str
    prefix: str
    digest: bytes


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def presented_prefix(authorization: str | None) -> str:
    """What an audit log may show of a refused token: its first characters, if it looks like a key.

    Anything else (a password typed by mistake, a short or odd string) gives "": logging part
    of it could give away more than it identifies.
    """
    token = bearer_token(authorization)
    if token is None or not _TOKEN_SHAPE.fullmatch(token):
        return ""
    return token[:KEY_PREFIX_LENGTH]


def _environment_without_key() -> dict[str, str]:
    # The key from LOCAL_PROVIDER_API_KEY is kept apart (it survives reloads): not read again.
    return {name: value for name, value in os.environ.items() if name != API_KEY_VAR}


def load_file_keys(path: Path) -> list[ApiKey]:
    """The keys the config file at ``path`` holds, read as at start-up; :class:`ConfigError` if bad."""
    return [key for key in load_settings(path, env=_environment_without_key()).security.api_keys if not key.from_env]


class KeyRing:
    """The keys a request may present.

    Two kinds: keys given to the constructor or :meth:`add` stay for the life of the ring (the
    key from LOCAL_PROVIDER_API_KEY, a key made for one run); keys from ``source``, a config file,
    are replaced whenever that file changes. The file is looked at (one ``stat``) at most once per
    ``reload_interval`` seconds, when a key is checked, and read only when its inode, size or
    times changed. A file that cannot be read or is invalid leaves the keys as they were.
    """

    def __init__(
        self,
        keys: Iterable[tuple[str, str]] = (),
        *,
        source: Path | None = None,
        file_keys: Sequence[ApiKey] = (),
        reload_interval: float = 1.0,
        load: Callable[[Path], Sequence[ApiKey]] = load_file_keys,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``keys``: (label, sha256 hex) pairs; ``file_keys``: what ``source`` held when it was read."""
        self._pinned = [_Entry(label, "", bytes.fromhex(digest)) for label, digest in keys]
        self._file_keys = [_entry(key) for key in file_keys]
        self._source = source
        self._interval = reload_interval
        self._load = load
        self._clock = clock
        self._looked_at: float | None = None
        # None: the file has not been looked at yet, so the first look reads it (it may have
        # changed since ``file_keys`` were read from it).
        self._seen: tuple[int, ...] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, reload_interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> KeyRing:
        """The keys of ``settings``, following its config file (if it has one) from now on."""
        ring = cls(
            source=settings.config_path,
            file_keys=[key for key in settings.security.api_keys if not key.from_env],
            reload_interval=reload_interval,
            clock=clock,
        )
        for key in settings.security.api_keys:
            if key.from_env:
                ring.add(key.label, key.sha256, key.prefix)
        return ring

    def __len__(self) -> int:
        return len(self._pinned) + len(self._file_keys)

    def add(self, label: str, digest: str, prefix: str = "") -> None:
        """Add a key that no reload removes."""
        self._pinned.append(_Entry(label, prefix[:KEY_PREFIX_LENGTH], bytes.fromhex(digest)))

    def check(self, authorization: str | None) -> str | None:
        """The label of the key in an ``Authorization: Bearer`` header, or None."""
        match = self.identify(authorization)
        return None if match is None else match.label

    def identify(self, authorization: str | None) -> KeyMatch | None:
        """The key in an ``Authorization: Bearer`` header (label and prefix), or None."""
        self.refresh()
        token = bearer_token(authorization)
        if token is None:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        # Compare against every key, match or not, so timing does not tell which one matched.
        for entry in (*self._pinned, *self._file_keys):
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = KeyMatch(entry.label, entry.prefix)
        return found

    def refresh(self) -> None:
        """Re-read the config file if it changed (looking at most once per ``reload_interval``)."""
        if self._source is None:
            return
        now = self._clock()
        if self._looked_at is not None and now - self._looked_at < self._interval:
            return
        self._looked_at = now
        try:
            status = os.stat(self._source)
            # os.replace (how 'key new|revoke' write) gives a new inode even within one mtime tick.
            seen: tuple[int, ...] = (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        except OSError as error:
            seen = (-1, error.errno or 0)
        if seen == self._seen:
            return
        first_look = self._seen is None
        self._seen = seen
        try:
            keys = [_entry(key) for key in self._load(self._source)]
        except ConfigError as error:
            log.warning("API keys not reloaded (the previous ones stay in force): %s", error)
            return
        if not first_look or keys != self._file_keys:
            log.info("API keys reloaded from %s: %d in the file", self._source, len(keys))
        self._file_keys = keys


def _entry(key: ApiKey) -> _Entry:
    return _Entry(key.label, key.prefix, bytes.fromhex(key.sha256))
