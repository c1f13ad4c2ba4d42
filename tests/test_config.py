"""Config: defaults < file < environment < command line; one-line errors naming the key."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from trioprovider.config import (
    ENV_VARS,
    ApiKey,
    ConfigError,
    Settings,
    hash_key,
    load_settings,
    save_settings,
    write_initial_config,
)

EXAMPLE = Path(__file__).parent.parent / "config" / "config.example.toml"


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_settings() reads config/config.toml from the working directory when it exists.
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.config_path is None and settings.source is None
    assert settings.provider.host == "127.0.0.1"
    assert settings.provider.port == 8788
    assert settings.security.api_keys == []
    assert settings.logging.level == "INFO"
    assert settings.mcp.bridge_url == "ws://127.0.0.1:8787"
    assert settings.agents.echo.models == ["echo"]
    assert settings.ollama.listen == ""


def test_default_path_is_used_when_present(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.toml").write_text("[provider]\nport = 9001\n")
    settings = load_settings(env={})
    assert settings.provider.port == 9001
    assert settings.config_path == Path("config/config.toml")


def test_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[provider]\nport = 9002\n")
    settings = load_settings(env={"LOCAL_PROVIDER_CONFIG": str(path)})
    assert settings.provider.port == 9002
    assert settings.source == str(path)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert config_error(missing, env={}).startswith(f"{missing}: no such config file")
    assert str(missing) in config_error(env={"LOCAL_PROVIDER_CONFIG": str(missing)})


def test_file_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [provider]
        port = 9000
        [logging]
        level = "debug"
        json = true
        [security]
        api_keys = [{ label = "a", sha256 = "%s" }]
        [agents]
        embedded = ["echo"]
        [agents.echo]
        models = ["echo", "echo-2"]
        [ollama]
        listen = "127.0.0.1:11434"
        """
        % ("ab" * 32),
    )
    settings = load_settings(path, env={})
    assert settings.provider.port == 9000
    assert settings.logging.level == "DEBUG"
    assert settings.logging.json_format is True
    assert settings.security.api_keys == [ApiKey(label="a", sha256="ab" * 32)]
    assert settings.agents.embedded == ["echo"]
    assert settings.agents.echo.models == ["echo", "echo-2"]
    assert settings.ollama.listen == "127.0.0.1:11434"
    assert settings.config_path == path
    # Untouched keys keep their defaults.
    assert settings.provider.host == "127.0.0.1"


def test_env_over_file_and_overrides_over_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[provider]\nport = 9000\nhost = "127.0.0.2"\n[mcp]\nembedded_bridge = true\n')
    env = {
        "LOCAL_PROVIDER_PORT": "9100",
        "LOCAL_PROVIDER_LOG_LEVEL": "warning",
        "LOCAL_PROVIDER_EMBEDDED_BRIDGE": "false",
        "LOCAL_PROVIDER_ECHO_DELAY_MS": "2.5",
        "LOCAL_PROVIDER_OLLAMA_LISTEN": "[::1]:11434",
    }
    settings = load_settings(path, env=env)
    assert settings.provider.port == 9100
    assert settings.provider.host == "127.0.0.2"
    assert settings.logging.level == "WARNING"
    assert settings.mcp.embedded_bridge is False
    assert settings.agents.echo.delay_ms == 2.5
    assert settings.ollama.listen == "[::1]:11434"

    settings = load_settings(path, env=env, overrides={"provider.port": 9200, "provider.host": None})
    assert settings.provider.port == 9200
    assert settings.provider.host == "127.0.0.2"  # None means "flag not given"


def test_every_env_var_sets_its_key() -> None:
    samples = {
        "provider.host": "::1",
        "mcp.bridge_url": "ws://[::1]:9",
        "mcp.embedded_bridge": "false",
        "ollama.listen": "localhost:1",
        "logging.level": "error",
        "logging.json": "true",
        "logging.access_log": "false",
        "logging.console": "false",
        "logging.file": "x/y.log",
        "provider.allow_non_loopback": "true",
        "agents.openai.base_url": "http://127.0.0.1:7/v1",
    }
    for variable, key in ENV_VARS.items():
        if variable == "LOCAL_PROVIDER_API_KEY":
            continue
        value = samples.get(key, "7")
        settings = load_settings(env={variable: value}).model_dump(by_alias=True)
        section, *rest = key.split(".")
        node = settings[section]
        for part in rest:
            node = node[part]
        assert str(node).lower() in (value, "7.0"), (variable, node)


def test_env_list_is_comma_separated() -> None:
    settings = load_settings(env={}, overrides={"agents.echo.models": "a, b,,c"})
    assert settings.agents.echo.models == ["a", "b", "c"]


def test_env_api_key_is_hashed_and_never_dumped(tmp_path: Path) -> None:
    plain = "sk-plain-secret-123"
    path = write(tmp_path, '[security]\napi_keys = [{ label = "file", sha256 = "%s" }]\n' % ("cd" * 32))
    settings = load_settings(path, env={"LOCAL_PROVIDER_API_KEY": plain})
    assert [(key.label, key.sha256) for key in settings.security.api_keys] == [
        ("file", "cd" * 32),
        ("env", hash_key(plain)),
    ]
    assert plain not in repr(settings.model_dump())
    assert plain not in settings.model_dump_json()

    save_settings(path, settings)
    saved = path.read_text()
    assert plain not in saved and hash_key(plain) not in saved
    assert [key.label for key in load_settings(path, env={}).security.api_keys] == ["file"]


