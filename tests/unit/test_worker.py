"""The worker in process: its loop runs in a thread, serving a unix listener in a temporary
directory; the tests talk FastCGI to it with fcgi_engine.client. Also the hand-off codec, the
access log line and the scoreboard layout, which need no process either."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fcgi_engine.client import Exchange, build_params, connect, encode_request, request
from fcgi_engine.config.settings import ServerConfig
from fcgi_engine.protocol.codec import encode_record
from fcgi_engine.protocol.constants import RecordType
from fcgi_engine.serving.access_log import format_line
from fcgi_engine.serving.handoff import (
    decode_handoff,
    encode_handoff,
    receive_connection,
    send_connection,
)
from fcgi_engine.serving.scoreboard import (
    PATH_BYTES,
    SLOT_LAYOUT,
    InFlight,
    Scoreboard,
    WorkerState,
)
from fcgi_engine.serving.worker import Worker
from fcgi_engine.serving.worker_base import WorkerOptions

TIMEOUT = 5.0


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = f"hello {environ['PATH_INFO']}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def big_write(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A body just under the worker's slice size, given to write(): head and body together
    are over it, so the response's first bytes go out as a memoryview slice."""
    write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
    write(b"x" * (256 * 1024 - 10))
    return []


def poll(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(16)
        yield sock
    finally:
        sock.close()


def stop(worker: Worker, signum: int = signal.SIGTERM) -> None:
    """What the signal would do: SIGTERM drains and closes, SIGHUP drains with hand-off."""
    worker.signal_handlers()[signum]()
    os.write(worker._wakeup.write_fd, b"!")


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    """Run the worker's loop in a thread; on the way out, stop it (unless the test did) and
    check it returned cleanly."""
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failure.append(exc)

    thread = threading.Thread(target=loop, name="worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        if thread.is_alive():
            stop(worker)
        thread.join(TIMEOUT)
        alive = thread.is_alive()
        if not alive:
            # A loop that raised left its connections open.
            for conn in list(worker.conns.values()):
                conn.sock.close()
            worker.close()
        assert not alive, "the worker did not stop"
        assert not failure, f"the worker loop raised {failure[0]!r}"


def worker_options(**settings: Any) -> WorkerOptions:
    """A worker's options from settings as a server would declare them (the rest: defaults)."""
    server = ServerConfig(name="test", socket="test.sock", **settings)
    return WorkerOptions.derive(server, allowed_addrs=["any"], nproc=1)


def make_worker(listener: socket.socket, app: Any = hello, **kwargs: Any) -> Worker:
    options = kwargs.pop("options", worker_options())
    return Worker(app, listener, options, errors=io.StringIO(), **kwargs)


def test_get_is_answered_and_keep_alive_serves_the_next(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener)) as worker:
        first = request(address, "/one", timeout=TIMEOUT)
        assert (first.status, first.body) == (200, b"hello /one\n")
        with connect(address, TIMEOUT) as sock:
            for i in (1, 2, 3):
                again = request(sock, f"/kept/{i}", keep_conn=True, request_id=i)
                assert (again.status, again.body) == (200, f"hello /kept/{i}\n".encode())
        assert worker.requests == 4


def test_malformed_record_closes_that_connection_and_the_next_is_served(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener)):
        with connect(address, TIMEOUT) as bad:
            # FastCGI version 9: nothing on this connection can be trusted any more.
            bad.sendall(bytes([9, 1, 0, 1, 0, 8, 0, 0]) + bytes(8))
            assert bad.recv(4096) == b""
        good = request(address, "/after", timeout=TIMEOUT)
        assert (good.status, good.body) == (200, b"hello /after\n")


def test_access_log_gets_one_line_per_request(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    log_path = tmp_path / "access.log"
    options = worker_options(access_log=str(log_path))
    with listening(tmp_path / "w.sock") as listener:
        with running(make_worker(listener, options=options)):
            assert request(address, "/logged?x=1", timeout=TIMEOUT).status == 200
            lines = poll(lambda: log_path.read_text().splitlines(), "the access log line")
    # The size counts what the app sent inside FastCGI: the CGI head and the body.
    body = b"hello /logged\n"
    size = len(f"Status: 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n")
    size += len(body)
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - \[[^]]+\] "GET /logged\?x=1 HTTP/1\.1" 200 {size} \d+\.\dms', lines[0]
    ), lines


