"""API keys: ``key new|list|revoke`` on the config file, and a running server following it."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from support import in_thread, openai_client, start_server
from trioprovider import apikeys
from trioprovider.agents.echo import echo_text
from trioprovider.auth import KeyMatch, KeyRing, load_file_keys, presented_prefix
from trioprovider.config import (
    ApiKey,
    ConfigError,
    hash_key,
    load_settings,
    new_api_key,
    replace_private,
    write_initial_config,
)

ENV = {name: value for name, value in os.environ.items() if not name.startswith("LOCAL_PROVIDER_")}
SHOWN_ONCE = re.compile(r"API key \(shown once; only its hash is stored\): (\S+)")


def run_cli(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioprovider", *argv], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=60
    )


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def entry(label: str, plain: str, prefix: str = "") -> dict[str, str]:
    return {"label": label, "sha256": hash_key(plain), "created": "2024-05-01T00:00:00+00:00", "prefix": prefix}


# --- the pure edits -------------------------------------------------------------------------


def test_with_key_appends_and_leaves_the_rest_alone() -> None:
    data: dict[str, Any] = {"provider": {"port": 9000}, "security": {"max_sessions": 3, "api_keys": [entry("a", "k1")]}}
    _, new = new_api_key("b")
    changed = apikeys.with_key(data, new)
    assert [key.label for key in apikeys.stored_keys(changed)] == ["a", "b"]
    assert changed["provider"] == {"port": 9000} and changed["security"]["max_sessions"] == 3
    assert len(data["security"]["api_keys"]) == 1  # the input is not changed
    assert [key.label for key in apikeys.stored_keys(apikeys.with_key({}, new))] == ["b"]


@pytest.mark.parametrize(
    ("label", "problem"),
    [("a", "exists already"), ("env", "reserved"), ("ephemeral", "reserved"), ("", "printable"), (" x", "printable"), ("a\nb", "printable"), ("x" * 65, "printable")],
)
def test_labels_are_unique_printable_and_not_reserved(label: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        apikeys.check_label(label, [ApiKey.model_validate(entry("a", "k1"))])


def test_without_key_by_label_then_by_prefix() -> None:
    data = {"security": {"api_keys": [entry("a", "k1", "AAAA1111"), entry("b", "k2", "BBBB2222"), entry("old", "k3")]}}
    changed, removed = apikeys.without_key(data, "b")
    assert removed.label == "b" and [key.label for key in apikeys.stored_keys(changed)] == ["a", "old"]
    changed, removed = apikeys.without_key(data, "AAAA1111")
    assert removed.label == "a" and [key.label for key in apikeys.stored_keys(changed)] == ["b", "old"]
    # A label wins over another key's prefix; an empty prefix (old entries) matches nothing.
    assert apikeys.without_key({"security": {"api_keys": [entry("x", "k1", "y"), entry("y", "k2")]}}, "y")[1].label == "y"
    with pytest.raises(ConfigError, match="no key with label or prefix ''"):
        apikeys.without_key(data, "")
    with pytest.raises(ConfigError, match=r"no key .* 'nope' \(keys: 'a', 'b', 'old'\); nothing changed"):
        apikeys.without_key(data, "nope")
    twins = {"security": {"api_keys": [entry("t1", "k1", "SAME0000"), entry("t2", "k2", "SAME0000")]}}
    with pytest.raises(ConfigError, match="2 keys match"):
        apikeys.without_key(twins, "SAME0000")


def test_key_table_shows_no_digest() -> None:
    keys = [ApiKey.model_validate(entry("laptop", "k1", "AbCdEfGh")), ApiKey.model_validate({"label": "old", "sha256": hash_key("k2")})]
    table = apikeys.key_table(keys)
    assert table.splitlines() == [
        "LABEL   PREFIX    CREATED",
        "laptop  AbCdEfGh  2024-05-01T00:00:00+00:00",
        "old     -         -",
    ]
    assert hash_key("k1") not in table


def test_leading_comments() -> None:
    assert apikeys.leading_comments("# one\n\n# two\n[provider]\n# inside\n") == "# one\n\n# two\n"
    assert apikeys.leading_comments("[provider]\n# inside\n") == ""
    assert apikeys.leading_comments("\n\n[provider]\n") == ""


def test_new_api_key_stores_only_hash_and_prefix() -> None:
    plain, key = new_api_key("x")
    assert key.sha256 == hash_key(plain) and key.prefix == plain[:8] and len(plain) >= 40 and key.created
    assert plain not in key.model_dump_json()


def test_old_entries_without_prefix_stay_valid_and_prefix_is_bounded() -> None:
    assert ApiKey.model_validate({"label": "old", "sha256": "ab" * 32}).prefix == ""
    with pytest.raises(ValueError):
        ApiKey.model_validate({"label": "x", "sha256": "ab" * 32, "prefix": "a-whole-key-is-too-long"})


# --- writing the file -------------------------------------------------------------------------


def test_replace_private_leaves_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text("old = 1\n")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ConfigError, match="cannot write: No space left on device"):
        replace_private(path, "new = 2\n")
    assert path.read_text() == "old = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # no temporary left behind


def test_replace_private_writes_through_a_symlink_with_mode_0600(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text("old = 1\n")
    real.chmod(0o644)
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    replace_private(link, "new = 2\n")
    assert link.is_symlink() and real.read_text() == "new = 2\n" and private(real)


def test_edit_keys_keeps_other_settings_and_the_header(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "# my header\n\n[provider]\nport = 9001  # inline comments go\n[logging]\njson = true\n"
        "[security]\nmax_sessions = 4\napi_keys = [{ label = \"a\", sha256 = \"%s\" }]\n" % hash_key("k1")
    )
    before = load_settings(path, env={})
    _, new = new_api_key("b")
    apikeys.edit_keys(path, lambda data: (apikeys.with_key(data, new), None))
    text = path.read_text()
    assert text.startswith("# my header\n\n[provider]\n") and private(path)
    after = load_settings(path, env={})
    assert [key.label for key in after.security.api_keys] == ["a", "b"]
    assert after.model_dump(exclude={"security": {"api_keys"}}) == before.model_dump(exclude={"security": {"api_keys"}})
    # Only what the file set is written: defaults stay defaults.
    assert set(tomllib.loads(text)) == {"provider", "logging", "security"}


def test_edit_keys_refuses_an_invalid_config_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[provider]\nport = \"eighty\"\n")
    with pytest.raises(ConfigError, match="provider.port"):
        apikeys.edit_keys(path, lambda data: (apikeys.with_key(data, new_api_key("b")[1]), None))
    assert path.read_text() == "[provider]\nport = \"eighty\"\n"


# --- the key ring following the file ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_keys(path: Path, *entries: dict[str, str]) -> None:
    replace_private(path, "[security]\n" + "".join(
        "[[security.api_keys]]\n" + "".join(f'{name} = "{value}"\n' for name, value in item.items()) for item in entries
    ))


def test_ring_reloads_the_file_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write_keys(path, entry("a", "key-a", "key-a"))
    loads: list[Path] = []

    def load(source: Path) -> list[ApiKey]:
        loads.append(source)
        return load_file_keys(source)

    clock = Clock()
    ring = KeyRing(source=path, file_keys=load_file_keys(path), reload_interval=1.0, load=load, clock=clock)
    assert ring.identify("Bearer key-a") == KeyMatch("a", "key-a")
    assert len(loads) == 1  # the first look reads the file
    for _ in range(5):
        assert ring.check("Bearer key-a") == "a"
    assert len(loads) == 1  # unchanged file: a stat per interval, no read

    write_keys(path, entry("b", "key-b", "key-b"))
    clock.now += 0.5
    assert ring.check("Bearer key-b") is None and ring.check("Bearer key-a") == "a"  # not looked at yet
    clock.now += 0.5
    assert ring.check("Bearer key-b") == "b" and ring.check("Bearer key-a") is None
    assert len(loads) == 2


def test_pinned_keys_survive_reloads_and_a_broken_file_keeps_the_old_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.toml"
    write_keys(path, entry("a", "key-a"))
    settings = load_settings(path, env={"LOCAL_PROVIDER_API_KEY": "from-the-environment"})
    clock = Clock()
    ring = KeyRing.from_settings(settings, reload_interval=1.0, clock=clock)
    ring.add("ephemeral", hash_key("made-for-this-run"), "made-for")
    assert len(ring) == 3
    assert ring.identify("Bearer from-the-environment") == KeyMatch("env", "from-the")

    write_keys(path)  # every file key revoked
    clock.now += 1
    assert ring.check("Bearer key-a") is None
    assert ring.check("Bearer from-the-environment") == "env"
    assert ring.identify("Bearer made-for-this-run") == KeyMatch("ephemeral", "made-for")

    write_keys(path, entry("b", "key-b"))
    clock.now += 1
    assert ring.check("Bearer key-b") == "b"

    path.write_text("[security\nbroken")
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="trioprovider.auth"):
        assert ring.check("Bearer key-b") == "b"
        clock.now += 1
        assert ring.check("Bearer key-b") == "b"
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "invalid TOML" in warnings[0].getMessage()  # said once, not every second

    path.unlink()
    clock.now += 1
    assert ring.check("Bearer key-b") == "b"
    write_keys(path, entry("c", "key-c"))
    clock.now += 1
    assert ring.check("Bearer key-c") == "c" and ring.check("Bearer from-the-environment") == "env"


def test_ring_without_a_file_never_looks(tmp_path: Path) -> None:
    def load(source: Path) -> list[ApiKey]:
        raise AssertionError("no file to read")

    ring = KeyRing([("t", hash_key("k"))], load=load)
    assert ring.check("Bearer k") == "t" and ring.identify("Bearer k") == KeyMatch("t", "")
    for header in (None, "", "Bearer", "Bearer ", "Basic k", "k"):
        assert ring.identify(header) is None


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        ("Bearer 0KF_zlRG4Vj-ZR-uT3_UE0ZUmR7UauVCOtr_xyhtPtA", "0KF_zlRG"),
        ("bearer sk-proj-abcdefghijklmnopqrstuvwxyz", "sk-proj-"),
        ("Bearer hunter2", ""),  # short: a password, not a key
        ("Bearer correct horse battery staple!", ""),
        ("Bearer " + "ä" * 30, ""),
        ("Basic 0KF_zlRG4Vj-ZR-uT3_UE0ZUmR7UauVCOtr_xyhtPtA", ""),
        (None, ""),
    ],
)
def test_presented_prefix_shows_little_and_only_of_key_shaped_tokens(header: str | None, shown: str) -> None:
    assert presented_prefix(header) == shown


# --- the commands, as processes ----------------------------------------------------------------


def test_key_new_list_revoke(tmp_path: Path) -> None:
    init = run_cli("init", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    default_key = SHOWN_ONCE.search(init.stdout).group(1)  # type: ignore[union-attr]
    config = tmp_path / "config" / "config.toml"
    original = tomllib.loads(config.read_text())
    assert original["security"]["api_keys"][0]["prefix"] == default_key[:8]  # init stores the prefix too

    new = run_cli("key", "new", "--label", "laptop", cwd=tmp_path)
    assert new.returncode == 0, new.stderr
    plain = SHOWN_ONCE.search(new.stdout).group(1)  # type: ignore[union-attr]
    assert (new.stdout + new.stderr).count(plain) == 1
    assert f"prefix {plain[:8]}" in new.stdout
    text = config.read_text()
    assert plain not in text and hash_key(plain) in text and private(config)
    assert text.startswith("# trioprovider configuration")
    edited = tomllib.loads(text)
    assert edited["security"].pop("api_keys")[1]["label"] == "laptop"
    original["security"].pop("api_keys")
    assert edited == original  # every other setting exactly as it was

    listing = run_cli("key", "list", cwd=tmp_path)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["LABEL", "PREFIX", "CREATED"]
    assert [line.split()[:2] for line in lines[1:]] == [["default", default_key[:8]], ["laptop", plain[:8]]]
    assert plain not in listing.stdout and hash_key(plain) not in listing.stdout

    revoked = run_cli("key", "revoke", "laptop", cwd=tmp_path)
    assert revoked.returncode == 0 and "Revoked key 'laptop'" in revoked.stdout
    assert hash_key(plain) not in config.read_text() and private(config)
    # By prefix, as 'key list' shows it; '--' in case the prefix starts with '-'.
    by_prefix = run_cli("key", "revoke", "--", default_key[:8], cwd=tmp_path)
    assert by_prefix.returncode == 0 and "Revoked key 'default'" in by_prefix.stdout
    assert "No keys are left" in by_prefix.stdout
    assert load_settings(config, env={}).security.api_keys == [] and private(config)
    assert run_cli("key", "list", cwd=tmp_path).stdout.startswith("No API keys in")


def test_key_errors_exit_2_and_leave_the_file_alone(tmp_path: Path) -> None:
    missing = run_cli("key", "new", "--label", "x", cwd=tmp_path)
    assert missing.returncode == 2 and "no such config file" in missing.stderr and "init" in missing.stderr
    assert missing.stdout == ""

    config = tmp_path / "elsewhere.toml"
    write_initial_config(config)
    before = config.read_bytes()
    duplicate = run_cli("key", "new", "--label", "default", "--config", str(config), cwd=tmp_path)
    assert duplicate.returncode == 2 and "exists already" in duplicate.stderr
    assert duplicate.stdout == ""  # no key printed for a refused label
    unknown = run_cli("key", "revoke", "nobody", "--config", str(config), cwd=tmp_path)
    assert unknown.returncode == 2 and "no key with label or prefix 'nobody'" in unknown.stderr
    assert config.read_bytes() == before and private(config)


def test_key_commands_follow_the_config_variable_and_never_write_the_env_key(tmp_path: Path) -> None:
    config = tmp_path / "mine.toml"
    write_initial_config(config)
    env = {**ENV, "LOCAL_PROVIDER_CONFIG": str(config), "LOCAL_PROVIDER_API_KEY": "plain-env-key-0123456789", "LOCAL_PROVIDER_PORT": "1"}
    assert run_cli("key", "new", "--label", "ci", cwd=tmp_path, env=env).returncode == 0
    text = config.read_text()
    assert "plain-env-key" not in text and hash_key("plain-env-key-0123456789") not in text
    assert tomllib.loads(text)["provider"]["port"] == 8788  # the environment's values are not written either
    listing = run_cli("key", "list", cwd=tmp_path, env=env)
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:3]] == ["default", "ci"]
    assert "LOCAL_PROVIDER_API_KEY" in listing.stdout


def test_an_old_config_without_prefixes_is_listed_and_edited(tmp_path: Path) -> None:
    config = tmp_path / "old.toml"
    config.write_text('[security]\napi_keys = [{ label = "old", sha256 = "%s" }]\n' % hash_key("k"))
    config.chmod(0o644)
    listing = run_cli("key", "list", "--config", str(config), cwd=tmp_path)
    assert listing.stdout.splitlines()[1].split() == ["old", "-", "-"]
    assert run_cli("key", "new", "--label", "new", "--config", str(config), cwd=tmp_path).returncode == 0
    assert private(config)  # a rewrite tightens the mode
    assert [key.label for key in load_settings(config, env={}).security.api_keys] == ["old", "new"]


# --- a running server ---------------------------------------------------------------------------


def server_settings(config: Path, env: dict[str, str] | None = None) -> Any:
    return load_settings(
        config,
        env=env or {},
        overrides={
            "provider.port": 0,
            "mcp.bridge_url": "ws://127.0.0.1:0",
            "mcp.agent_wait_timeout": 5.0,
            "logging.access_log": False,
            # The polls below would otherwise spend a key's burst.
            "rate_limiting.enabled": False,
        },
    )


async def cli(*argv: str, cwd: Path) -> str:
    result = await trio.run_process([sys.executable, "-m", "trioprovider", *argv], cwd=cwd, env=ENV, capture_stdout=True, capture_stderr=True)
    return str(result.stdout.decode())


async def status_with(client: httpx.AsyncClient, key: str) -> int:
    return (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code


async def wait_for_status(client: httpx.AsyncClient, key: str, status: int) -> None:
    """Poll until the server answers ``key`` with ``status`` (it re-reads the file within a second or so)."""
    with trio.fail_after(20):
        while await status_with(client, key) != status:
            await trio.sleep(0.05)


async def test_a_running_server_follows_key_new_and_key_revoke(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    default_key, _ = write_initial_config(config)
    env_key = "environment-key-0123456789"
    settings = server_settings(config, env={"LOCAL_PROVIDER_API_KEY": env_key})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        async with httpx.AsyncClient(base_url=running.provider_url, timeout=30) as client:
            assert await status_with(client, default_key) == 200

            added = SHOWN_ONCE.search(await cli("key", "new", "--label", "editor", "--config", str(config), cwd=tmp_path)).group(1)  # type: ignore[union-attr]
            await wait_for_status(client, added, 200)
            answer = await in_thread(
                openai_client(running, api_key=added).chat.completions.create,
                model="echo", messages=[{"role": "user", "content": "new key works"}], stream=False,
            )
            assert answer.choices[0].message.content == echo_text("new key works", settings.agents.echo.tokens)
            assert running.provider.keys.identify(f"Bearer {added}") == KeyMatch("editor", added[:8])

            await cli("key", "revoke", "default", "--config", str(config), cwd=tmp_path)
            await wait_for_status(client, default_key, 401)
            assert await status_with(client, added) == 200
            assert await status_with(client, env_key) == 200  # LOCAL_PROVIDER_API_KEY outlives reloads
        running.shutdown.set()


async def test_the_ephemeral_key_outlives_a_key_added_while_running(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[security]\napi_keys = []\n")
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, server_settings(config))
        assert running.ephemeral_api_key is not None
        async with httpx.AsyncClient(base_url=running.provider_url, timeout=30) as client:
            added = SHOWN_ONCE.search(await cli("key", "new", "--label", "first", "--config", str(config), cwd=tmp_path)).group(1)  # type: ignore[union-attr]
            await wait_for_status(client, added, 200)
            assert await status_with(client, running.ephemeral_api_key) == 200
        running.shutdown.set()
