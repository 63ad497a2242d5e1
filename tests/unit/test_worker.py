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
from fcgi_engine.handoff import (
    decode_handoff,
    encode_handoff,
    receive_connection,
    send_connection,
)
from fcgi_engine.protocol.codec import encode_record
from fcgi_engine.protocol.constants import RecordType
from fcgi_engine.serving.scoreboard import (
    PATH_BYTES,
    SLOT_LAYOUT,
    STATUS_CLASSES,
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
    # nginx's combined format plus the seconds taken; the size is the body's alone.
    size = len(b"hello /logged\n")
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - \[[^]]+\] "GET /logged\?x=1 HTTP/1\.1" 200 {size} "-" "-" '
        r"\d+\.\d{3}",
        lines[0],
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
    assert f'"GET /big HTTP/1.1" 200 {256 * 1024 - 10} ' in line


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
    board.begin(1, 100.5, "GET", "/p" * PATH_BYTES)
    board.heartbeat(1, 6.0)
    assert board.read(1) == WorkerState(
        4242, True, 100.5, 0, 6.0, ("/p" * PATH_BYTES)[:PATH_BYTES], "GET"
    )
    board.end(1, 7, 8.0)
    board.set_pid(1, 4343)
    board.begin(1, 101.0, "POST", "/short")
    assert board.read(1) == WorkerState(4343, True, 101.0, 7, 8.0, "/short", "POST")
    # The neighbours are untouched.
    assert board.read(0) == board.read(2) == WorkerState(0, False, 0.0, 0, 0.0, "")
    names = [name for name, _code in SLOT_LAYOUT]
    assert names[:2] == ["pid", "busy"] and {"started", "requests", "heartbeat"} <= set(names)


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
    first = flight.begin("GET", "/first")
    started = board.read(0).started
    second = flight.begin("GET", "/second")
    assert (board.read(0).busy, board.read(0).path) == (True, "/first")
    third = flight.begin("GET", "/third")
    flight.end(second, 200, 0.01)
    assert (board.read(0).path, board.read(0).started, board.read(0).requests) == (
        "/first",
        started,
        1,
    )
    flight.end(first, 200, 0.01)
    assert (board.read(0).busy, board.read(0).path, board.read(0).requests) == (True, "/third", 2)
    flight.end(third, 200, 0.01)
    assert (board.read(0).busy, board.read(0).requests) == (False, 3)
    assert flight.oldest() is None


# ---------------------------------------------------------------- the end of a response


def records(data: bytes) -> list[tuple[int, bytes]]:
    """The whole records in `data`: (type, content)."""
    found = []
    pos = 0
    while len(data) - pos >= 8:
        clen = int.from_bytes(data[pos + 4 : pos + 6], "big")
        plen = data[pos + 6]
        if len(data) - pos < 8 + clen + plen:
            break
        found.append((data[pos + 1], data[pos + 8 : pos + 8 + clen]))
        pos += 8 + clen + plen
    return found


def read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while not done(data):
        assert time.monotonic() < deadline, f"timed out; received {data!r}"
        chunk = sock.recv(65536)
        assert chunk, f"the worker closed; received {data!r}"
        data += chunk
    return data


def body_of(data: bytes) -> bytes:
    stdout = b"".join(c for t, c in records(data) if t == RecordType.STDOUT)
    return stdout.partition(b"\r\n\r\n")[2]


def ended(data: bytes) -> bool:
    return any(t == RecordType.END_REQUEST for t, _c in records(data))


class Streaming:
    """A generator app declaring Content-Length 10, sent in two chunks; after the last one it
    waits for the test to say the web server has seen what it needs (and perhaps closed)."""

    def __init__(self, length: int | None = 10) -> None:
        self.length = length
        self.seen = threading.Event()
        self.returned = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        headers = [("Content-Type", "text/plain")]
        if self.length is not None:
            headers.append(("Content-Length", str(self.length)))
        start_response("200 OK", headers)

        def body() -> Iterator[bytes]:
            try:
                yield b"a" * 5
                yield b"b" * 5
                self.seen.wait(TIMEOUT)
                yield b""  # an empty chunk after Content-Length is dropped
            finally:
                self.returned.set()

        return body()


