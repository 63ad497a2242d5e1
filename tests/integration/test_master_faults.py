"""The master under faults: out of fds, flooded or trickled control connections, a log file it
cannot reopen, HUPs while a generation boots. It keeps its pid, its socket and its service."""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fcgi_engine import control
from fcgi_engine.client import request
from fcgi_engine.master.loop import CONTROL_REQUEST_TIMEOUT, MAX_CONTROL_CONNS, MAX_CONTROL_LINE
from tests.conftest import APPS, Server, wait_for

pytestmark = pytest.mark.integration


def status(server: Server, timeout: float = 5.0) -> dict[str, Any]:
    reply = control.ask(server.pidfile + ".ctl", control.StatusRequest(), timeout=timeout)
    assert isinstance(reply, control.StatusResponse) and reply.pid == server.pid, reply
    return reply.status


def raw_exchange(server: Server, data: bytes) -> bytes:
    """Send `data` on a fresh control connection; all the master sends back before it closes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(server.pidfile + ".ctl")
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def fds_of(pid: int) -> list[int]:
    return [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")]


@contextmanager
def control_clients(server: Server, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections to the master's control socket that send nothing until closed."""
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(sock)
            sock.settimeout(5)
            sock.connect(server.pidfile + ".ctl")
        yield clients
    finally:
        for sock in clients:
            sock.close()


def test_master_survives_running_out_of_fds(serve) -> None:
    server = serve(f"{APPS}/testapp.py", nproc=1)
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    fds = fds_of(server.pid)
    # New fds are numbered below the limit: leave the master three free ones.
    spare = 3
    limit = max(fds) + 1 + spare
    free = limit - len([fd for fd in fds if fd < limit])
    assert free < 20
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with control_clients(server, free + 10):
            wait_for(
                lambda: "cannot accept control connections" in server.log(),
                10,
                what="the master to run out of fds",
            )
            # Not one fd left: a rollout cannot even make its channel. It fails like a broken
            # release (rolled back), not like a broken master.
            os.kill(server.pid, signal.SIGHUP)
            wait_for(
                lambda: "cannot start generation 2" in server.log(),
                10,
                what="the rollout to fail",
            )
            assert request(server.address, "/hello").status == 200
        # The connections closed, the master takes control requests again, at the same limit.
        wait_for(lambda: status(server, timeout=2), 15, what="status after the fd shortage")
        assert status(server)["last_rollout"]["ok"] is False
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
    # And once fds are plentiful, it rolls out as before.
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: status(server)["generation"] == 3, 20, what="generation 3")
    assert request(server.address, "/hello").status == 200
    assert server.proc.poll() is None
    assert os.path.exists(server.address) and os.path.exists(server.pidfile + ".ctl")
    # Each accept failure backs off instead of spinning, and the log says so once per interval.
    assert server.log().count("cannot accept control connections") <= 2


def test_idle_and_trickling_control_connections_cannot_hold_the_master(serve) -> None:
    server = serve(f"{APPS}/testapp.py", nproc=1)
    baseline = len(fds_of(server.pid))
    with control_clients(server, 100), control_clients(server, 1) as [trickler]:
        trickle_started = time.monotonic()
        asked = time.monotonic()
        assert status(server, timeout=2)["generation"] == 1
        assert time.monotonic() - asked < 2
        # The flood is held to the cap: the oldest silent connections made room.
        assert len(fds_of(server.pid)) <= baseline + MAX_CONTROL_CONNS
        trickler.setblocking(False)

        def trickler_closed() -> bool:
            # One byte per poll (every 0.5 s): data must not push its deadline back.
            try:
                trickler.send(b" ")
                return trickler.recv(1) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        wait_for(
            trickler_closed,
            CONTROL_REQUEST_TIMEOUT + 5,
            interval=0.5,
            what="the trickling control connection to be closed",
        )
        held = time.monotonic() - trickle_started
        assert CONTROL_REQUEST_TIMEOUT - 1 <= held <= CONTROL_REQUEST_TIMEOUT + 3
    assert "no complete request within" in server.log()
    assert status(server)["generation"] == 1


def test_bad_control_requests_are_answered_with_an_error_and_the_master_carries_on(
    serve,
) -> None:
    server = serve(f"{APPS}/testapp.py", nproc=1)
    for line, says in [
        (b"garbage\n", "bad control message: not a JSON line"),
        (b"[1]\n", "bad control message: a message is a JSON object"),
        (b'{"cmd": "explode"}\n', "unknown command 'explode'"),
    ]:
        reply = control.decode_response(raw_exchange(server, line))
        assert isinstance(reply, control.ErrorResponse) and says in reply.error, reply
        assert reply.pid == server.pid
    # A line over the limit is not read to its end: the connection is closed unanswered.
    assert raw_exchange(server, b"x" * (MAX_CONTROL_LINE + 10)) == b""
    assert "request line over" in server.log()
    assert status(server)["generation"] == 1


def test_unwritable_error_log_on_usr1_keeps_the_master(serve, tmp: Path) -> None:
    err = tmp / "error.log"
    server = serve(f"{APPS}/testapp.py", "--error-log", str(err), nproc=1)
    rotated = tmp / "error.log.1"
    os.rename(err, rotated)
    err.mkdir()  # opening it for writing fails (EISDIR), even as root
    os.kill(server.pid, signal.SIGUSR1)
    wait_for(lambda: "cannot reopen" in rotated.read_text(), 10, what="the reopen error")
    assert status(server)["generation"] == 1
    assert request(server.address, "/hello").status == 200
    # Once the path is usable again, the next USR1 reopens it.
    err.rmdir()
    os.kill(server.pid, signal.SIGUSR1)
    wait_for(lambda: err.exists() and "reopened" in err.read_text(), 10, what="the reopen")
    assert server.proc.poll() is None


SLOW_APP = """
import os, time

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "version")) as f:
    VERSION = f.read().strip()
with open(os.path.join(HERE, "imported"), "a") as f:
    f.write(VERSION + "\\n")
# The boot lasts until the test lets it go, so its signals land inside it for sure.
while not os.path.exists(os.path.join(HERE, "go")):
    time.sleep(0.05)


def application(environ, start_response):
    body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_hups_during_the_first_boot_roll_out_once_after_it(serve, tmp: Path) -> None:
    site = tmp / "site"
    site.mkdir()
    (site / "app.py").write_text(SLOW_APP)
    (site / "version").write_text("v1")
    imported = site / "imported"
    server = serve(str(site / "app.py"), nproc=1, wait=False)
    # Answering status means the master's signal handlers are in place: HUP will not kill it.
    wait_for(lambda: status(server, timeout=2)["booting"] == 1, 20, what="the first boot")
    wait_for(lambda: imported.exists() and imported.read_text() == "v1\n", 20, what="v1 import")
    (site / "version").write_text("v2")  # the deploy, then its signals
    os.kill(server.pid, signal.SIGHUP)
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: status(server)["rollout_queued"], 5, what="the rollout to be queued")
    assert status(server)["booting"] == 1
    (site / "go").touch()
    wait_for(
        lambda: [g["id"] for g in status(server)["generations"]] == [2],
        20,
        what="generation 2 alone",
    )
    final = status(server)
    assert final["generation"] == 2 and final["booting"] is None
    assert final["rollout_queued"] is False
    assert request(server.address, "/").body == b"v2"
    # Two HUPs, one extra rollout: the app was imported twice in all.
    assert imported.read_text() == "v1\nv2\n"
    assert "rollout queued" in server.log()
