"""Configuration: defaults < TOML file < environment < command line, validated once by pydantic.

A bad value stops start-up with one line naming the key (and the variable or flag it came
from) and the problem: :class:`ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import contextlib
import os
import re
import secrets
import tempfile
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import tomli_w
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

DEFAULT_PATH = Path("config/config.toml")
#: Names the config file when no path is given (before falling back to DEFAULT_PATH).
CONFIG_VAR = "LOCAL_PROVIDER_CONFIG"
#: A plain API key for this process only: hashed into ``security.api_keys``, never written back.
API_KEY_VAR = "LOCAL_PROVIDER_API_KEY"
#: How much of a plain API key is kept beside its hash, to tell keys apart in lists and logs.
KEY_PREFIX_LENGTH = 8


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the key and where it came from."""


class _Section(BaseModel):
    # A misspelt key would otherwise be silently ignored and its default used.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProviderSettings(_Section):
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    #: 0: any free port (tests).
    port: Annotated[int, Field(ge=0, le=65535)] = 8788
    #: The model name every agent can be asked for (VoidEditor users type it).
    model_name: Annotated[str, Field(min_length=1)] = "cursor-agent-local"
    debug: bool = False
    #: Listening beyond loopback exposes the service to the network: it must be asked for.
    allow_non_loopback: bool = False
    max_body_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    #: Seconds for a request body to arrive in full; a slower one gets 408 (0: no limit).
    body_timeout: Annotated[float, Field(ge=0)] = 10.0
    graceful_timeout: Annotated[float, Field(ge=0)] = 10.0


class ApiKey(_Section):
    label: Annotated[str, Field(min_length=1)]
    sha256: str
    created: str = ""
    #: The plain key's first characters (empty in configs written before prefixes were kept).
    prefix: Annotated[str, Field(max_length=KEY_PREFIX_LENGTH)] = ""

    # Set on the key taken from LOCAL_PROVIDER_API_KEY so that saving never writes it back.
    _from_env: bool = PrivateAttr(default=False)

    @property
    def from_env(self) -> bool:
        """Whether this key came from LOCAL_PROVIDER_API_KEY (and so lives in no file)."""
        return self._from_env

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex characters (a SHA-256 digest)")
        return value


class SecuritySettings(_Section):
    api_keys: list[ApiKey] = []
    admin_token: str = ""
    session_ttl: Annotated[float, Field(gt=0)] = 300.0
    max_sessions: Annotated[int, Field(ge=1)] = 10
    allowed_origins: list[str] = ["http://127.0.0.1:*", "http://localhost:*", "vscode-file://vscode-app"]
    max_content_bytes: Annotated[int, Field(gt=0)] = 100 * 1024
    max_messages: Annotated[int, Field(ge=1)] = 500
    #: Bound on all message contents (or prompt and suffix) of one request together.
    max_total_content_bytes: Annotated[int, Field(gt=0)] = 2 * 1024 * 1024
    #: Host names accepted besides the loopback ones (a non-loopback bind needs its own name).
    allowed_hosts: list[str] = []


class RateLimitSettings(_Section):
    enabled: bool = True
    requests_per_minute: Annotated[int, Field(ge=1)] = 60
    tokens_per_minute: Annotated[int, Field(ge=1)] = 100_000
    burst_allowance: Annotated[int, Field(ge=0)] = 10


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # The TOML key is ``json``; a field of that name would shadow ``BaseModel.json``.
    json_format: bool = Field(default=False, alias="json")
    #: Log lines on stderr too (a service whose stderr nobody rotates may turn it off).
    console: bool = True
    file: str = "logs/provider.log"
    max_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    backup_count: Annotated[int, Field(ge=0)] = 5
    access_log: bool = True
    log_prompts: bool = False
    audit_file: str = "logs/security_audit.log"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class SessionSettings(_Section):
    cleanup_interval: Annotated[float, Field(gt=0)] = 60.0
    max_idle_time: Annotated[float, Field(gt=0)] = 300.0


