"""The status page, answered by the master itself: through a real nginx (JSON and OpenMetrics,
with keep-alive connections going back to the workers), while every worker is busy and
connections wait in the listen queue, and the counters that move: requests by class, worker
restarts by cause (crash, memory), rollouts."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from fcgi_engine.client import request
from fcgi_engine.config.address import TcpAddress, parse_address
from tests.conftest import APPS, wait_for

pytestmark = pytest.mark.integration

STATUS = "/fcgi-status"
APP = f"{APPS}/testapp.py"


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        conn.close()


def parse_host_port(address: str) -> tuple[str, int]:
    parsed = parse_address(address)
    assert isinstance(parsed, TcpAddress)
    return parsed.host, parsed.port


def page(address: str, timeout: float = 10.0) -> dict[str, Any]:
    response = request(address, STATUS, timeout=timeout)
    assert response.status == 200, response
    return json.loads(response.body)


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_status_page_through_nginx(serve, nginx, keep_conn) -> None:
    server = serve(APP, f"--status-path={STATUS}", listen="127.0.0.1:0")
    front = nginx(server.address, keep_conn=keep_conn)
    for _ in range(3):
        assert get(front.port, "/hello")[0] == 200
    assert get(front.port, "/error")[0] == 500
    assert get(front.port, "/nowhere")[0] == 404

    def counted() -> dict[str, Any] | None:
        status, ctype, body = get(front.port, STATUS)
        assert status == 200 and ctype == "application/json"
        snap = json.loads(body)
        requests = snap["metrics"]["requests"]
        return snap if requests["2xx"] >= 3 and requests["4xx"] >= 1 and requests["5xx"] else None

    snap = wait_for(counted, 10, what="the counts to reach the status page")
    assert snap["pid"] == server.pid and snap["generation"] == 1
    assert {w["state"] for w in snap["workers"]} <= {"idle", "busy"}
    assert all(w["started_at"] > 1e9 for w in snap["workers"])
    assert snap["metrics"]["duration"]["count"] >= 5
    # OpenMetrics, by query string and by Accept header; Prometheus' parser reads it.
    for path, headers in [
        (STATUS + "?openmetrics", {}),
        (STATUS, {"Accept": "application/openmetrics-text; version=1.0.0"}),
    ]:
        status, ctype, body = get(front.port, path, headers)
        assert status == 200 and ctype.startswith("application/openmetrics-text")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        by_class = {
            s.labels["class"]: s.value
            for s in families["fcgi_engine_requests"].samples
            if s.name == "fcgi_engine_requests_total"
        }
        assert by_class["2xx"] >= 3 and by_class["5xx"] >= 1
    # The app still answers on the same (kept-alive) connections.
    for _ in range(5):
        assert get(front.port, "/hello")[0] == 200
    assert "upstream" not in front.error_log()


def test_answers_while_every_worker_is_busy_and_connections_wait(serve) -> None:
    server = serve(APP, f"--status-path={STATUS}", listen="127.0.0.1:0", nproc=1)
    results: list[int] = []
    lock = threading.Lock()

    def call(path: str) -> None:
        status = request(server.address, path, timeout=30).status
        with lock:
            results.append(status)

    slow = threading.Thread(target=call, args=("/slow?s=4",))
    slow.start()
    wait_for(lambda: server.status()["workers"][0]["state"] == "busy", 10, what="a busy worker")
    queued = [threading.Thread(target=call, args=("/hello",)) for _ in range(5)]
    for thread in queued:
        thread.start()
    try:
        snap = page(server.address, timeout=3.0)
        [worker] = snap["workers"]
        assert worker["state"] == "busy"
        assert worker["request"]["uri"].startswith("/slow") and worker["request"]["method"] == "GET"
        assert worker["request"]["running_for"] < 4.0
        queue = snap["metrics"]["listen_queue"]
        assert queue["max"] >= 1 and queue["limit"] >= 1
    finally:
        for thread in [slow, *queued]:
            thread.join(30)
    # Every request the master read and handed on was served.
    assert sorted(results) == [200] * 6


@pytest.mark.parametrize("reexec", [False, True], ids=["steady", "usr2"])
def test_no_request_is_lost_while_the_master_looks_for_status_requests(serve, reexec) -> None:
    """Found by trying it as an attacker would: with every worker busy, the master takes
    connections from the queue to find status requests. POSTs with bodies, and peers that
    trickle a status request byte by byte, must neither be lost nor lock the status page out,
    and a USR2 re-exec must carry the connections the master holds over."""
    server = serve(APP, f"--status-path={STATUS}", listen="127.0.0.1:0", nproc=1)
    body = os.urandom(100_000)
    digest = hashlib.sha256(body).hexdigest()
    results: list[tuple[str, int, bytes]] = []
    lock = threading.Lock()

    def call(path: str, method: str = "GET", data: bytes = b"") -> None:
        try:
            r = request(server.address, path, method=method, body=data, timeout=40)
            outcome = (path, r.status, r.body)
        except OSError as exc:
            outcome = (path, 0, repr(exc).encode())
        with lock:
            results.append(outcome)

    slow = threading.Thread(target=call, args=("/slow?s=5",))
    slow.start()
    wait_for(lambda: server.status()["workers"][0]["state"] == "busy", 10, what="a busy worker")
    # Peers that send a status request's first bytes and then nothing: the master hands them
    # to the workers after a glance instead of holding a slot for each.
    tricklers = []
    for _ in range(70):
        sock = socket.create_connection(parse_host_port(server.address), timeout=5)
        sock.sendall(b"\x01\x01\x00\x01\x00\x08\x00\x00")  # half a BEGIN_REQUEST
        tricklers.append(sock)
    posts = [threading.Thread(target=call, args=("/echo", "POST", body)) for _ in range(10)]
    for thread in posts:
        thread.start()
    try:
        wait_for(
            lambda: page(server.address, timeout=3.0)["metrics"]["listen_queue"]["max"] >= 5,
            10,
            what="the queue seen by the status page",
        )
        if reexec:
            os.kill(server.pid, signal.SIGUSR2)
        # The status page answers promptly while everything waits, across the re-exec.
        wait_for(lambda: page(server.address, timeout=3.0)["workers"], 10, what="the page")
    finally:
        for thread in [slow, *posts]:
            thread.join(60)
        for sock in tricklers:
            sock.close()
    echoed = [json.loads(b)["sha256"] for path, status, b in results if path == "/echo"]
    assert sorted(status for _path, status, _b in results) == [200] * 11, results
    assert echoed == [digest] * 10


def test_a_stop_serves_the_connections_the_master_took_from_the_queue(serve) -> None:
    """TERM while the master holds, or has handed on, connections it took from a saturated
    queue: they are part of the queue a stop serves, none is closed unanswered."""
    server = serve(APP, f"--status-path={STATUS}", listen="127.0.0.1:0", nproc=1)
    results: list[int] = []
    lock = threading.Lock()

    def call(path: str) -> None:
        try:
            status = request(server.address, path, timeout=40).status
        except OSError:
            status = 0
        with lock:
            results.append(status)

    slow = threading.Thread(target=call, args=("/slow?s=3",))
    slow.start()
    wait_for(lambda: server.status()["workers"][0]["state"] == "busy", 10, what="a busy worker")
    queued = [threading.Thread(target=call, args=("/hello",)) for _ in range(8)]
    for thread in queued:
        thread.start()
    wait_for(
        lambda: page(server.address, timeout=3.0)["metrics"]["listen_queue"]["max"] >= 4,
        10,
        what="the master taking connections from the queue",
    )
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    for thread in [slow, *queued]:
        thread.join(40)
    assert sorted(results) == [200] * 9, results


def test_the_listen_queue_is_measured_on_a_unix_socket(serve) -> None:
    server = serve(nproc=1)  # no status_path: the master never takes connections itself

    def call(path: str) -> None:
        request(server.address, path, timeout=30)

    slow = threading.Thread(target=call, args=("/slow?s=3",))
    slow.start()
    wait_for(lambda: server.status()["workers"][0]["state"] == "busy", 10, what="a busy worker")
    queued = [threading.Thread(target=call, args=("/hello",)) for _ in range(3)]
    for thread in queued:
        thread.start()
    try:
        queue = wait_for(
            lambda: (q := server.status()["metrics"]["listen_queue"])["now"] == 3 and q,
            5,
            what="three connections in the queue",
        )
        assert queue["max"] >= 3  # type: ignore[index]
    finally:
        for thread in [slow, *queued]:
            thread.join(30)
    wait_for(
        lambda: server.status()["metrics"]["listen_queue"]["now"] == 0, 5, what="an empty queue"
    )


def test_restarts_by_cause_crash_and_memory(serve) -> None:
    # Every worker is past 1 MiB of RSS: each is recycled within a second of its start.
    server = serve(
        APP, f"--status-path={STATUS}", "--max-memory", str(1 << 20), listen="127.0.0.1:0"
    )
    wait_for(
        lambda: page(server.address)["metrics"]["restarts"]["memory"] >= 2,
        15,
        what="workers recycled for memory",
    )
    assert request(server.address, "/hello").status == 200
    crashed = server.status()["workers"][0]["pid"]
    os.kill(crashed, signal.SIGKILL)
    wait_for(
        lambda: page(server.address)["metrics"]["restarts"]["crash"] >= 1,
        10,
        what="the crash to be counted",
    )
    assert "max_memory" in server.log()


def test_counters_survive_a_rollout_which_is_counted(serve) -> None:
    server = serve(APP, f"--status-path={STATUS}", listen="127.0.0.1:0")
    for _ in range(4):
        assert request(server.address, "/hello").status == 200
    wait_for(lambda: page(server.address)["metrics"]["requests"]["2xx"] >= 4, 10, what="counts")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(
        lambda: (s := page(server.address))["generation"] == 2 and len(s["generations"]) == 1,
        30,
        what="generation 2 alone",
    )
    metrics = page(server.address)["metrics"]
    assert metrics["requests"]["2xx"] >= 4
    assert metrics["rollouts"] == {"rolled_out": 1, "rolled_back": 0}


def test_without_status_path_the_path_reaches_the_app(serve) -> None:
    server = serve()
    response = request(server.address, STATUS)
    assert response.status == 404 and response.body == b"not found\n"