def test_access_log_reads_the_status_of_a_response_sent_in_slices(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    log_path = tmp_path / "access.log"
    options = worker_options(access_log=str(log_path))
    with listening(tmp_path / "w.sock") as listener:
        with running(make_worker(listener, big_write, options=options)):
            response = request(address, "/big", timeout=TIMEOUT)
            assert (response.status, len(response.body)) == (200, 256 * 1024 - 10)
            line = poll(lambda: log_path.read_text(), "the access log line")
    assert '"GET /big HTTP/1.1" 200 ' in line


def test_access_log_line_format() -> None:
    environ = {
        "REMOTE_ADDR": "10.0.0.7",
        "REQUEST_METHOD": "POST",
        "REQUEST_URI": "/api/items?page=2",
        "SERVER_PROTOCOL": "HTTP/1.0",
    }
    when = "02/Jan/2025:10:00:00 +0000"
    assert format_line(environ, b"201", 512, 0.01234, when) == (
        '10.0.0.7 - - [02/Jan/2025:10:00:00 +0000] "POST /api/items?page=2 HTTP/1.0" 201 512 '
        "12.3ms\n"
    )
    # Without REQUEST_URI the path is the mount point and the path within it; a response that
    # never started has no status.
    bare = {"SCRIPT_NAME": "/shop", "PATH_INFO": "/cart"}
    assert format_line(bare, b"", 0, 0.0, when) == f'- - - [{when}] "- /shop/cart -" - 0 0.0ms\n'


@pytest.mark.parametrize(
    "ended, leftover",
    [([], b""), ([1], b""), ([1, 2, 65535], b"\x01\x01\x00\x01"), (list(range(300)), b"rest")],
)
def test_handoff_codec_round_trips(ended: list[int], leftover: bytes) -> None:
    decoded_ids, decoded_leftover = decode_handoff(encode_handoff(ended, leftover))
    # Only the most recent 255 ended ids travel (one byte counts them).
    assert (decoded_ids, decoded_leftover) == (ended[-255:], leftover)


def test_handoff_of_nothing_receives_nothing() -> None:
    send, recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with send, recv:
        recv.setblocking(False)
        assert receive_connection(recv) is None
        assert decode_handoff(b"") == ([], b"")


def test_draining_worker_hands_its_idle_connection_to_the_next(tmp_path: Path) -> None:
    """A rollout in one process: the old worker drains (SIGHUP) and passes its idle keep-alive
    connection through the hand-off socket; the new worker carries on serving it."""
    handoff_send, handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "old.sock")
    with handoff_send, handoff_recv, listening(tmp_path / "old.sock") as old_listener:
        old = make_worker(old_listener, handoff_send=handoff_send)
        with connect(address, TIMEOUT) as client:
            with running(old):
                assert request(client, "/before", keep_conn=True).body == b"hello /before\n"
                stop(old, signal.SIGHUP)
                poll(lambda: not old.conns, "the old worker to let the connection go")
            with listening(tmp_path / "new.sock") as new_listener:
                new = make_worker(new_listener, handoff_recv=handoff_recv)
                with running(new):
                    after = request(client, "/after", keep_conn=True, request_id=2)
                    assert (after.status, after.body) == (200, b"hello /after\n")
                    assert new.requests == 1


def test_handed_over_connection_keeps_its_unparsed_bytes_and_ended_ids(tmp_path: Path) -> None:
    handoff_send, handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    client, theirs = socket.socketpair()
    whole = encode_request(3, build_params(path="/split"), keep_conn=True)
    # The old worker had ended request 1, and received (unparsed) a late record of it and the
    # first bytes of request 3.
    late = encode_record(RecordType.STDIN, 1, b"late")
    with handoff_send, handoff_recv, client, listening(tmp_path / "w.sock") as listener:
        with theirs:
            send_connection(handoff_send, theirs.fileno(), [1], late + whole[:20])
        client.settimeout(TIMEOUT)
        with running(make_worker(listener, handoff_recv=handoff_recv)):
            # The late record is ignored (a stray one would close the connection); request 3
            # completes with the rest of its bytes.
            client.sendall(whole[20:])
            response = Exchange(client, 3).read_response()
        assert (response.status, response.body) == (200, b"hello /split\n")


def test_connection_closed_by_the_web_server_mid_request_is_dropped(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    whole = encode_request(1, build_params(path="/cut"))
    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener)) as worker:
        with connect(address, TIMEOUT) as cut:
            cut.sendall(whole[:30])
            poll(lambda: worker.conns, "the worker to take the connection")
        poll(lambda: not worker.conns, "the worker to drop the connection")
        assert worker.requests == 0
        assert request(address, "/next", timeout=TIMEOUT).status == 200


def test_scoreboard_layout_is_one_declaration() -> None:
    board = Scoreboard(3)
    board.reset(1, pid=4242, now=5.0)
    assert board.read(1) == WorkerState(4242, False, 0.0, 0, 5.0, "")
    board.begin(1, 100.5, "/p" * PATH_BYTES)
    board.heartbeat(1, 6.0)
    assert board.read(1) == WorkerState(4242, True, 100.5, 0, 6.0, ("/p" * PATH_BYTES)[:PATH_BYTES])
    board.end(1, 7, 8.0)
    board.set_pid(1, 4343)
    board.begin(1, 101.0, "/short")
    assert board.read(1) == WorkerState(4343, True, 101.0, 7, 8.0, "/short")
    # The neighbours are untouched.
    assert board.read(0) == board.read(2) == WorkerState(0, False, 0.0, 0, 0.0, "")
    assert [name for name, _code in SLOT_LAYOUT] == [
        "pid",
        "busy",
        "started",
        "requests",
        "heartbeat",
        "path",
    ]