class BridgeSettings(_Section):
    bridge_url: str = "ws://127.0.0.1:8787"
    embedded_bridge: bool = True
    token: str = ""
    agent_id: str = "local-provider-1"
    connection_timeout: Annotated[float, Field(gt=0)] = 30.0
    heartbeat_interval: Annotated[float, Field(gt=0)] = 30.0
    reconnect_attempts: Annotated[int, Field(ge=0)] = 5
    reconnect_delay: Annotated[float, Field(ge=0)] = 5.0
    #: How long a request waits for an agent to connect before a 503.
    agent_wait_timeout: Annotated[float, Field(ge=0)] = 10.0
    max_frame_bytes: Annotated[int, Field(gt=0)] = 8 * 1024 * 1024
    #: Requests that may wait per model while every agent for it is at max_concurrency.
    queue_limit: Annotated[int, Field(ge=0)] = 64

    @field_validator("bridge_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        # The embedded bridge binds to this host and port, so both must be explicit.
        url = urllib.parse.urlsplit(value)
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme not in ("ws", "wss") or not url.hostname or port is None:
            raise ValueError("must be ws://host:port or wss://host:port, e.g. ws://127.0.0.1:8787")
        return value


class ModelSettings(_Section):
    max_tokens: Annotated[int, Field(ge=1, le=8192)] = 2048
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    # OpenAI's own bounds for these.
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream_enabled: bool = True


class PerformanceSettings(_Section):
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 50
    #: Seconds a request may wait for one of those slots before a 503.
    queue_timeout: Annotated[float, Field(ge=0)] = 2.0
    #: Seconds until the agent's first reply (0: no limit).
    request_timeout: Annotated[float, Field(ge=0)] = 30.0
    #: Seconds for the whole answer (0: no limit).
    response_timeout: Annotated[float, Field(ge=0)] = 600.0
    #: SSE keep-alive comment after this many silent seconds.
    heartbeat_interval: Annotated[float, Field(gt=0)] = 15.0


class EchoSettings(_Section):
    tokens: Annotated[int, Field(ge=1)] = 24
    delay_ms: Annotated[float, Field(ge=0)] = 0.0
    models: Annotated[list[str], Field(min_length=1)] = ["echo"]
    max_concurrency: Annotated[int, Field(ge=1)] = 16


class UpstreamSettings(_Section):
    """The ``openai`` agent: forwards requests to an OpenAI-compatible server."""

    #: The upstream's API root as OpenAI clients take it (``http://127.0.0.1:11434/v1``); a bare
    #: ``http://host:port`` means ``/v1`` there. Empty: not configured.
    base_url: str = ""
    api_key: str = ""
    #: Models to advertise; empty: whatever the upstream's ``/v1/models`` lists at start.
    models: list[str] = []
    #: Seconds the upstream may stay silent (connecting, or between streamed bytes).
    timeout: Annotated[float, Field(gt=0)] = 300.0
    max_concurrency: Annotated[int, Field(ge=1)] = 8

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value:
            url = urllib.parse.urlsplit(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("must be http(s)://host[:port][/path], e.g. http://127.0.0.1:11434/v1")
        return value


class CursorCliSettings(_Section):
    #: The CLI: a path, or a name on PATH; empty: ``cursor-agent``, else ``agent``, on PATH.
    command: str = ""
    #: The directory Cursor works in (``--workspace``); empty: a private scratch directory.
    workspace: str = ""
    #: Cursor model names to advertise besides the default model; each is passed as ``--model``.
    models: list[str] = []
    #: ``--model`` for requests for the default model; empty: Cursor's own default.
    model: str = ""
    max_concurrency: Annotated[int, Field(ge=1)] = 4
    #: Seconds between SIGTERM and SIGKILL when a run's process group is ended.
    kill_grace: Annotated[float, Field(ge=0)] = 2.0
    #: Where the tools Cursor ran are mentioned: reasoning, answer text, or nowhere.
    tool_notes: Literal["reasoning", "content", "off"] = "reasoning"
    #: More arguments for every run (e.g. ["--force"] to let Cursor run commands unasked).
    extra_args: list[str] = []


class McpAgentSettings(_Section):
    """``agent mcp``: the Cursor IDE agent, an MCP stdio server that Cursor starts."""

    models: Annotated[list[str], Field(min_length=1)] = ["cursor-ide"]
    #: Seconds a request waits for the IDE agent's wait_for_request before it fails. Keep it
    #: under performance.request_timeout, which would otherwise end it first with a 504.
    pickup_timeout: Annotated[float, Field(gt=0)] = 20.0
    #: wait_for_request's default long-poll; Cursor gives up on a tool call after 60 s.
    wait_timeout: Annotated[float, Field(gt=0, le=50)] = 25.0
    max_concurrency: Annotated[int, Field(ge=1)] = 4


class AgentSettings(_Section):
    #: Agents run inside the server's nursery tree (as with --agent NAME).
    embedded: list[str] = []
    echo: EchoSettings = Field(default_factory=EchoSettings)
    openai: UpstreamSettings = Field(default_factory=UpstreamSettings)
    cursor_cli: CursorCliSettings = Field(default_factory=CursorCliSettings)
    mcp: McpAgentSettings = Field(default_factory=McpAgentSettings)


class OllamaSettings(_Section):
    #: "host:port" of the key-less Ollama listener; empty: off.
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", value)
            if match is None or int(match[2]) > 65535:
                raise ValueError("must be empty (off) or host:port, e.g. 127.0.0.1:11434")
        return value


class Settings(_Section):
    provider: ProviderSettings = Field(default_factory=ProviderSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    rate_limiting: RateLimitSettings = Field(default_factory=RateLimitSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    mcp: BridgeSettings = Field(default_factory=BridgeSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)

    _config_path: Path | None = PrivateAttr(default=None)

    @property
    def config_path(self) -> Path | None:
        """The file these settings were read from; None when there was none."""
        return self._config_path

    @property
    def source(self) -> str | None:
        """``config_path`` as text, for the start-up banner."""
        return None if self._config_path is None else str(self._config_path)


#: Every environment variable and the key it sets (values are parsed as pydantic's lax mode
#: parses strings; a list is comma-separated). ``LOCAL_PROVIDER_API_KEY`` is the exception:
#: its plain key is hashed and appended to ``security.api_keys`` with label ``env``.
ENV_VARS: dict[str, str] = {
    "LOCAL_PROVIDER_HOST": "provider.host",
    "LOCAL_PROVIDER_ALLOW_NON_LOOPBACK": "provider.allow_non_loopback",
    "LOCAL_PROVIDER_PORT": "provider.port",
    "LOCAL_PROVIDER_MODEL_NAME": "provider.model_name",
    "LOCAL_PROVIDER_GRACEFUL_TIMEOUT": "provider.graceful_timeout",
    API_KEY_VAR: "security.api_keys",
    "LOCAL_PROVIDER_ADMIN_TOKEN": "security.admin_token",
    "LOCAL_PROVIDER_SESSION_TTL": "security.session_ttl",
    "LOCAL_PROVIDER_MAX_SESSIONS": "security.max_sessions",
    "LOCAL_PROVIDER_LOG_LEVEL": "logging.level",
    "LOCAL_PROVIDER_LOG_FILE": "logging.file",
    "LOCAL_PROVIDER_LOG_CONSOLE": "logging.console",
    "LOCAL_PROVIDER_LOG_JSON": "logging.json",
    "LOCAL_PROVIDER_ACCESS_LOG": "logging.access_log",
    "LOCAL_PROVIDER_RATE_LIMIT_RPM": "rate_limiting.requests_per_minute",
    "LOCAL_PROVIDER_RATE_LIMIT_TPM": "rate_limiting.tokens_per_minute",
    "LOCAL_PROVIDER_BRIDGE_URL": "mcp.bridge_url",
    "LOCAL_PROVIDER_BRIDGE_TOKEN": "mcp.token",
    "LOCAL_PROVIDER_EMBEDDED_BRIDGE": "mcp.embedded_bridge",
    "LOCAL_PROVIDER_AGENT_WAIT_TIMEOUT": "mcp.agent_wait_timeout",
    "LOCAL_PROVIDER_ECHO_TOKENS": "agents.echo.tokens",
    "LOCAL_PROVIDER_ECHO_DELAY_MS": "agents.echo.delay_ms",
    "LOCAL_PROVIDER_OLLAMA_LISTEN": "ollama.listen",
    "LOCAL_PROVIDER_UPSTREAM_BASE_URL": "agents.openai.base_url",
    "LOCAL_PROVIDER_UPSTREAM_API_KEY": "agents.openai.api_key",
}


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which an API key is stored and compared."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    """A fresh API key or token."""
    return secrets.token_urlsafe(32)


def key_prefix(key: str) -> str:
    """What may be shown of a plain API key: its first characters."""
    return key[:KEY_PREFIX_LENGTH]


def new_api_key(label: str) -> tuple[str, ApiKey]:
    """A fresh plain API key (to show once) and the entry that stores it hashed."""
    plain = new_secret()
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return plain, ApiKey(label=label, sha256=hash_key(plain), created=created, prefix=key_prefix(plain))


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Read, merge and validate the settings; raise :class:`ConfigError` on the first problem.

    ``path`` None means ``$LOCAL_PROVIDER_CONFIG``, else ``config/config.toml`` if it exists,
    else defaults only. ``overrides`` maps dotted keys to values (from flags); None is ignored.
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_VAR):
        path = Path(env[CONFIG_VAR])
    if path is None:
        path = DEFAULT_PATH if DEFAULT_PATH.exists() else None
    elif not path.exists():
        raise ConfigError(f"{path}: no such config file (create one with 'python -m trioprovider init')")
    data = _read_toml(path) if path is not None else {}

    # Dotted key -> the variable that set it, or None for the command line: for error messages.
    origin: dict[str, str | None] = {}
    for variable, key in ENV_VARS.items():
        if variable in env and variable != API_KEY_VAR and _set(data, key, env[variable]):
            origin[key] = variable
    for key, value in (overrides or {}).items():
        if value is not None and _set(data, key, value):
            origin[key] = None
    plain_key = env.get(API_KEY_VAR, "")
    env_key = plain_key != "" and _add_key(
        data, {"label": "env", "sha256": hash_key(plain_key), "prefix": key_prefix(plain_key)}
    )

    try:
        settings = Settings.model_validate(data)
    except pydantic.ValidationError as error:
        raise ConfigError(_describe(error, origin, path)) from None
    if env_key:
        settings.security.api_keys[-1]._from_env = True
    settings._config_path = path
    return settings


def save_settings(path: Path, settings: Settings) -> None:
    """Write ``settings`` to ``path`` (mode 0600), without the key taken from the environment."""
    _write_private(path, tomli_w.dumps(_toml_data(settings)), replace=True)


def write_initial_config(path: Path, *, force: bool = False) -> tuple[str, str]:
    """Write every setting at its default plus a fresh API key (hashed), bridge and admin token.

    Returns the plain API key (to show once; only its hash is stored) and the bridge token.
    """
    api_key, entry = new_api_key("default")
    bridge_token = new_secret()
    settings = Settings()
    settings.security.api_keys = [entry]
    settings.security.admin_token = new_secret()
    settings.mcp.token = bridge_token
    header = (
        "# trioprovider configuration, written by 'python -m trioprovider init'.\n"
        "# Keep it private (mode 0600): it holds the bridge and admin tokens. API keys are stored\n"
        "# as SHA-256 hashes only. Every key is explained in config/config.example.toml.\n\n"
    )
    _write_private(path, header + tomli_w.dumps(_toml_data(settings)), replace=force)
    return api_key, bridge_token


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None


def _set(data: dict[str, Any], dotted: str, value: object) -> bool:
    """Set ``data[a][b]... = value``; False if a table on the way is not one (validation says so)."""
    *sections, leaf = dotted.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            return False
    if isinstance(value, str) and _is_list(dotted):
        value = [part.strip() for part in value.split(",") if part.strip()]
    node[leaf] = value
    return True


def _add_key(data: dict[str, Any], key: dict[str, str]) -> bool:
    """Append ``key`` to ``security.api_keys``; False if those are malformed (validation says so)."""
    security = data.setdefault("security", {})
    keys = security.setdefault("api_keys", []) if isinstance(security, dict) else None
    if not isinstance(keys, list):
        return False
    security["api_keys"] = [*keys, key]  # a copy: the list may be the caller's (an override)
    return True


def _is_list(dotted: str) -> bool:
    model: type[BaseModel] = Settings
    *sections, leaf = dotted.split(".")
    for section in sections:
        field = model.model_fields.get(section)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return False
        model = field.annotation
    field = model.model_fields.get(leaf)
    return field is not None and typing.get_origin(field.annotation) is list


def _describe(error: pydantic.ValidationError, origin: Mapping[str, str | None], path: Path | None) -> str:
    first = error.errors(include_url=False)[0]
    loc = first["loc"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = " ".join(first["msg"].removeprefix("Value error, ").split())
    # The error may lie inside a value that was set whole (a list from a flag, say).
    for end in range(len(loc), 0, -1):
        prefix = ".".join(str(part) for part in loc[:end])
        if prefix in origin:
            variable = origin[prefix]
            where = f"{key} (command line)" if variable is None else f"{variable} ({key})"
            return f"{where}: {problem}"
    return f"{path}: {key}: {problem}" if path is not None else f"{key}: {problem}"


def _toml_data(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(by_alias=True)
    # A key from the environment lives only as long as its process: never write it back.
    data["security"]["api_keys"] = [
        dumped
        for key, dumped in zip(settings.security.api_keys, data["security"]["api_keys"], strict=True)
        if not key._from_env
    ]
    return data


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte on."""
    if replace:
        replace_private(path, text)
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, flags, 0o600)
    except FileExistsError:
        # O_EXCL: no window between checking for the file and creating it.
        raise ConfigError(f"{path} exists; use --force to replace it") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot write: {error.strerror or error}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            # The mode given to os.open only applies to a new file; an old one may be wider.
            os.fchmod(file.fileno(), 0o600)
            file.write(text)
    except OSError as error:
        raise ConfigError(f"{path}: cannot write: {error.strerror or error}") from None


def replace_private(path: Path, text: str) -> None:
    """Replace ``path`` by a file (mode 0600) holding ``text``: a crash leaves the old file or the new one.

    The text goes to a temporary file in the same directory (same file system), which then takes
    the place of the old one in a single rename. A symlink is written through, not replaced.
    """
    target = Path(os.path.realpath(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file readable and writable by its owner only.
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise ConfigError(f"{path}: cannot write: {error.strerror or error}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise ConfigError(f"{path}: cannot write: {error.strerror or error}") from None
        raise
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
