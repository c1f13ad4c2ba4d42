"""API keys: ``key new|list|revoke`` on the config file."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from trioprovider import apikeys
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