# ---------------------------------------------------------------- threads > 1


class Gate:
    """An app whose requests wait on a gate the test opens; it counts the ones waiting."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.waiting = 0
        self.seen: list[bool] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self.lock:
            self.waiting += 1
            self.seen.append(environ["wsgi.multithread"])
        self.opened.wait(TIMEOUT)
        with self.lock:
            self.waiting -= 1
        return hello(environ, start_response)


def fetch_all(address: str, paths: list[str], keep_conn: bool = False) -> list[Any]:
    """Each path on its own connection, all at once; the responses in order."""
    results: list[Any] = [None] * len(paths)

    def one(i: int) -> None:
        with connect(address, TIMEOUT) as sock:
            results[i] = request(sock, paths[i], keep_conn=keep_conn)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    return_after = time.monotonic() + 2 * TIMEOUT
    for t in threads:
        t.join(max(0.1, return_after - time.monotonic()))
    return results


def test_threads_serve_requests_at_once_and_hold_no_idle_connection(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    gate = Gate()
    board = Scoreboard(1)
    options = worker_options(threads=4)
    with (
        listening(tmp_path / "w.sock") as listener,
        running(make_worker(listener, gate, options=options, scoreboard=board)) as worker,
    ):
        done: list[Any] = []
        runner = threading.Thread(
            target=lambda: done.extend(fetch_all(address, [f"/t{i}" for i in range(6)], True))
        )
        runner.start()
        # Four run at once; the other two wait in their sockets, not in a thread.
        poll(lambda: gate.waiting == 4, "four requests in threads")
        time.sleep(0.1)
        assert gate.waiting == 4
        state = board.read(0)
        assert state.busy and state.path.startswith("/t")
        gate.opened.set()
        runner.join(2 * TIMEOUT)
        assert [r.status for r in done] == [200] * 6
        assert [r.body for r in done] == [f"hello /t{i}\n".encode() for i in range(6)]
        assert gate.seen == [True] * 6
        poll(lambda: not board.read(0).busy, "the slot idle")
        assert board.read(0).requests == 6 and worker.requests == 6
        # Kept-alive connections went back to the loop: a new one is served at once.
        assert request(address, "/after", timeout=TIMEOUT).body == b"hello /after\n"


def test_threaded_drain_finishes_in_flight_requests(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    gate = Gate()
    with (
        listening(tmp_path / "w.sock") as listener,
        running(make_worker(listener, gate, options=worker_options(threads=3))) as worker,
    ):
        done: list[Any] = []
        runner = threading.Thread(
            target=lambda: done.extend(fetch_all(address, ["/a", "/b", "/c"]))
        )
        runner.start()
        poll(lambda: gate.waiting == 3, "three requests in threads")
        stop(worker)
        gate.opened.set()
        runner.join(2 * TIMEOUT)
        assert [r.status for r in done] == [200, 200, 200]


def test_max_requests_waits_for_the_threads(tmp_path: Path) -> None:
    address = str(tmp_path / "w.sock")
    gate = Gate()
    options = WorkerOptions.derive(
        ServerConfig(name="t", socket="t.sock", threads=4, max_requests=2),
        allowed_addrs=["any"],
        nproc=1,
    )
    with (
        listening(tmp_path / "w.sock") as listener,
        running(make_worker(listener, gate, options=options)) as worker,
    ):
        done: list[Any] = []
        runner = threading.Thread(target=lambda: done.extend(fetch_all(address, ["/a", "/b"])))
        runner.start()
        poll(lambda: gate.waiting == 2, "two requests in threads")
        time.sleep(0.1)
        assert worker._draining
        gate.opened.set()
        runner.join(2 * TIMEOUT)
        assert [r.status for r in done] == [200, 200]


def test_threads_one_is_the_inline_worker(tmp_path: Path) -> None:
    seen: list[bool] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(environ["wsgi.multithread"])
        return hello(environ, start_response)

    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener, app)) as w:
        assert request(str(tmp_path / "w.sock"), "/x", timeout=TIMEOUT).status == 200
        assert w._threads is None and "_handle_complete" not in vars(w)
    assert seen == [False]


def test_in_flight_shows_the_oldest_request() -> None:
    board = Scoreboard(1)
    flight = InFlight(board, 0)
    first = flight.begin("/first")
    started = board.read(0).started
    second = flight.begin("/second")
    assert (board.read(0).busy, board.read(0).path) == (True, "/first")
    third = flight.begin("/third")
    flight.end(second)
    assert (board.read(0).path, board.read(0).started, board.read(0).requests) == (
        "/first",
        started,
        1,
    )
    flight.end(first)
    assert (board.read(0).busy, board.read(0).path, board.read(0).requests) == (True, "/third", 2)
    flight.end(third)
    assert (board.read(0).busy, board.read(0).requests) == (False, 3)
    assert flight.oldest() is None
