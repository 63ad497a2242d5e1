"""The manager <-> master contract: each message's wire form, and the errors bad lines get."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcgi_engine import control
from fcgi_engine.control import (
    ErrorResponse,
    LineBuffer,
    MessageError,
    RolloutRequest,
    RolloutResponse,
    StatusRequest,
    StatusResponse,
    StoppedResponse,
    StopRequest,
)

# What the wire has always carried: a new manager talks to an old master and the other way.
REQUESTS = [
    (StatusRequest(), {"cmd": "status"}),
    (RolloutRequest(), {"cmd": "graceful"}),
    (StopRequest(), {"cmd": "stop", "fast": False}),
    (StopRequest(fast=True), {"cmd": "stop", "fast": True}),
]
RESPONSES = [
    (StatusResponse({"generation": 3}, pid=7), {"ok": True, "status": {"generation": 3}, "pid": 7}),
    (
        RolloutResponse(
            ok=True, from_gen=1, to_gen=2, workers=4, boot_seconds=1.5, seconds=3.25, pid=7
        ),
        {
            "ok": True,
            "from": 1,
            "to": 2,
            "workers": 4,
            "boot_seconds": 1.5,
            "seconds": 3.25,
            "pid": 7,
        },
    ),
    (
        RolloutResponse(ok=False, from_gen=None, to_gen=1, error="ImportError", pid=7),
        {
            "ok": False,
            "from": None,
            "to": 1,
            "error": "ImportError",
            "rolled_back": False,
            "pid": 7,
        },
    ),
    (
        RolloutResponse(
            ok=True,
            from_gen=1,
            to_gen=2,
            boot_seconds=1.5,
            release_dir="/srv/app/releases/8",
            health={"path": "/healthz", "status": 200},
        ),
        {
            "ok": True,
            "from": 1,
            "to": 2,
            "boot_seconds": 1.5,
            "release_dir": "/srv/app/releases/8",
            "health": {"path": "/healthz", "status": 200},
        },
    ),
    (
        RolloutResponse(
            ok=False,
            from_gen=1,
            to_gen=2,
            error="health check answered 500",
            rolled_back=True,
            boot_seconds=0.5,
            health={"path": "/healthz", "status": 500},
        ),
        {
            "ok": False,
            "from": 1,
            "to": 2,
            "error": "health check answered 500",
            "rolled_back": True,
            "boot_seconds": 0.5,
            "health": {"path": "/healthz", "status": 500},
        },
    ),
    (StoppedResponse(pid=7), {"ok": True, "stopped": True, "pid": 7}),
    (
        ErrorResponse("the server is stopping", pid=7),
        {"ok": False, "error": "the server is stopping", "pid": 7},
    ),
]


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.mark.parametrize(("request_", "wire"), REQUESTS)
def test_requests_keep_their_wire_form_both_ways(request_: control.Request, wire: dict) -> None:
    assert control.encode(request_) == line(wire)
    assert control.decode_request(line(wire)) == request_


@pytest.mark.parametrize(("response", "wire"), RESPONSES)
def test_responses_keep_their_wire_form_both_ways(response: control.Response, wire: dict) -> None:
    assert control.encode(response) == line(wire)
    assert control.decode_response(line(wire)) == response
    assert control.response_wire(response) == wire


def test_a_stop_request_without_fast_is_a_graceful_stop() -> None:
    assert control.decode_request(b'{"cmd": "stop"}') == StopRequest(fast=False)


def test_a_response_without_pid_decodes_and_encodes_without_one() -> None:
    assert control.decode_response(b'{"ok": true, "stopped": true}') == StoppedResponse()
    assert control.encode(StoppedResponse()) == b'{"ok": true, "stopped": true}\n'


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"not json", "not a JSON line"),
        (b"\xff\xfe", "not a JSON line"),
        (b"[1, 2]", "a message is a JSON object"),
        (b'{"cmd": "explode"}', "unknown command 'explode'"),
        (b'{"fast": true}', "names its 'cmd'"),
    ],
)
def test_bad_requests_say_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        control.decode_request(raw)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"status": {}}', "'ok' is missing"),
        (b'{"ok": "yes", "stopped": true}', "'ok' must be bool"),
        (b'{"ok": true, "status": []}', "'status' must be dict"),
        (b'{"ok": true, "to": "2"}', "'to' must be int"),
        (b'{"ok": true, "to": 2, "workers": true}', "'workers' must be int"),
        (b'{"ok": true, "pid": 1.5, "stopped": true}', "'pid' must be int"),
        (b'{"ok": true}', "no known kind"),
    ],
)
def test_bad_responses_say_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        control.decode_response(raw)


def test_an_error_response_without_text_still_says_something() -> None:
    assert control.decode_response(b'{"ok": false}') == ErrorResponse("unknown error")


# ---------------------------------------------------------------- LineBuffer


def test_line_buffer_returns_complete_lines_across_chunks() -> None:
    buf = LineBuffer()
    assert buf.feed(b'{"a"') == []
    assert buf.feed(b': 1}\n{"b": 2}\n{"c"') == [b'{"a": 1}', b'{"b": 2}']
    assert buf.feed(b": 3}\n") == [b'{"c": 3}']
    assert buf.dropped == 0


def test_line_buffer_drops_an_overlong_line_and_carries_on_after_its_newline() -> None:
    buf = LineBuffer(limit=8)
    assert buf.feed(b"short\n0123456789") == [b"short"]
    assert buf.dropped == 1 and buf.rest == b""
    assert buf.feed(b"still the long line") == []
    assert buf.feed(b"...end\nnext\n") == [b"next"]
    assert buf.feed(b"0123456789abc\nok\n") == [b"ok"]
    assert buf.dropped == 2


# ---------------------------------------------------------------- ask and call over a socket


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A fake master on a unix socket: records each request line, answers with the next of
    `answers` (an empty answer closes without one)."""
    path = str(tmp_path / "ctl")
    seen: list[bytes] = []
    answers: list[bytes] = []
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(65536))
                if answers:
                    conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen, answers
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(5)