def test_end_goes_out_with_the_chunk_that_completes_content_length(tmp_path: Path) -> None:
    """lighttpd closes once it has Content-Length bytes: the end records must be in the same
    send as those bytes, not after the app's iterator is exhausted."""
    app = Streaming()
    address = str(tmp_path / "w.sock")
    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener, app)):
        with connect(address, TIMEOUT) as sock:
            sock.sendall(encode_request(1, build_params(path="/stream")))
            # The app still holds its iterator open, and the request is already ended.
            data = read_until(sock, ended)
            assert body_of(data) == b"aaaaabbbbb" and not app.returned.is_set()
            app.seen.set()
            assert sock.recv(65536) == b""  # nothing after the end: the worker closed
        assert app.returned.wait(TIMEOUT)


def test_a_list_body_ends_with_its_last_chunk_in_one_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcgi_engine.serving.worker as worker_module

    sends: list[bytes] = []
    real_send_all = worker_module.send_all

    def counted(sock: socket.socket, data: bytes | memoryview, timeout: float) -> None:
        sends.append(bytes(data))
        real_send_all(sock, data, timeout)

    monkeypatch.setattr(worker_module, "send_all", counted)

    def three(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"one ", b"two ", b"three"]

    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener, three)):
        response = request(str(tmp_path / "w.sock"), "/list", timeout=TIMEOUT)
    assert response.body == b"one two three"
    # The last send holds the last chunk and the end; no send holds the end alone.
    assert [t for t, _c in records(sends[-1])] == [
        RecordType.STDOUT,
        RecordType.STDOUT,
        RecordType.END_REQUEST,
    ]
    assert body_of(sends[-1]) == b"" and records(sends[-1])[0][1] == b"three"