def test_env_api_key_does_not_touch_caller_list() -> None:
    keys = [{"label": "t", "sha256": "ef" * 32}]
    settings = load_settings(env={"LOCAL_PROVIDER_API_KEY": "k"}, overrides={"security.api_keys": keys})
    assert len(settings.security.api_keys) == 2
    assert len(keys) == 1


def test_bad_type_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[provider]\nport = "eighty"\n')
    assert config_error(path, env={}) == (
        f"{path}: provider.port: Input should be a valid integer, unable to parse string as an integer"
    )


def test_out_of_range_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[provider]\nport = 70000\n")
    assert config_error(path, env={}) == f"{path}: provider.port: Input should be less than or equal to 65535"
    path = write(tmp_path, "[model]\ntemperature = 2.5\n")
    assert config_error(path, env={}).startswith(f"{path}: model.temperature: ")


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[security]\napikey = "x"\n')
    assert config_error(path, env={}) == f"{path}: security.apikey: unknown key"
    path = write(tmp_path, "[nonsense]\n")
    assert config_error(path, env={}) == f"{path}: nonsense: unknown key"


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[provider\nport = 1\n")
    message = config_error(path, env={})
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 1" in message


def test_bad_env_var_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[provider]\nport = 9000\n")
    message = config_error(path, env={"LOCAL_PROVIDER_PORT": "abc"})
    assert message.startswith("LOCAL_PROVIDER_PORT (provider.port): Input should be a valid integer")
    assert config_error(env={"LOCAL_PROVIDER_LOG_LEVEL": "loud"}).startswith(
        "LOCAL_PROVIDER_LOG_LEVEL (logging.level): Input should be 'DEBUG'"
    )


def test_bad_override_names_the_key() -> None:
    assert config_error(env={}, overrides={"provider.port": -1}) == (
        "provider.port (command line): Input should be greater than or equal to 0"
    )
    assert config_error(env={}, overrides={"provider.prot": 1}) == "provider.prot (command line): unknown key"
    message = config_error(env={}, overrides={"security.api_keys": [{"label": "x", "sha256": "nothex"}]})
    assert message == (
        "security.api_keys[0].sha256 (command line): must be 64 lowercase hex characters (a SHA-256 digest)"
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8787", "ws://127.0.0.1", "ws://:8787", "ws://127.0.0.1:99999", "127.0.0.1:8787"]
)
def test_bad_bridge_url(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[mcp]\nbridge_url = "{url}"\n')
    assert config_error(path, env={}).startswith(f"{path}: mcp.bridge_url: must be ws://host:port")
    assert config_error(env={"LOCAL_PROVIDER_BRIDGE_URL": url}).startswith(
        "LOCAL_PROVIDER_BRIDGE_URL (mcp.bridge_url): must be"
    )


@pytest.mark.parametrize("listen", ["11434", "host:", "127.0.0.1:70000", "a b:1"])
def test_bad_ollama_listen(listen: str) -> None:
    assert config_error(env={"LOCAL_PROVIDER_OLLAMA_LISTEN": listen}).startswith(
        "LOCAL_PROVIDER_OLLAMA_LISTEN (ollama.listen): must be empty (off) or host:port"
    )


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "provider = 5\n")
    message = config_error(path, env={"LOCAL_PROVIDER_PORT": "1", "LOCAL_PROVIDER_API_KEY": "k"})
    assert message.startswith(f"{path}: provider: Input should be a valid dictionary")


def test_write_initial_config(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "config" / "config.toml"
    api_key, bridge_token = write_initial_config(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert api_key not in text
    assert hash_key(api_key) in text
    assert bridge_token in text

    settings = load_settings(path, env={})
    (key,) = settings.security.api_keys
    assert key.label == "default" and key.sha256 == hash_key(api_key) and key.created
    assert settings.mcp.token == bridge_token
    assert settings.security.admin_token not in ("", bridge_token, api_key)
    # Apart from the secrets, everything is at its default, and every key is spelt out.
    secrets = {"security": {"api_keys", "admin_token"}, "mcp": {"token"}}
    dumped, default = settings.model_dump(), Settings().model_dump()
    for section, names in secrets.items():
        for name in names:
            del dumped[section][name], default[section][name]
    assert dumped == default
    assert _keys(tomllib.loads(text)) == _keys(Settings().model_dump(by_alias=True))


def test_write_initial_config_refuses_without_force(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("# mine\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="exists; use --force"):
        write_initial_config(path)
    assert path.read_text() == "# mine\n"

    api_key, _ = write_initial_config(path, force=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(path, env={}).security.api_keys[0].sha256 == hash_key(api_key)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    settings = load_settings(
        env={},
        overrides={
            "provider.port": 0,
            "logging.json": True,
            "security.api_keys": [{"label": "a", "sha256": "01" * 32, "created": "2024-01-01T00:00:00+00:00"}],
            "agents.embedded": ["echo"],
            "ollama.listen": "127.0.0.1:0",
        },
    )
    path = tmp_path / "saved.toml"
    save_settings(path, settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(path, env={}).model_dump() == settings.model_dump()

    path.chmod(0o644)  # a rewrite tightens the mode again
    save_settings(path, settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_example_config_is_complete_and_at_defaults() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert settings.model_dump() == Settings().model_dump()
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert _keys(example) == _keys(Settings().model_dump(by_alias=True))


def _keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in table.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{name}.")
    return keys