def test_ask_sends_the_request_and_decodes_its_response(master) -> None:
    path, seen, answers = master
    answers.append(b'{"ok": true, "stopped": true, "pid": 42}\n')
    assert control.ask(path, StopRequest(fast=True)) == StoppedResponse(pid=42)
    assert seen == [b'{"cmd": "stop", "fast": true}\n']


def test_ask_takes_an_error_response_to_any_request(master) -> None:
    path, _, answers = master
    answers.append(b'{"ok": false, "error": "the server is stopping", "pid": 42}\n')
    assert control.ask(path, RolloutRequest()) == ErrorResponse("the server is stopping", 42)


def test_ask_refuses_a_response_of_another_request(master) -> None:
    path, _, answers = master
    answers.append(b'{"ok": true, "stopped": true}\n')
    with pytest.raises(control.ControlError, match="answered StatusRequest with StoppedResponse"):
        control.ask(path, StatusRequest())


def test_ask_turns_nonsense_into_a_control_error(master) -> None:
    path, _, answers = master
    answers.append(b"<html>\n")
    with pytest.raises(control.ControlError, match="something unexpected: not a JSON line"):
        control.ask(path, StatusRequest())


def test_ask_says_when_the_master_closes_without_answering(master) -> None:
    path, _, _ = master
    with pytest.raises(control.ControlError, match="without answering"):
        control.ask(path, StatusRequest())


def test_ask_says_when_nobody_listens(tmp_path: Path) -> None:
    with pytest.raises(control.ControlError, match="cannot reach the master"):
        control.ask(str(tmp_path / "nobody"), StatusRequest())


def test_ask_says_when_the_master_is_silent_too_long(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(path)
        silent.listen()
        with pytest.raises(control.ControlError, match="did not answer within 0.2 s"):
            control.ask(path, StatusRequest(), timeout=0.2)
    os.unlink(path)


def test_call_is_the_raw_json_form_and_checks_the_request(master) -> None:
    path, seen, answers = master
    answers.append(b'{"ok": true, "status": {"nproc": 2}, "pid": 42}\n')
    assert control.call(path, {"cmd": "status"}) == {"ok": True, "status": {"nproc": 2}, "pid": 42}
    assert seen == [b'{"cmd": "status"}\n']
    with pytest.raises(MessageError, match="unknown command"):
        control.call(path, {"cmd": "nope"})
