"""Leaving without loss (issue 12): on TERM the listener refuses new connections, every
connection already queued in its backlog is served, then every copy of the listener closes;
with drain_delay the server first serves on, not ready, for that long."""

from __future__ import annotations

import errno
import http.client
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from fcgi_engine.client import request
from tests.conftest import APPS, wait_for

pytestmark = pytest.mark.integration

APP = f"{APPS}/testapp.py"

SLOW = 0.4  # seconds each queued request takes in the app
CLIENTS = 12  # with 2 workers: 2 served at a time, the rest wait in the listen queue


def connect_refused(address: str) -> bool:
    """True once a connect to `address` is refused (or the unix path is gone): never accepted."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    sock.settimeout(0.5)
    try:
        sock.connect(target)  # type: ignore[arg-type]
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        sock.close()
    return False


def queued(server, at_least: int) -> bool:
    status = server.status()
    now = status["metrics"]["listen_queue"]["now"]
    return now is not None and now >= at_least


def run_clients(count: int, one) -> tuple[list[threading.Thread], list[object]]:  # type: ignore[no-untyped-def]
    results: list[object] = [None] * count

    def client(i: int) -> None:
        try:
            results[i] = one(i)
        except Exception as exc:  # noqa: BLE001 - a failed request is a result here
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads, results


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_term_serves_every_queued_connection_then_refuses(serve, transport: str) -> None:
    server = serve(listen=None if transport == "unix" else "127.0.0.1:0", nproc=2)

    def one(i: int) -> int:
        return request(server.address, f"/slow?s={SLOW}", timeout=30).status

    threads, results = run_clients(CLIENTS, one)
    wait_for(lambda: queued(server, 4), 10, what="connections waiting in the listen queue")
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert results == [200] * CLIENTS, results
    assert server.proc.wait(30) == 0
    assert connect_refused(server.address)
    log = server.log()
    assert "not accepting new connections; serving those queued" in log
    if transport == "unix":
        assert not Path(server.address).exists()


def test_late_connects_are_refused_while_the_queue_is_served(serve) -> None:
    """Between StopAccepting and the exit, a new connect never gets in (unix: the path is gone
    at once), while the queued requests are all answered."""
    server = serve(nproc=2)
    threads, results = run_clients(
        6, lambda i: request(server.address, f"/slow?s={SLOW}", timeout=30).status
    )
    wait_for(lambda: queued(server, 2), 10, what="connections waiting in the listen queue")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not Path(server.address).exists(), 5, what="the socket path unlinked")
    assert connect_refused(server.address)
    assert server.proc.poll() is None  # still serving what was queued
    for t in threads:
        t.join(30)
    assert results == [200] * 6, results
    assert server.proc.wait(30) == 0


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_saturated_backlog_at_term_through_nginx_no_reset(
    serve, nginx, transport: str, keep_conn: bool
) -> None:
    server = serve(listen=None if transport == "unix" else "127.0.0.1:0", nproc=2)
    front = nginx(server.address, keep_conn=keep_conn)

    def post(i: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        try:
            body = f"request {i}".encode() * 100
            conn.request("POST", f"/slow?s={SLOW}", body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    threads, results = run_clients(CLIENTS, post)
    wait_for(lambda: queued(server, 4), 10, what="nginx's requests waiting in the listen queue")
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert results == [(200, b"slept\n")] * CLIENTS, results
    assert server.proc.wait(30) == 0
    # Now nginx meets a refused connect (which it would retry on another upstream), not a reset.
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    conn.request("POST", "/slow?s=0", body=b"late")
    assert conn.getresponse().status == 502
    conn.close()
    errors = front.error_log()
    assert "reset by peer" not in errors and "prematurely closed" not in errors, errors
    assert "Connection refused" in errors or "No such file" in errors, errors


def test_drain_delay_serves_on_not_ready_then_closes(serve, tmp: Path) -> None:
    status_sock = str(tmp / "status.sock")
    server = serve(
        APP, "--drain-delay", "2", "--status-listen", status_sock, listen="127.0.0.1:0", nproc=2
    )
    from tests.integration.test_readiness import http_get

    assert http_get(status_sock, "/readyz")[0] == 200
    termed = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http_get(status_sock, "/readyz")[0] == 503, 5, what="/readyz to say 503")
    status, body = http_get(status_sock, "/readyz")
    assert body.startswith(b"not ready: stopping")
    # Requests keep being served all through the delay.
    served = 0
    while time.monotonic() - termed < 1.5:
        assert request(server.address, "/hello", timeout=5).status == 200
        served += 1
    assert served > 0
    wait_for(lambda: connect_refused(server.address), 10, what="the listener to close")
    assert time.monotonic() - termed >= 2.0
    assert server.proc.wait(30) == 0
    log = server.log()
    assert "drain_delay over: stops accepting" in log