def test_a_web_server_closing_before_the_end_records_is_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without Content-Length the end follows the body; a web server that closed once it had
    the body (the response was complete) is logged at debug, not as a client gone away."""
    app = Streaming(length=None)
    caplog.set_level("DEBUG", logger="fcgi_engine.worker")
    address = str(tmp_path / "w.sock")
    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener, app)) as w:
        with connect(address, TIMEOUT) as sock:
            sock.sendall(encode_request(1, build_params(path="/no-length")))
            read_until(sock, lambda data: body_of(data) == b"aaaaabbbbb")
        app.seen.set()
        assert app.returned.wait(TIMEOUT)
        poll(lambda: not w.conns, "the worker to close the connection")
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert not [m for level, m in messages if level != "DEBUG" and "went away" in m], messages
    assert any("before the end of a complete response" in m for _level, m in messages)


def test_bytes_past_content_length_are_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def too_long(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Length", "4")])
        return iter([b"abc", b"def", b"gh"])

    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener, too_long)):
        response = request(str(tmp_path / "w.sock"), "/long", timeout=TIMEOUT)
    assert (response.status, response.body) == (200, b"abcd")
    assert any("4 body bytes past its Content-Length" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- metrics, every request


def test_every_request_is_counted_by_status_class_without_an_access_log(tmp_path: Path) -> None:
    def by_path(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        status = "404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"x"]

    board = Scoreboard(1)
    address = str(tmp_path / "w.sock")
    with (
        listening(tmp_path / "w.sock") as listener,
        running(make_worker(listener, by_path, scoreboard=board)),
    ):
        for path in ("/a", "/b", "/missing", "/boom"):
            request(address, path, timeout=TIMEOUT)
        poll(lambda: board.read(0).requests == 4, "four requests counted")
    state = board.read(0)
    assert dict(zip(STATUS_CLASSES, state.by_class, strict=True)) == {
        "1xx": 0,
        "2xx": 2,
        "3xx": 0,
        "4xx": 1,
        "5xx": 1,
        "none": 0,
    }
    assert sum(state.buckets) == 4 and state.duration_sum > 0


# ---------------------------------------------------------------- the status request


def status_worker(listener: socket.socket, channel: socket.socket | None) -> Worker:
    options = worker_options(status_path="/fcgi-status")
    return make_worker(listener, options=options, status_pass=channel)


def test_a_request_for_status_path_goes_to_the_master_not_the_app(tmp_path: Path) -> None:
    from fcgi_engine.status_pass import receive_status_pass

    ours, masters = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "w.sock")
    with ours, masters, listening(tmp_path / "w.sock") as listener:
        with running(status_worker(listener, ours)) as worker, connect(address, TIMEOUT) as sock:
            sock.sendall(
                encode_request(
                    7, build_params(path="/fcgi-status", query="openmetrics"), keep_conn=True
                )
            )
            masters.settimeout(TIMEOUT)
            passed = poll(lambda: receive_status_pass(masters), "the passed request")
            assert (passed.request_id, passed.keep_conn, passed.stdin_done) == (7, True, True)
            assert b"openmetrics" in passed.params
            # The master answers on the connection it was given; the worker let go of it.
            assert passed.sock is not None
            with passed.sock:
                passed.sock.sendall(
                    encode_record(RecordType.STDOUT, 7, b"Status: 200 OK\r\n\r\nstatus")
                    + encode_record(RecordType.END_REQUEST, 7, bytes(8))
                )
            assert Exchange(sock, 7).read_response().body == b"status"
            assert worker.requests == 0
            poll(lambda: not worker.conns, "the worker to forget the connection")
            # Any other path still reaches the app.
            assert request(address, "/fcgi-status/more", timeout=TIMEOUT).status == 200


def test_a_status_request_that_cannot_be_passed_is_answered_503(tmp_path: Path) -> None:
    ours, masters = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    masters.close()  # the master is gone: the send fails
    address = str(tmp_path / "w.sock")
    with ours, listening(tmp_path / "w.sock") as listener:
        with running(status_worker(listener, ours)) as worker:
            with connect(address, TIMEOUT) as sock:
                response = request(sock, "/fcgi-status", keep_conn=True)
                assert response.status == 503
                # The connection is kept alive: the next request on it reaches the app.
                assert request(sock, "/app", keep_conn=True, request_id=2).status == 200
            assert worker.requests == 1


def test_without_status_path_the_app_gets_every_path(tmp_path: Path) -> None:
    with listening(tmp_path / "w.sock") as listener, running(make_worker(listener)) as worker:
        response = request(str(tmp_path / "w.sock"), "/fcgi-status", timeout=TIMEOUT)
        assert (response.status, response.body) == (200, b"hello /fcgi-status\n")
        assert worker.status_path is None


def test_threaded_worker_passes_status_requests_too(tmp_path: Path) -> None:
    from fcgi_engine.status_pass import receive_status_pass

    ours, masters = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    options = worker_options(status_path="/fcgi-status", threads=2)
    with ours, masters, listening(tmp_path / "w.sock") as listener:
        worker = make_worker(listener, options=options, status_pass=ours)
        with running(worker), connect(str(tmp_path / "w.sock"), TIMEOUT) as sock:
            sock.sendall(encode_request(1, build_params(path="/fcgi-status")))
            masters.settimeout(TIMEOUT)
            passed = poll(lambda: receive_status_pass(masters), "the passed request")
            assert passed.request_id == 1
            if passed.sock is not None:
                passed.sock.close()


# ---------------------------------------------------------------- the slowlog


def test_slowlog_writes_the_stack_of_a_slow_request_once(tmp_path: Path) -> None:
    from fcgi_engine.serving.slowlog import SlowLog

    path = tmp_path / "slow.log"
    slowlog = SlowLog(str(path), 0.5)
    release = threading.Event()
    started = threading.Event()

    def slow_view() -> None:
        slowlog.begin(threading.get_ident(), "GET", "/report?month=1")
        started.set()
        release.wait(TIMEOUT)
        slowlog.end(threading.get_ident())

    thread = threading.Thread(target=slow_view)
    thread.start()
    try:
        assert started.wait(TIMEOUT)
        # Not yet past the timeout: nothing; past it: one entry, and only one.
        assert slowlog.check(time.monotonic()) == 0
        assert slowlog.check(time.monotonic() + 1) == 1
        assert slowlog.check(time.monotonic() + 2) == 0
    finally:
        release.set()
        thread.join(TIMEOUT)
    text = path.read_text()
    assert f"pid {os.getpid()}, GET /report?month=1 running for " in text
    assert ", in slow_view\n" in text and "release.wait(TIMEOUT)" in text
    assert slowlog.check(time.monotonic() + 3) == 0  # it ended: forgotten


def test_slowlog_shows_the_awaits_of_a_suspended_task() -> None:
    import asyncio

    from fcgi_engine.serving.slowlog import task_stack

    async def fetch_rows() -> None:
        await asyncio.sleep(TIMEOUT)

    async def slow_async_view() -> None:
        await fetch_rows()

    async def main() -> list[str]:
        task = asyncio.get_running_loop().create_task(slow_async_view())
        await asyncio.sleep(0)
        try:
            return task_stack(task, threading.get_ident())
        finally:
            task.cancel()

    stack = "".join(asyncio.run(main()))
    assert ", in slow_async_view\n" in stack and ", in fetch_rows\n" in stack


def test_worker_slowlog_catches_a_request_and_lets_it_finish(tmp_path: Path) -> None:
    path = tmp_path / "slow.log"
    gate = Gate()
    options = worker_options(slowlog=str(path), slowlog_timeout=0.1)
    address = str(tmp_path / "w.sock")
    with (
        listening(tmp_path / "w.sock") as listener,
        running(make_worker(listener, gate, options=options)),
    ):
        done: list[Any] = []
        runner = threading.Thread(target=lambda: done.extend(fetch_all(address, ["/slow?x=1"])))
        runner.start()
        text = poll(lambda: path.exists() and path.read_text(), "the slowlog entry")
        gate.opened.set()
        runner.join(2 * TIMEOUT)
    assert "GET /slow?x=1 running for" in text and ", in __call__\n" in text
    assert [r.status for r in done] == [200]


def test_no_slowlog_timeout_no_slowlog(tmp_path: Path) -> None:
    with listening(tmp_path / "w.sock") as listener:
        worker = make_worker(listener)
        try:
            assert worker.slowlog is None
        finally:
            worker.close()


def test_slowlog_shows_a_task_that_blocks_the_loop_down_to_its_sync_calls() -> None:
    import asyncio

    from fcgi_engine.serving.slowlog import task_stack

    started, release = threading.Event(), threading.Event()
    tasks: list[asyncio.Task[None]] = []
    loop_thread: list[int] = []

    def blocking_helper() -> None:
        started.set()
        release.wait(TIMEOUT)

    async def blocking_view() -> None:
        blocking_helper()

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        tasks.append(asyncio.get_running_loop().create_task(blocking_view()))
        await tasks[0]

    runner = threading.Thread(target=lambda: asyncio.run(main()))
    runner.start()
    try:
        assert started.wait(TIMEOUT)
        stack = "".join(task_stack(tasks[0], loop_thread[0]))
    finally:
        release.set()
        runner.join(TIMEOUT)
    assert ", in blocking_view\n" in stack and ", in blocking_helper\n" in stack
    assert stack.index("in blocking_view") < stack.index("in blocking_helper")


# ---------------------------------------------------------------- work stealing (issue 11)


class HeldOnce:
    """/hold waits on a gate the test opens; every other path answers at once."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.holding = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/hold":
            self.holding.set()
            self.opened.wait(2 * TIMEOUT)
        return hello(environ, start_response)


