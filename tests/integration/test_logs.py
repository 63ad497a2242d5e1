"""The logs of real servers: the slowlog (the stack of a request running past slowlog_timeout,
for the inline, threaded and ASGI workers), the access log's formats, and `-` / /dev/stdout
reaching the master's own stdout. Also what keeps lighttpd's log clean: an ASGI response ends
with the body message that completes its Content-Length."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fcgi_engine.client import build_params, connect, encode_request, request
from tests.conftest import ENGINE, Server, _ready, wait_for

pytestmark = pytest.mark.integration

SLOW_WSGI = """
import time

def slow_view(environ, start_response):
    time.sleep(1.5)
    body = b"done"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return [body]

def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        return slow_view(environ, start_response)
    body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [body]
"""

SLOW_ASGI = """
import asyncio

async def slow_view(send):
    await asyncio.sleep(1.5)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"4")]})
    await send({"type": "http.response.body", "body": b"done"})

async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        return await slow_view(send)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})
"""


def write_app(tmp: Path, code: str) -> str:
    path = tmp / "logged_app.py"
    path.write_text(code)
    return str(path)


@pytest.mark.parametrize(
    "code, extra",
    [(SLOW_WSGI, []), (SLOW_WSGI, ["--threads", "4"]), (SLOW_ASGI, [])],
    ids=["inline", "threads", "asgi"],
)
def test_slowlog_has_the_request_and_its_stack_and_the_request_goes_on(
    serve, tmp: Path, code: str, extra: list[str]
) -> None:
    slowlog = tmp / "slow.log"
    server = serve(
        write_app(tmp, code),
        "--slowlog-timeout",
        "0.5",
        "--slowlog",
        str(slowlog),
        *extra,
        nproc=1,
    )
    # A fast request is never in it.
    assert request(server.address, "/fast", timeout=10).status == 200
    response = request(server.address, "/slow?q=1", timeout=10)
    assert (response.status, response.body) == (200, b"done")
    text = wait_for(lambda: slowlog.exists() and slowlog.read_text(), 5, what="the slowlog entry")
    assert isinstance(text, str)
    assert "GET /slow?q=1 running for 0." in text, text
    assert ", in slow_view\n" in text, text
    assert "/fast" not in text
    # Once per request.
    assert text.count("slow request:") == 1, text


def test_slowlog_defaults_to_the_error_log(serve, tmp: Path) -> None:
    server = serve(write_app(tmp, SLOW_WSGI), "--slowlog-timeout", "0.5", nproc=1)
    assert request(server.address, "/slow", timeout=10).status == 200
    wait_for(lambda: ", in slow_view" in server.log(), 5, what="the slowlog in the error log")


def test_access_log_combined_counts_the_body_and_names_referer_and_agent(serve, tmp: Path) -> None:
    access = tmp / "access.log"
    server = serve(write_app(tmp, SLOW_WSGI), "--access-log", str(access), nproc=1)
    headers = {"Referer": "http://example.com/from", "User-Agent": "probe/1.0"}
    assert request(server.address, "/fast", headers=headers).status == 200
    line = wait_for(lambda: access.exists() and access.read_text(), 5, what="the access line")
    assert isinstance(line, str)
    assert '"GET /fast HTTP/1.1" 200 5 "http://example.com/from" "probe/1.0" 0.' in line, line


def test_access_log_json_lines(serve, tmp: Path) -> None:
    access = tmp / "access.json"
    server = serve(
        write_app(tmp, SLOW_ASGI),
        "--access-log",
        str(access),
        "--access-log-format",
        "json",
        nproc=1,
    )
    assert request(server.address, "/fast?x=1").status == 200
    text = wait_for(lambda: access.exists() and access.read_text(), 5, what="the access line")
    assert isinstance(text, str)
    record = json.loads(text.splitlines()[0])
    assert (record["method"], record["uri"], record["status"], record["body_bytes"]) == (
        "GET",
        "/fast?x=1",
        200,
        5,
    )
    assert record["pid"] != os.getpid() and record["request_time"] >= 0


def serve_with_streams(tmp: Path, app: str, *args: str) -> tuple[Server, Path, Path]:
    """`fcgi-engine serve` with its stdout and stderr in two files (the serve fixture has them
    in one)."""
    out, err = tmp / "stdout.log", tmp / "stderr.log"
    address = str(tmp / "streams.sock")
    pidfile = str(tmp / "streams.pid")
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [*ENGINE, "serve", app, "--listen", address, "--nproc", "1", "--pidfile", pidfile]
            + list(args),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, FCGI_TEST_TAG=tag),
            cwd=tmp,  # a log named `-` taken for a file lands here, not in the checkout
        )
    server = Server(proc, address, pidfile, str(err), tag)
    return server, out, err


@pytest.mark.parametrize("name", ["-", "/dev/stdout"])
def test_access_log_dash_and_dev_stdout_reach_stdout(tmp: Path, name: str) -> None:
    server, out, err = serve_with_streams(tmp, write_app(tmp, SLOW_WSGI), "--access-log", name)
    try:
        wait_for(lambda: _ready(server), 20, what="the server")
        assert request(server.address, "/to-stdout").status == 200
        wait_for(lambda: "/to-stdout" in out.read_text(), 5, what="the line on stdout")
        assert "/to-stdout" not in err.read_text()
        assert not (tmp / "-").exists()
    finally:
        server.stop()


def test_usr1_reopens_the_slowlog(serve, tmp: Path) -> None:
    slowlog = tmp / "slow.log"
    server = serve(
        write_app(tmp, SLOW_WSGI), "--slowlog-timeout", "0.5", "--slowlog", str(slowlog), nproc=1
    )
    assert request(server.address, "/slow", timeout=10).status == 200
    wait_for(lambda: slowlog.exists() and "slow_view" in slowlog.read_text(), 5, what="entry")
    slowlog.rename(tmp / "slow.log.1")
    os.kill(server.pid, signal.SIGUSR1)
    # The reopen happens at the worker's next sweep: ask again until an entry lands in the
    # new file (each slow request is 1.5 s; at most a few).
    results: list[Any] = []

    def reopened() -> bool:
        results.append(request(server.address, "/slow", timeout=10).status)
        return slowlog.exists() and "slow_view" in slowlog.read_text()

    wait_for(reopened, 15, interval=0.1, what="the slowlog reopened")
    assert set(results) == {200}


HOLDS_AFTER_ITS_BODY = """
async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"10")]})
    await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
    # The body is complete: the end must already be out. Wait until the web server goes.
    while (await receive())["type"] != "http.disconnect":
        pass
    await send({"type": "http.response.body", "body": b""})
"""


def test_asgi_response_ends_with_the_message_that_completes_content_length(
    serve, tmp: Path
) -> None:
    server = serve(write_app(tmp, HOLDS_AFTER_ITS_BODY), nproc=1)
    with connect(server.address, 10) as sock:
        sock.sendall(encode_request(1, build_params(path="/held")))
        data = b""
        # END_REQUEST is record type 3; the app only returns once this side closes.
        while b"\x01\x03\x00\x01" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert b"0123456789" in data
    assert request(server.address, "/again", timeout=10).status == 200
    assert "went away" not in server.log() and "Traceback" not in server.log()
