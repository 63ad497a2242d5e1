"""The master's HTTP listener for orchestrators (status_listen, issue 12): /readyz, /livez and
/status, answered without app code; "ready" in the status snapshot."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from fcgi_engine.client import request
from tests.conftest import APPS, wait_for
from tests.integration.test_rollout import make_release, switch

pytestmark = pytest.mark.integration

APP = f"{APPS}/testapp.py"


def http_get(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One HTTP/1.1 request to a unix path or HOST:PORT: (status, body). Checks Content-Length."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(address)
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
    with sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    expected = 0 if method == "HEAD" else len(body)
    assert method == "HEAD" or int(headers["content-length"]) == expected, data
    return status, body


def test_livez_status_and_readyz_on_tcp(serve) -> None:
    server = serve(APP, "--status-listen", "127.0.0.1:0", listen="127.0.0.1:0")
    status = server.status()
    where = status["status_listen"]
    assert status["ready"] is True and status["not_ready_reason"] is None
    assert http_get(where, "/livez") == (200, b"ok\n")
    assert http_get(where, "/readyz") == (200, b"ready\n")
    code, body = http_get(where, "/status")
    snapshot = json.loads(body)
    assert code == 200 and snapshot["ready"] is True and snapshot["pid"] == server.pid
    assert snapshot["generation"] == status["generation"]
    assert http_get(where, "/nope")[0] == 404
    assert http_get(where, "/readyz", method="HEAD") == (200, b"")
    assert http_get(where, "/readyz", method="POST")[0] == 405
    # The app never saw any of it.
    assert request(server.address, "/hello").status == 200


def test_a_silent_or_garbage_client_does_not_hold_the_master(serve, tmp: Path) -> None:
    where = str(tmp / "status.sock")
    server = serve(APP, "--status-listen", where)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(5)]
    for sock in idle:
        sock.connect(where)
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.connect(where)
    garbage.sendall(b"x" * 10000)
    assert http_get(where, "/livez") == (200, b"ok\n")
    assert server.status()["ready"] is True
    for sock in [*idle, garbage]:
        sock.close()


def test_readyz_503_while_the_first_generation_boots_then_200(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    release = make_release(root, "v1", import_sleep=1.5)
    switch(root, release)
    where = str(tmp / "status.sock")
    server = serve(str(root / "current" / "app.py"), "--status-listen", where, wait=False)
    wait_for(lambda: Path(where).exists(), 10, what="the status listener")
    code, body = http_get(where, "/readyz")
    assert code == 503 and body == b"not ready: generation 1 is booting\n"
    assert http_get(where, "/livez")[0] == 200
    wait_for(lambda: http_get(where, "/readyz")[0] == 200, 20, what="/readyz 200")
    assert server.status()["ready"] is True


def test_readyz_200_throughout_a_graceful_rollout_and_503_after_term(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1"))
    where = str(tmp / "status.sock")
    server = serve(str(root / "current" / "app.py"), "--status-listen", where)
    switch(root, make_release(root, "v2", import_sleep=1.0))
    codes: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            codes.append(http_get(where, "/readyz")[0])
            stop.wait(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    before = server.status()["generation"]
    server.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: server.status()["generation"] != before and not server.status()["generations"][1:],
        30,
        what="the rollout to finish",
    )
    stop.set()
    prober.join(10)
    assert len(codes) >= 10 and set(codes) == {200}, codes
    server.proc.send_signal(signal.SIGTERM)
    # With no drain_delay it leaves at once; /readyz says 503 as long as the master answers.
    try:
        code, body = http_get(where, "/readyz")
    except OSError:
        code, body = 503, b"gone"
    assert code == 503, body
    assert server.proc.wait(30) == 0


def test_status_json_from_the_cli_has_ready(serve) -> None:
    import subprocess
    import sys

    server = serve()
    out = subprocess.run(
        [sys.executable, "-m", "fcgi_engine", "status", "--pidfile", server.pidfile, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert '"ready": true' in out.stdout, out.stdout