def send_request(sock: socket.socket, path: str, request_id: int) -> None:
    sock.sendall(encode_request(request_id, build_params(path=path), keep_conn=True))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_request_behind_a_busy_worker_is_served_by_an_idle_one(
    tmp_path: Path, threads: int
) -> None:
    """Worker A holds kept-alive connections; while every request it can run waits on the
    gate, a request sent on another of its connections is answered by worker B (it takes it
    from the hand-off socket), and the connection stays alive there."""
    handoff_send, handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "w.sock")
    app = HeldOnce()
    options = worker_options(threads=threads)
    with handoff_send, handoff_recv, listening(tmp_path / "w.sock") as listener:
        busy = make_worker(
            listener, app, options=options, handoff_send=handoff_send, handoff_recv=handoff_recv
        )
        idle = make_worker(
            listener, app, options=options, handoff_send=handoff_send, handoff_recv=handoff_recv
        )
        socks = [connect(address, TIMEOUT) for _ in range(threads + 1)]
        try:
            with running(busy):
                # Worker A alone: it accepts every connection.
                for i, sock in enumerate(socks):
                    assert request(sock, f"/first/{i}", keep_conn=True).status == 200
                with running(idle):
                    for sock in socks[:threads]:
                        send_request(sock, "/hold", 2)
                    poll(lambda: app.holding.is_set(), "the held request to start")
                    if threads > 1:
                        poll(lambda: busy._threads.full, "every thread of A busy")  # type: ignore[union-attr]
                    behind = request(socks[-1], "/behind", keep_conn=True, request_id=2)
                    assert (behind.status, behind.body) == (200, b"hello /behind\n")
                    assert not app.opened.is_set()
                    assert busy.given_away == 1
                    assert idle.requests == 1
                    # The connection lives on in B.
                    again = request(socks[-1], "/again", keep_conn=True, request_id=3)
                    assert (again.status, again.body) == (200, b"hello /again\n")
                    assert idle.requests == 2
                    app.opened.set()
                    for sock in socks[:threads]:
                        held = Exchange(sock, 2).read_response()
                        assert (held.status, held.body) == (200, b"hello /hold\n")
        finally:
            app.opened.set()
            for sock in socks:
                sock.close()


