"""The access log's two formats (nginx's combined plus the time taken, JSON lines), and log
files that are the process's own stdout or stderr (`-`, /dev/stdout, /dev/stderr)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcgi_engine.serving.access_log import AccessLog, format_combined, format_json, request_uri
from fcgi_engine.system.logfile import STDOUT_FD_ENV, open_log, redirect_stderr

# 2025-01-02 10:00:00.250 UTC
WHEN = 1735812000.25


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def full_environ() -> dict[str, str]:
    return {
        "REMOTE_ADDR": "10.0.0.7",
        "REMOTE_USER": "alice",
        "REQUEST_METHOD": "POST",
        "REQUEST_URI": "/api/items?page=2",
        "SERVER_PROTOCOL": "HTTP/1.0",
        "HTTP_REFERER": "https://example.com/",
        "HTTP_USER_AGENT": "curl/8.5.0",
    }


def test_combined_is_nginx_combined_plus_the_seconds_taken(utc: None) -> None:
    assert format_combined(full_environ(), b"201", 512, 0.01234, WHEN) == (
        '10.0.0.7 - alice [02/Jan/2025:10:00:00 +0000] "POST /api/items?page=2 HTTP/1.0" 201 512 '
        '"https://example.com/" "curl/8.5.0" 0.012\n'
    )


def test_combined_writes_a_dash_for_what_the_request_lacks(utc: None) -> None:
    # Without REQUEST_URI the target is the path and the query; a response that never started
    # has no status.
    bare = {"SCRIPT_NAME": "/shop", "PATH_INFO": "/cart", "QUERY_STRING": "id=3"}
    assert format_combined(bare, b"", 0, 0.0, WHEN) == (
        '- - - [02/Jan/2025:10:00:00 +0000] "- /shop/cart?id=3 -" - 0 "-" "-" 0.000\n'
    )


def test_combined_escapes_what_would_break_the_line(utc: None) -> None:
    environ = full_environ()
    environ["HTTP_USER_AGENT"] = 'evil"\n\\agent'
    # A UTF-8 path arrives as one latin-1 character per byte.
    environ["REQUEST_URI"] = "/caf\u00c3\u00a9"
    line = format_combined(environ, b"200", 1, 0.5, WHEN)
    assert line.count("\n") == 1
    assert '"evil\\x22\\x0A\\x5Cagent"' in line
    assert '"POST /caf\\xC3\\xA9 HTTP/1.0"' in line


def test_json_is_one_object_a_line(utc: None) -> None:
    line = format_json(full_environ(), b"201", 512, 0.01234, WHEN)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2025-01-02T10:00:00.250+00:00",
        "remote_addr": "10.0.0.7",
        "remote_user": "alice",
        "method": "POST",
        "uri": "/api/items?page=2",
        "protocol": "HTTP/1.0",
        "status": 201,
        "body_bytes": 512,
        "referer": "https://example.com/",
        "user_agent": "curl/8.5.0",
        "request_time": 0.012,
        "pid": os.getpid(),
    }


def test_json_gives_null_for_what_the_request_lacks_and_text_for_utf8(utc: None) -> None:
    record = json.loads(format_json({"REQUEST_URI": "/caf\u00c3\u00a9"}, b"", 0, 0.0, WHEN))
    assert record["uri"] == "/caf\u00e9"
    assert record["status"] is None
    assert record["remote_user"] is record["referer"] is record["user_agent"] is None


def test_request_uri_prefers_what_the_client_sent() -> None:
    assert request_uri({"REQUEST_URI": "/a%20b?x", "PATH_INFO": "/a b"}) == "/a%20b?x"
    assert request_uri({"SCRIPT_NAME": "", "PATH_INFO": "/p", "QUERY_STRING": ""}) == "/p"


def test_access_log_in_json_writes_one_line_per_request(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    access = AccessLog(str(path), fmt="json")
    access.write(full_environ(), b"200", 3, time.monotonic())
    access.write(full_environ(), b"404", 0, time.monotonic())
    lines = path.read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == [200, 404]


def test_dash_is_the_stdout_the_master_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation's fd 1 is its master's output pipe; `-` must reach the master's own stdout,
    which it passes as $FCGI_ENGINE_STDOUT_FD."""
    read_end, write_end = os.pipe()
    try:
        monkeypatch.setenv(STDOUT_FD_ENV, str(write_end))
        for name in ("-", "/dev/stdout"):
            fd = open_log(name)
            try:
                os.write(fd, f"{name}\n".encode())
            finally:
                os.close(fd)
        assert os.read(read_end, 100) == b"-\n/dev/stdout\n"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_without_a_passed_stdout_dash_is_fd_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STDOUT_FD_ENV, raising=False)
    fd = open_log("-")
    try:
        assert os.path.samestat(os.fstat(fd), os.fstat(1))
    finally:
        os.close(fd)


def test_error_log_dash_leaves_stderr_alone() -> None:
    before = os.fstat(2)
    redirect_stderr("-")
    redirect_stderr("/dev/stderr")
    assert os.path.samestat(os.fstat(2), before)
