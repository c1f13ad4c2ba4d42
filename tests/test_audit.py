"""The audit log's pure record format and its rotating file."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from pathlib import Path

import pytest

from trioprovider.audit import AuditLog, audit_line


def test_a_record_is_one_json_line_without_empty_fields() -> None:
    when = "2026-11-21T12:00:00.123+00:00"
    line = audit_line("authentication", {"success": False, "key": None, "key_prefix": "sk-abc", "client": "127.0.0.1"}, when)
    assert "\n" not in line
    assert json.loads(line) == {
        "timestamp": "2026-11-21T12:00:00.123+00:00",
        "event": "authentication",
        "success": False,
        "key_prefix": "sk-abc",
        "client": "127.0.0.1",
    }


def test_unknown_events_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        audit_line("prompt_text", {}, "2026-11-21T12:00:00.123+00:00")


def test_a_record_is_stamped_now_in_utc_to_the_millisecond(tmp_path: Path) -> None:
    audit = AuditLog.to_file(tmp_path / "audit.log", max_bytes=10_000, backup_count=0)
    before = dt.datetime.now(dt.UTC)
    audit.record("session_revoked", session_id="s1", client="127.0.0.1")
    after = dt.datetime.now(dt.UTC)
    audit.close()
    stamp = json.loads((tmp_path / "audit.log").read_text())["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp), stamp
    assert before - dt.timedelta(milliseconds=1) <= dt.datetime.fromisoformat(stamp) <= after


def test_the_file_rotates_at_its_size_and_keeps_its_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "security_audit.log"
    audit = AuditLog.to_file(path, max_bytes=1000, backup_count=2)
    for number in range(60):
        audit.record("security_violation", kind="bad_host", detail=f"attempt {number:03d}", client="127.0.0.1")
    audit.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["security_audit.log", "security_audit.log.1", "security_audit.log.2"]
    for file in path.parent.iterdir():
        assert file.stat().st_size <= 1000
        # It names keys (prefixes, also of wrong keys pasted by mistake), sessions and clients.
        assert file.stat().st_mode & 0o777 == 0o600
        for line in file.read_text().splitlines():
            assert json.loads(line)["event"] == "security_violation"
    # The newest records are in the current file.
    assert "attempt 059" in path.read_text()



def test_records_survive_a_restart_and_rotation_counts_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditLog.to_file(path, max_bytes=400, backup_count=1)
    first.record("session_revoked", session_id="a" * 100)
    first.close()
    size = path.stat().st_size
    second = AuditLog.to_file(path, max_bytes=400, backup_count=1)
    second.record("session_revoked", session_id="b" * 100)
    second.record("session_revoked", session_id="c" * 100)
    second.close()
    # The file held one record before the restart: two more would pass 400 bytes, so it rotated.
    assert size > 100
    assert [json.loads(line)["session_id"][0] for line in Path(f"{path}.1").read_text().splitlines()] == ["a", "b"]
    assert [json.loads(line)["session_id"][0] for line in path.read_text().splitlines()] == ["c"]


def test_what_is_not_a_regular_file_is_never_rotated(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write does not block
    try:
        audit = AuditLog.to_file(fifo, max_bytes=100, backup_count=2)
        for number in range(5):
            audit.record("session_revoked", session_id=f"s{number}")
        audit.close()
        assert os.read(reader, 65536).count(b"session_revoked") == 5
    finally:
        os.close(reader)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.pipe"]


def test_a_write_that_fails_is_logged_and_the_request_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "audit.log").mkdir()  # cannot be opened as a file
    audit = AuditLog.to_file(tmp_path / "audit.log", max_bytes=1000, backup_count=1)
    with caplog.at_level(logging.ERROR, logger="trioprovider.audit"):
        audit.record("session_revoked", session_id="s")
    assert "cannot write" in caplog.text
    with pytest.raises(ValueError):
        AuditLog.disabled().record("prompt_text")
