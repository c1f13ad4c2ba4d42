"""Configuration: TOML file < environment < command line, validated once by pydantic.

A bad value stops start-up with one line naming the key (and the variable or flag it came
from) and the problem: :class:`ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PATH = Path("config/config.toml")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProviderSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8788
    #: The model name every agent can be asked for (VoidEditor users type it).
    model_name: Annotated[str, Field(min_length=1)] = "cursor-agent-local"
    debug: bool = False
    #: Listening beyond loopback exposes the keys to the network: it must be asked for.
    allow_non_loopback: bool = False
    max_body_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    graceful_timeout: Annotated[float, Field(ge=0)] = 10.0


class ApiKey(_Section):
    label: Annotated[str, Field(min_length=1)]
    sha256: str
    created: str = ""

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex characters (a SHA-256 digest)")
        return value


class SecuritySettings(_Section):
    api_keys: list[ApiKey] = []
    admin_token: str = ""
    session_ttl: Annotated[float, Field(gt=0)] = 300
    max_sessions: Annotated[int, Field(ge=1)] = 10
    allowed_origins: list[str] = ["http://127.0.0.1:*", "http://localhost:*", "vscode-file://vscode-app"]
    max_content_bytes: Annotated[int, Field(gt=0)] = 100 * 1024
    max_messages: Annotated[int, Field(ge=1)] = 500


class RateLimitSettings(_Section):
    enabled: bool = True
    requests_per_minute: Annotated[int, Field(ge=1)] = 60
    tokens_per_minute: Annotated[int, Field(ge=1)] = 100_000
    burst_allowance: Annotated[int, Field(ge=0)] = 10


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    json_format: bool = Field(default=False, alias="json")
    file: str = "logs/provider.log"
    max_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    backup_count: Annotated[int, Field(ge=0)] = 5
    access_log: bool = True
    log_prompts: bool = False
    audit_file: str = "logs/security_audit.log"

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class SessionSettings(_Section):
    cleanup_interval: Annotated[float, Field(gt=0)] = 60
    max_idle_time: Annotated[float, Field(gt=0)] = 300


class BridgeSettings(_Section):
    bridge_url: str = "ws://127.0.0.1:8787"
    embedded_bridge: bool = True
    token: str = ""
    agent_id: str = "local-provider-1"
    connection_timeout: Annotated[float, Field(gt=0)] = 30
    heartbeat_interval: Annotated[float, Field(gt=0)] = 30
    reconnect_attempts: Annotated[int, Field(ge=0)] = 5
    reconnect_delay: Annotated[float, Field(ge=0)] = 5
    #: How long a request waits for an agent to connect before a 503.
    agent_wait_timeout: Annotated[float, Field(ge=0)] = 10
    max_frame_bytes: Annotated[int, Field(gt=0)] = 8 * 1024 * 1024
    #: Requests that may wait while every agent for their model is at max_concurrency.
    queue_limit: Annotated[int, Field(ge=0)] = 64

    @field_validator("bridge_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        url = urllib.parse.urlsplit(value)
        if url.scheme not in ("ws", "wss") or not url.hostname:
            raise ValueError("must be a ws:// or wss:// URL with a host, e.g. ws://127.0.0.1:8787")
        try:
            url.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value


class ModelSettings(_Section):
    max_tokens: Annotated[int, Field(ge=1, le=8192)] = 2048
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stream_enabled: bool = True


class PerformanceSettings(_Section):
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 50
    #: Seconds until the agent's first reply (0: no limit).
    request_timeout: Annotated[float, Field(ge=0)] = 30
    #: Seconds for the whole answer (0: no limit).
    response_timeout: Annotated[float, Field(ge=0)] = 600
    #: SSE keep-alive comment after this many silent seconds.
    heartbeat_interval: Annotated[float, Field(gt=0)] = 15


class EchoSettings(_Section):
    tokens: Annotated[int, Field(ge=1)] = 24
    delay_ms: Annotated[float, Field(ge=0)] = 0
    models: Annotated[list[str], Field(min_length=1)] = ["echo"]
    max_concurrency: Annotated[int, Field(ge=1)] = 16


class AgentSettings(_Section):
    #: Agents run inside the server's nursery tree (as with --agent NAME).
    embedded: list[str] = []
    echo: EchoSettings = Field(default_factory=EchoSettings)


class OllamaSettings(_Section):
    #: "host:port" of the key-less Ollama listener; empty: off.
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}", value):
            raise ValueError("must be host:port, e.g. 127.0.0.1:11434")
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

    #: The file these settings were read from, if any (for the start-up banner).
    _source: Path | None = pydantic.PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        return str(self._source) if self._source else None


#: Environment variables and the keys they set. ``LOCAL_PROVIDER_API_KEY`` is special: its plain
#: key is hashed and added to ``security.api_keys`` (label ``env``), never kept in plain text.
ENV_VARS: dict[str, str] = {
    "LOCAL_PROVIDER_HOST": "provider.host",
    "LOCAL_PROVIDER_PORT": "provider.port",
    "LOCAL_PROVIDER_MODEL_NAME": "provider.model_name",
    "LOCAL_PROVIDER_GRACEFUL_TIMEOUT": "provider.graceful_timeout",
    "LOCAL_PROVIDER_ADMIN_TOKEN": "security.admin_token",
    "LOCAL_PROVIDER_SESSION_TTL": "security.session_ttl",
    "LOCAL_PROVIDER_MAX_SESSIONS": "security.max_sessions",
    "LOCAL_PROVIDER_LOG_LEVEL": "logging.level",
    "LOCAL_PROVIDER_RATE_LIMIT_RPM": "rate_limiting.requests_per_minute",
    "LOCAL_PROVIDER_RATE_LIMIT_TPM": "rate_limiting.tokens_per_minute",
    "LOCAL_PROVIDER_BRIDGE_URL": "mcp.bridge_url",
    "LOCAL_PROVIDER_BRIDGE_TOKEN": "mcp.token",
    "LOCAL_PROVIDER_EMBEDDED_BRIDGE": "mcp.embedded_bridge",
    "LOCAL_PROVIDER_AGENT_WAIT_TIMEOUT": "mcp.agent_wait_timeout",
    "LOCAL_PROVIDER_ECHO_TOKENS": "agents.echo.tokens",
    "LOCAL_PROVIDER_ECHO_DELAY_MS": "agents.echo.delay_ms",
    "LOCAL_PROVIDER_OLLAMA_LISTEN": "ollama.listen",
}
API_KEY_VAR = "LOCAL_PROVIDER_API_KEY"
CONFIG_VAR = "LOCAL_PROVIDER_CONFIG"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Defaults < the TOML file < environment < ``overrides`` (dotted keys, from flags)."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_VAR):
        path = Path(env[CONFIG_VAR])
        explicit = True
    else:
        explicit = path is not None
        path = path if path is not None else DEFAULT_PATH
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}  # dotted key -> where its value came from, for error messages
    source: Path | None = None
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
        source = path
    elif explicit:
        raise ConfigError(f"{path}: no such config file (run 'python -m trioprovider init')")
    for variable, key in ENV_VARS.items():
        if variable in env:
            _set(data, key, env[variable])
            origin[key] = f"{variable} ({key})"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key, value)
            origin[key] = f"{key} (command line)"
    plain_key = env.get(API_KEY_VAR)
    if plain_key:
        security = data.setdefault("security", {})
        keys = list(security.get("api_keys", []))
        keys.append({"label": "env", "sha256": hash_key(plain_key)})
        security["api_keys"] = keys
    try:
        settings = Settings.model_validate(data)
    except pydantic.ValidationError as error:
        raise ConfigError(_describe(error, origin, source)) from None
    settings._source = source
    return settings


def _set(data: dict[str, Any], dotted: str, value: object) -> None:
    *sections, leaf = dotted.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    if isinstance(value, str) and leaf in ("models", "embedded", "allowed_origins"):
        value = [part.strip() for part in value.split(",") if part.strip()]
    node[leaf] = value


def _describe(error: pydantic.ValidationError, origin: Mapping[str, str], source: Path | None) -> str:
    first = error.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"])
    problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    where = origin.get(key)
    if where is None:
        where = f"{source}: {key}" if source else key
    return f"{where}: {problem}"


def _toml_data(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(by_alias=True, exclude_none=True)
    # A key from the environment lives only for that process; never write it back.
    data["security"]["api_keys"] = [key for key in data["security"]["api_keys"] if key["label"] != "env"]
    return data


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.chmod(path, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)


def save_settings(path: Path, settings: Settings) -> None:
    _write_private(path, tomli_w.dumps(_toml_data(settings)))


def write_initial_config(path: Path, *, force: bool = False) -> tuple[str, str]:
    """Write a full config with a fresh API key (stored hashed), bridge token and admin token.

    Returns the plain API key (to show once) and the bridge token.
    """
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; use --force to replace it")
    api_key = new_secret()
    bridge_token = new_secret()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    settings = Settings()
    settings.security.api_keys = [ApiKey(label="default", sha256=hash_key(api_key), created=created)]
    settings.security.admin_token = new_secret()
    settings.mcp.token = bridge_token
    header = (
        "# trioprovider configuration, written by 'python -m trioprovider init'.\n"
        "# Secrets: keep this file private (mode 0600). API keys are stored as SHA-256 hashes only.\n"
        "# Every key is documented in config/config.example.toml.\n\n"
    )
    _write_private(path, header + tomli_w.dumps(_toml_data(settings)))
    return api_key, bridge_token