def test_a_worker_that_is_not_live_takes_no_connection_given_away(tmp_path: Path) -> None:
    """A generation still proving itself takes nothing: the request waits for the busy worker
    (A gives its connection away, B leaves it in the hand-off socket; A takes it back)."""
    handoff_send, handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "w.sock")
    app = HeldOnce()
    with handoff_send, handoff_recv, listening(tmp_path / "w.sock") as listener:
        busy = make_worker(listener, app, handoff_send=handoff_send, handoff_recv=handoff_recv)
        unproven = make_worker(
            listener, app, handoff_send=handoff_send, handoff_recv=handoff_recv, live=False
        )
        socks = [connect(address, TIMEOUT) for _ in range(2)]
        try:
            with running(busy):
                for i, sock in enumerate(socks):
                    assert request(sock, f"/first/{i}", keep_conn=True).status == 200
                with running(unproven):
                    send_request(socks[0], "/hold", 2)
                    poll(lambda: app.holding.is_set(), "the held request to start")
                    send_request(socks[1], "/behind", 2)
                    poll(lambda: busy.given_away == 1, "the waiting connection given away")
                    app.opened.set()
                    behind = Exchange(socks[1], 2).read_response()
                    assert (behind.status, behind.body) == (200, b"hello /behind\n")
                    assert unproven.requests == 0
                    assert busy.requests == 4
        finally:
            app.opened.set()
            for sock in socks:
                sock.close()


def test_a_full_hand_off_socket_keeps_the_connection_with_its_worker(tmp_path: Path) -> None:
    """No room to give a waiting connection away: the busy worker keeps it (nothing is lost
    or closed) and serves it once its app call ends."""
    handoff_send, handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "w.sock")
    app = HeldOnce()
    with handoff_send, handoff_recv, listening(tmp_path / "w.sock") as listener:
        busy = make_worker(listener, app, handoff_send=handoff_send, handoff_recv=handoff_recv)
        socks = [connect(address, TIMEOUT) for _ in range(2)]
        try:
            with running(busy):
                for i, sock in enumerate(socks):
                    assert request(sock, f"/first/{i}", keep_conn=True).status == 200
                send_request(socks[0], "/hold", 2)
                poll(lambda: app.holding.is_set(), "the held request to start")
                # Fill the hand-off socket (empty datagrams carry no connection).
                while True:
                    try:
                        handoff_send.send(b"", socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                send_request(socks[1], "/behind", 2)
                poll(lambda: busy._stealer.steals >= 2, "the stealer to try twice")  # type: ignore[union-attr]
                assert busy.given_away == 0
                app.opened.set()
                for sock, path in zip(socks, ("/hold", "/behind"), strict=True):
                    answer = Exchange(sock, 2).read_response()
                    assert (answer.status, answer.body) == (200, f"hello {path}\n".encode())
                assert busy.requests == 4
        finally:
            app.opened.set()
            for sock in socks:
                sock.close()
