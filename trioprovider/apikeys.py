"""``python -m trioprovider key new|list|revoke``: the API keys in a config file.

The pure part edits the file's parsed TOML (``security.api_keys``) and leaves every other value as
it was; :func:`edit_keys` does the I/O: read under a lock, validate, write atomically (mode 0600).
Only the digest and the first characters of a key are ever stored; the plain key is returned to
the caller to show once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import tomli_w

from trioprovider.config import ApiKey, ConfigError, Settings, load_settings, replace_private

#: Labels the server gives keys that live in no file; a file key may not take them.
RESERVED_LABELS = frozenset({"env", "ephemeral", "ollama-listener"})
MAX_LABEL_LENGTH = 64

Result = TypeVar("Result")


def stored_keys(data: dict[str, Any]) -> list[ApiKey]:
    """The keys in a config file's parsed TOML (validated by the caller beforehand)."""
    security = data.get("security", {})
    return [ApiKey.model_validate(entry) for entry in security.get("api_keys", [])]


def check_label(label: str, keys: list[ApiKey]) -> None:
    """Raise :class:`ConfigError` unless ``label`` may name a new key beside ``keys``."""
    if not label or label != label.strip() or not label.isprintable() or len(label) > MAX_LABEL_LENGTH:
        raise ConfigError(
            f"label {label!r}: use 1 to {MAX_LABEL_LENGTH} printable characters, without leading or trailing spaces"
        )
    if label in RESERVED_LABELS:
        raise ConfigError(f"label {label!r} is reserved for keys that live in no file; choose another")
    if any(key.label == label for key in keys):
        raise ConfigError(f"a key labelled {label!r} exists already; labels are unique (revoke it first, or pick another)")


def with_key(data: dict[str, Any], entry: ApiKey) -> dict[str, Any]:
    """``data`` with ``entry`` appended to ``security.api_keys`` (``data`` itself is not changed)."""
    check_label(entry.label, stored_keys(data))
    security = dict(data.get("security", {}))
    security["api_keys"] = [*security.get("api_keys", []), entry.model_dump()]
    return {**data, "security": security}


def without_key(data: dict[str, Any], which: str) -> tuple[dict[str, Any], ApiKey]:
    """``data`` without the key whose label (else whose prefix) is ``which``, and that key."""
    keys = stored_keys(data)
    matches = [index for index, key in enumerate(keys) if key.label == which]
    if not matches:
        matches = [index for index, key in enumerate(keys) if key.prefix and key.prefix == which]
    if not matches:
        known = ", ".join(repr(key.label) for key in keys) or "none"
        raise ConfigError(f"no key with label or prefix {which!r} (keys: {known}); nothing changed")
    if len(matches) > 1:
        raise ConfigError(f"{len(matches)} keys match {which!r}; revoke by a label or prefix that names one; nothing changed")
    (index,) = matches
    security = dict(data["security"])
    entries = list(security["api_keys"])
    del entries[index]
    security["api_keys"] = entries
    return {**data, "security": security}, keys[index]


def key_table(keys: list[ApiKey]) -> str:
    """``key list``'s output: label, prefix and creation time of each key (never a digest)."""
    rows = [("LABEL", "PREFIX", "CREATED")]
    rows += [(key.label, key.prefix or "-", key.created or "-") for key in keys]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(f"{label:<{widths[0]}}  {prefix:<{widths[1]}}  {created}".rstrip() for label, prefix, created in rows)


def leading_comments(text: str) -> str:
    """The comment block a file starts with (``init`` writes one), kept when the file is rewritten."""
    lines = text.splitlines(keepends=True)
    end = 0
    while end < len(lines) and (not lines[end].strip() or lines[end].lstrip().startswith("#")):
        end += 1
    header = "".join(lines[:end])
    return header if header.strip() else ""


def edit_keys(path: Path, change: Callable[[dict[str, Any]], tuple[dict[str, Any], Result]]) -> Result:
    """Apply ``change`` to the config file at ``path``; its second result is returned.

    The file is locked while it is read and rewritten, so two edits at once do not lose either;
    it is replaced whole (see :func:`replace_private`) and only if ``change`` succeeds and the
    result is a valid config.
    """
    with _locked(path) as text:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
        # The file must be valid as it stands (errors name the key, as at start-up).
        load_settings(path, env={})
        changed, result = change(data)
        try:
            Settings.model_validate(changed)
        except pydantic.ValidationError as error:
            raise ConfigError(f"{path}: the edit would make the config invalid: {error}") from None
        replace_private(path, leading_comments(text) + tomli_w.dumps(changed))
    return result


def read_keys(path: Path) -> list[ApiKey]:
    """The keys stored in the config file at ``path``."""
    return load_settings(path, env={}).security.api_keys


def existing_config(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (create one with 'python -m trioprovider init')")
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[str]:
    """Hold an exclusive lock on the file now at ``path``; its text."""
    target = Path(os.path.realpath(existing_config(path)))
    while True:
        try:
            file = target.open("r", encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
        with file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            # An edit that held the lock before us replaced the file: lock the new one instead.
            try:
                current = os.stat(target)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(file.fileno()).st_ino:
                try:
                    text = file.read()
                except (OSError, UnicodeDecodeError) as error:
                    raise ConfigError(f"{path}: cannot read: {error}") from None
                yield text
                return
