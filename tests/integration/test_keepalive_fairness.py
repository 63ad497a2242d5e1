"""No request waits behind a busy worker while another could serve it (issue 11 item 6).

Real `fcgi-engine serve` processes, nproc 2, kept-alive FastCGI connections made directly
(as nginx's upstream keepalive pool holds them). A worker inside a long request cannot read
its other connections; a request sent on one of them meanwhile is given to the other worker
(through the hand-off socket), and a status request on one is passed to the master, which
answers it even when every worker is busy. The long request ends only when the test opens its
gate, so "answered before the long one ends" needs no clock.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fcgi_engine.client import Exchange, build_params, connect, encode_request, request
from tests.conftest import wait_for, worker_pids

pytestmark = pytest.mark.integration

TIMEOUT = 20.0

APP = """
import os, time

def application(environ, start_response):
    if environ["PATH_INFO"] == "/hold":
        # Wait for the gate file named by the query string (60 s at most).
        gate = environ["QUERY_STRING"]
        open(gate + ".started", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


def two_on_one_worker(address: str) -> tuple[int, list[socket.socket]]:
    """Kept-alive connections until one worker (pid) answered two of them: that pid and the
    two. (An idle worker pool tends to give every new connection to the same worker.)"""
    by_pid: dict[int, list[socket.socket]] = {}
    for _ in range(16):
        sock = connect(address, TIMEOUT)
        answer = request(sock, "/pid", keep_conn=True)
        assert answer.status == 200
        pid = int(answer.body)
        by_pid.setdefault(pid, []).append(sock)
        if len(by_pid[pid]) == 2:
            for other_pid, others in by_pid.items():
                if other_pid != pid:
                    for other in others:
                        other.close()
            return pid, by_pid[pid]
    raise AssertionError("16 connections and no worker answered two")


def hold(sock: socket.socket, gate: Path) -> None:
    """Send a request that runs until `gate` exists; wait until it runs."""
    sock.sendall(encode_request(2, build_params(path="/hold", query=str(gate)), keep_conn=True))
    wait_for(lambda: Path(f"{gate}.started").exists(), TIMEOUT, what="the long request to run")


def test_a_request_behind_a_busy_worker_is_answered_by_the_idle_one(serve, tmp: Path) -> None:
    app = tmp / "fair.py"
    app.write_text(APP)
    server = serve(str(app), nproc=2)
    busy_pid, socks = two_on_one_worker(server.address)
    gate = tmp / "gate"
    try:
        hold(socks[0], gate)
        # Sent on a connection the busy worker holds: the other worker answers it, and the
        # connection stays alive there for the next request.
        for request_id in (2, 3):
            behind = request(socks[1], "/pid", keep_conn=True, request_id=request_id)
            assert behind.status == 200
            assert int(behind.body) != busy_pid
            assert int(behind.body) in worker_pids(server.pid)
        assert not gate.exists()
        gate.touch()
        held = Exchange(socks[0], 2).read_response()
        assert (held.status, int(held.body)) == (200, busy_pid)
    finally:
        gate.touch()
        for sock in socks:
            sock.close()


def test_a_status_request_on_a_busy_workers_connection_answers_while_all_are_busy(
    serve, tmp: Path
) -> None:
    """The README's separate status upstream is no longer needed: with every worker inside
    a long request, a status request on a kept-alive connection is answered by the master."""
    app = tmp / "fair.py"
    app.write_text(APP)
    server = serve(str(app), "--status-path", "/fcgi-status", nproc=2)
    first_pid, socks = two_on_one_worker(server.address)
    gates = [tmp / "gate0", tmp / "gate1"]
    try:
        hold(socks[0], gates[0])
        # The first worker is in the app: the other one accepts the next connection.
        socks.append(connect(server.address, TIMEOUT))
        second = request(socks[2], "/pid", keep_conn=True)
        second_pid = int(second.body)
        assert second_pid != first_pid
        hold(socks[2], gates[1])
        status = request(socks[1], "/fcgi-status", keep_conn=True, request_id=2)
        assert status.status == 200
        assert len(json.loads(status.body)["workers"]) == 2
        # Both long requests were running all along (each worker's scoreboard state is
        # sampled by the master, so the page itself may lag: the gates are the proof).
        assert not any(gate.exists() for gate in gates)
        for gate, sock, pid in zip(
            gates, (socks[0], socks[2]), (first_pid, second_pid), strict=True
        ):
            gate.touch()
            held = Exchange(sock, 2).read_response()
            assert (held.status, int(held.body)) == (200, pid)
    finally:
        for gate in gates:
            gate.touch()
        for sock in socks:
            sock.close()
