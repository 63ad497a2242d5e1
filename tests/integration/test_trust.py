"""Tried as an attacker or an unlucky operator would: unproven code never serves, slow peers never
stall the pool, running out of descriptors or being killed from outside never empties it."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from fcgi_engine import control
from fcgi_engine.client import ClientError, build_params, connect, encode_request, request
from fcgi_engine.protocol.codec import encode_name_values, encode_record
from fcgi_engine.protocol.constants import BEGIN_REQUEST_BODY, RecordType, Role
from tests.conftest import APPS, Server, wait_for, worker_pids
from tests.integration.test_rollout import make_release, switch

pytestmark = pytest.mark.integration

TESTAPP = f"{APPS}/testapp.py"


def ctl(server: Server, cmd: str, timeout: float = 60.0) -> dict:
    return control.call(server.pidfile + ".ctl", {"cmd": cmd}, timeout=timeout)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def begin(request_id: int = 1) -> bytes:
    return encode_record(
        RecordType.BEGIN_REQUEST, request_id, BEGIN_REQUEST_BODY.pack(Role.RESPONDER, 0)
    )


# ---------------------------------------------------------------- 1. unproven code never serves


def test_a_slow_then_failing_health_check_serves_no_request(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve("app.py", "--chdir", str(root / "current"), "--health", "/healthz", nproc=2)
    # v2 imports fine and would answer live requests, but its health check takes 1.5 s and
    # then fails: not one live request may reach it.
    slow_fail = (
        "_app = application\n"
        "def application(environ, start_response):\n"
        "    if environ['PATH_INFO'] == '/healthz':\n"
        "        time.sleep(1.5)\n"
        "        start_response('500 Internal Server Error', [('Content-Type', 'text/plain')])\n"
        "        return [b'not ready']\n"
        "    return _app(environ, start_response)\n"
    )
    release = make_release(root, "v2", import_sleep=0)
    with open(release / "app.py", "a") as f:
        f.write(slow_fail)
    switch(root, release)
    versions: dict[str, int] = {}
    stop = threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                body = request(server.address, "/", timeout=10).body
            except ClientError:
                continue
            version = body.split(b" ", 1)[0].decode()
            versions[version] = versions.get(version, 0) + 1

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: versions.get("v1", 0) > 20, 10, what="load to start")
        reply = ctl(server, "graceful")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert reply["ok"] is False and reply["rolled_back"] is True, reply
    assert "500" in reply["error"]
    assert versions.get("v1", 0) > 50
    assert "v2" not in versions, versions


# ---------------------------------------------------------------- 3. slow peers


def trickle(
    address: str, data: bytes, stop: threading.Event, every: float = 0.2, prefix: bytes = b""
) -> dict:
    """Send `prefix` at once, then `data` a byte at a time; report when the server closed on us
    and what it said."""
    outcome: dict = {"closed_after": None, "answer": b""}
    sock = connect(address, timeout=1)
    sock.sendall(prefix)
    started = time.monotonic()
    try:
        for byte in data:
            if stop.is_set() or time.monotonic() - started > 20:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            try:
                sock.settimeout(every)
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            outcome["answer"] += chunk
        outcome["closed_after"] = time.monotonic() - started
    finally:
        sock.close()
    return outcome


def test_two_peers_trickling_params_do_not_stall_the_pool(serve) -> None:
    server = serve(TESTAPP, "--params-timeout", "2", nproc=2)
    params = encode_name_values(
        (k.encode(), v.encode()) for k, v in build_params("GET", "/hello").items()
    )
    slow = begin() + encode_record(RecordType.PARAMS, 1, params)
    stop = threading.Event()
    outcomes: list[dict] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(trickle(server.address, slow, stop)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # let both trickles begin their requests: that is the attack
        for _ in range(20):
            started = time.monotonic()
            assert request(server.address, "/hello", timeout=5).status == 200
            assert time.monotonic() - started < 1.0
        wait_for(lambda: len(outcomes) == 2, 10, what="the trickling peers to be cut off")
    finally:
        stop.set()
        for t in threads:
            t.join(25)
    for outcome in outcomes:
        assert outcome["closed_after"] is not None and outcome["closed_after"] < 5, outcomes
    wait_for(
        lambda: server.log().count("did not arrive within params_timeout (2 s)") >= 2,
        5,
        what="the warnings",
    )
    assert "unix peer pid" in server.log()


def test_a_trickled_body_is_answered_408_after_body_timeout(serve) -> None:
    server = serve(TESTAPP, "--body-timeout", "1.5", "--body-min-rate", "0", nproc=1)
    whole = encode_request(1, build_params("POST", "/echo", body_length=500), b"x" * 500)
    split = len(whole) - 500 - 8 - 8 - 8  # the params at once; the body a byte at a time
    stop = threading.Event()
    outcomes: list[dict] = []
    t = threading.Thread(
        target=lambda: outcomes.append(
            trickle(server.address, whole[split:], stop, every=0.1, prefix=whole[:split])
        )
    )
    t.start()
    try:
        # One worker, held by nobody: it keeps serving while the body trickles.
        for _ in range(10):
            assert request(server.address, "/hello", timeout=3).status == 200
        wait_for(lambda: outcomes, 10, what="the trickling body to be cut off")
    finally:
        stop.set()
        t.join(25)
    assert b"408" in outcomes[0]["answer"], outcomes
    assert "body did not arrive within body_timeout" in server.log()


def test_two_slow_posts_through_nginx_without_request_buffering(serve, nginx) -> None:
    server = serve(TESTAPP, "--body-timeout", "30", nproc=1)
    front = nginx(server.address, keep_conn=True, buffering=False)
    slow: list[socket.socket] = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", front.port), timeout=5)
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
            slow.append(s)
        time.sleep(0.5)  # nginx has passed both requests on, bodies unfinished
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=5)
        for _ in range(10):
            started = time.monotonic()
            conn.request("GET", "/hello")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b"hello world\n"
            assert time.monotonic() - started < 1.0
        conn.close()
        # The slow ones finish their bodies and are answered in full.
        for s in slow:
            s.sendall(b"y" * (100000 - 3))
        for s in slow:
            s.settimeout(10)
            data = b""
            while b'"length": 100000' not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert b'"length": 100000' in data, data[-300:]
    finally:
        for s in slow:
            s.close()


# ---------------------------------------------------------------- 4. out of descriptors


def test_a_worker_out_of_descriptors_backs_off_and_recovers(serve) -> None:
    server = serve(TESTAPP, "--params-timeout", "60", nproc=1, wrap=["prlimit", "--nofile=64:64"])
    [worker] = worker_pids(server.pid)
    held: list[socket.socket] = []
    try:
        for _ in range(90):
            held.append(connect(server.address, timeout=2))
        wait_for(lambda: "accept failed" in server.log(), 10, what="EMFILE in the worker")
        cpu_before = cpu_seconds(worker)
        lines_before = server.log().count("accept failed")
        time.sleep(2.0)  # measuring a rate: what the worker does in 2 s
        assert cpu_seconds(worker) - cpu_before < 0.5
        assert server.log().count("accept failed") - lines_before <= 1
    finally:
        for s in held:
            s.close()
    wait_for(
        lambda: request(server.address, "/hello", timeout=2).status == 200, 10, what="recovery"
    )
    assert worker_pids(server.pid) == [worker]


# ---------------------------------------------------------------- 5. killed from outside


def test_workers_killed_every_quarter_second_never_empty_the_pool(serve) -> None:
    server = serve(TESTAPP, nproc=2)
    kills = 0
    gaps: list[float] = []
    failures = 0
    last_ok = time.monotonic()
    deadline = time.monotonic() + 6
    next_kill = time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_kill:
            pids = worker_pids(server.pid)
            if pids:
                try:
                    os.kill(pids[kills % len(pids)], signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            next_kill = now + 0.25
        try:
            ok = request(server.address, "/hello", timeout=5).status == 200
        except ClientError:
            ok = False
        if ok:
            gaps.append(time.monotonic() - last_ok)
            last_ok = time.monotonic()
        else:
            failures += 1
    assert kills >= 15
    # Only a request in flight on the killed worker may fail.
    assert failures <= kills
    assert max(gaps) < 1.0, max(gaps)
    assert "respawning in" not in server.log()
    wait_for(lambda: len(worker_pids(server.pid)) == 2, 5, what="two workers")


# ---------------------------------------------------------------- 6. a stopped worker


def test_a_worker_stopped_while_idle_is_replaced(serve) -> None:
    server = serve(TESTAPP, "--heartbeat-timeout", "2", nproc=2)
    victim = worker_pids(server.pid)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: victim not in worker_pids(server.pid), 10, what="the stopped worker gone")
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_for(lambda: len(worker_pids(server.pid)) == 2, 5, what="its replacement")
    assert f"worker {victim} made no progress" in server.log()
    for _ in range(10):
        assert request(server.address, "/hello", timeout=3).status == 200


# ---------------------------------------------------------------- 7. memory under fuzzing


def test_malformed_connections_leave_the_worker_rss_flat(serve) -> None:
    server = serve(TESTAPP, nproc=1)
    [worker] = worker_pids(server.pid)
    # Bytes a broken peer could send: a bad version after a good record, with a big buffer.
    bad = begin() + b"\x07" + b"\x00" * 7 + b"z" * 60000

    def hit(n: int) -> None:
        for _ in range(n):
            s = connect(server.address, timeout=5)
            try:
                s.sendall(bad)
                s.recv(100)
            except OSError:
                pass
            finally:
                s.close()

    hit(300)  # warm up: allocator arenas, caches
    before = rss_kb(worker)
    hit(3000)
    after = rss_kb(worker)
    assert request(server.address, "/hello").status == 200
    assert after - before < 4000, (before, after)


# ---------------------------------------------------------------- 8. TCP allow-list


def test_a_tcp_listener_takes_loopback_only_by_default_and_cidr_ranges(serve) -> None:
    server = serve(TESTAPP, listen="127.0.0.1:0", nproc=1)
    assert request(server.address, "/hello").status == 200
    # An allow-list that names other networks refuses this host, and says so once.
    fenced = serve(
        TESTAPP, "--allowed-addrs", "10.0.0.0/8,192.168.1.0/24", listen="127.0.0.1:0", nproc=1
    )
    for _ in range(5):
        with pytest.raises(ClientError):
            request(fenced.address, "/hello", timeout=3)
    wait_for(lambda: "refused a connection from 127.0.0.1" in fenced.log(), 5, what="refusal")
    assert fenced.log().count("refused a connection from 127.0.0.1") == 1


# ---------------------------------------------------------------- 10. failures say why


def test_an_unwritable_access_log_fails_the_rollout_with_its_real_cause(serve, tmp: Path) -> None:
    logs = tmp / "logs"
    logs.mkdir()
    access = logs / "access.log"
    server = serve(TESTAPP, "--access-log", str(access), nproc=1)
    access.unlink()
    os.chmod(logs, 0o555)
    try:
        if os.geteuid() == 0:
            # root writes anywhere: a directory in the way of the file does the same.
            os.chmod(logs, 0o755)
            access.mkdir()
        reply = ctl(server, "graceful")
    finally:
        os.chmod(logs, 0o755)
    assert reply["ok"] is False, reply
    assert "cannot open access_log" in reply["error"]
    assert "connection reset" not in reply["error"].lower()
    assert request(server.address, "/hello").status == 200
