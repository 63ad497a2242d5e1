"""The master <-> generation contract: each message's wire form, and the errors bad lines get."""

from __future__ import annotations

import json

import pytest

from fcgi_engine import channel
from fcgi_engine.channel import Failed, MessageError, Ready, Resize, Status, WorkerInfo

W1 = WorkerInfo(pid=11, state="idle", requests=3, started=100.5)
W2 = WorkerInfo(pid=12, state="busy", requests=0, started=101.0)
W1_WIRE = {"pid": 11, "state": "idle", "requests": 3, "started": 100.5}
W2_WIRE = {"pid": 12, "state": "busy", "requests": 0, "started": 101.0}

# The wire as engines before typed messages wrote it: a re-exec'd master adopts generations
# of the engine it replaced, so these bytes must keep meaning the same.
MESSAGES = [
    (
        Ready([11, 12], [W1, W2]),
        {"event": "ready", "pids": [11, 12], "workers": [W1_WIRE, W2_WIRE]},
    ),
    (
        Failed("ImportError: no module named x"),
        {"event": "failed", "error": "ImportError: no module named x"},
    ),
    (Status([W1]), {"event": "status", "workers": [W1_WIRE]}),
    (Status([]), {"event": "status", "workers": []}),
    (Resize(4), {"cmd": "nproc", "n": 4}),
    # Issue 12: optional fields, left out when unknown, so older readers see what they knew.
    (
        Ready([11], [W1], channel.HealthResult("/healthz", 200)),
        {
            "event": "ready",
            "pids": [11],
            "workers": [W1_WIRE],
            "health": {"path": "/healthz", "status": 200},
        },
    ),
    (
        Failed("health check", channel.HealthResult("/healthz", None)),
        {
            "event": "failed",
            "error": "health check",
            "health": {"path": "/healthz", "status": None},
        },
    ),
    (channel.Stop(serve_backlog=True), {"cmd": "stop", "serve_backlog": True}),
    (channel.Stop(serve_backlog=False), {"cmd": "stop", "serve_backlog": False}),
]


@pytest.mark.parametrize(("message", "wire"), MESSAGES)
def test_messages_keep_their_wire_form_both_ways(message: channel.Message, wire: dict) -> None:
    encoded = channel.encode(message)
    assert encoded == json.dumps(wire).encode() + b"\n"
    assert channel.decode(encoded) == message
    assert channel.decode(encoded.rstrip(b"\n")) == message


def test_an_integral_started_time_decodes_as_a_float() -> None:
    message = channel.decode(
        b'{"event": "status", "workers": [{"pid": 1, "state": "idle", "requests": 0, "started": 5}'
        b"]}"
    )
    assert isinstance(message, Status)
    [worker] = message.workers
    assert worker == WorkerInfo(1, "idle", 0, 5.0) and isinstance(worker.started, float)


def test_a_ready_without_pids_or_workers_is_an_empty_ready() -> None:
    assert channel.decode(b'{"event": "ready"}') == Ready([], [])


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"garbage", "not a JSON line"),
        (b"42", "a message is a JSON object"),
        (b'{"event": "exploded"}', "unknown event 'exploded'"),
        (b'{"cmd": "reboot"}', "unknown command 'reboot'"),
        (b'{"n": 3}', "names its 'event' or 'cmd'"),
        (b'{"cmd": "nproc"}', "nproc: 'n' is missing"),
        (b'{"cmd": "nproc", "n": "3"}', "nproc: 'n' must be int"),
        (b'{"cmd": "nproc", "n": true}', "nproc: 'n' must be int"),
        (b'{"event": "ready", "pids": [1, "2"]}', "'pids' must be a list of ints"),
        (b'{"event": "ready", "pids": 3}', "ready: 'pids' must be list"),
        (b'{"event": "status"}', "status: 'workers' is missing"),
        (b'{"event": "status", "workers": {}}', "'workers' must be list"),
        (b'{"event": "status", "workers": [7]}', "a worker is a JSON object"),
        (b'{"event": "status", "workers": [{"state": "idle"}]}', "worker: 'pid' is missing"),
        (b'{"event": "failed", "error": 3}', "failed: 'error' must be str"),
    ],
)
def test_bad_lines_raise_a_message_error_saying_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        channel.decode(raw)


def test_message_error_is_a_value_error() -> None:
    assert issubclass(MessageError, ValueError)


def test_line_buffer_is_importable_from_the_channel() -> None:
    lines = channel.LineBuffer()
    first = channel.encode(Resize(2))
    second = channel.encode(Failed("x"))
    assert lines.feed(first + second[:5]) == [first.rstrip(b"\n")]
    assert [channel.decode(raw) for raw in lines.feed(second[5:])] == [Failed("x")]


def test_a_bad_health_result_says_what_is_wrong() -> None:
    with pytest.raises(MessageError, match="'health'"):
        channel.decode(b'{"event": "ready", "pids": [], "health": "yes"}')
    with pytest.raises(MessageError, match="'status'"):
        channel.decode(b'{"event": "ready", "pids": [], "health": {"path": "/h", "status": "ok"}}')
