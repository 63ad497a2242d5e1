"""ASGI apps served by the ASGI worker, through a real nginx: a plain callable, Starlette and
FastAPI; concurrency on one worker, streaming both ways, disconnects, errors, lifespan, and
rollouts (a failing startup rolled back, none lost under load)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from fcgi_engine.client import request
from tests.conftest import APPS, wait_for
from tests.integration.test_rollout import Load, ctl, roll_out_under_load, serve_site, switch

pytestmark = pytest.mark.integration

PLAIN = f"{APPS}/asgi_plain.py:app"

ASGI_RELEASE = """
import asyncio, hashlib
VERSION = "{version}"
FAIL = {fail!r}

async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if FAIL:
                    raise RuntimeError("release " + VERSION + " cannot reach its database")
                scope["state"]["version"] = VERSION
                await send({{"type": "lifespan.startup.complete"}})
            else:
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    if scope["path"] == "/healthz":
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": b"ok"}})
        return
    digest = hashlib.sha256()
    while True:
        message = await receive()
        digest.update(message.get("body", b""))
        if not message.get("more_body"):
            break
    await asyncio.sleep(0.02)  # requests stay in flight across a rollout
    out = (scope["state"]["version"] + " " + digest.hexdigest()).encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(out)).encode())]}})
    await send({{"type": "http.response.body", "body": out}})
"""


def asgi_release(root: Path, version: str, fail: bool = False) -> Path:
    release = root / "releases" / version
    release.mkdir(parents=True)
    (release / "app.py").write_text(ASGI_RELEASE.format(version=version, fail=fail))
    return release


def get(port: int, path: str, method: str = "GET", body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


# ------------------------------------------------------------ apps


def test_plain_callable_through_nginx(serve, nginx) -> None:
    server = serve(PLAIN, nproc=1)
    front = nginx(server.address, keep_conn=True)
    status, body, _ = get(front.port, "/")
    assert (status, body) == (200, b"hello world\n")
    status, body, _ = get(front.port, "/scope?x=1&y=%C3%A9", headers={"X-Custom": "v"})
    scope = json.loads(body)
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert scope["method"] == "GET"
    assert scope["path"] == "/scope"
    assert scope["query_string"] == "x=1&y=%C3%A9"
    assert scope["scheme"] == "http"
    assert scope["client"][0] == "127.0.0.1" and scope["client"][1] > 0
    assert scope["server"][1] == front.port
    assert ["x-custom", "v"] in scope["headers"]
    assert scope["state"]["started"] > 0  # lifespan (auto) ran and its state reaches requests
    payload = os.urandom(300_000)
    status, body, _ = get(front.port, "/echo", "POST", payload)
    size, digest, _rss = body.split()
    assert int(size) == len(payload) and digest.decode() == hashlib.sha256(payload).hexdigest()


def test_starlette_app(serve, nginx) -> None:
    server = serve(f"{APPS}/asgi_starlette.py:app", nproc=2)
    front = nginx(server.address, keep_conn=True, buffering=False)
    assert get(front.port, "/hello")[:2] == (200, b"hello from lifespan")
    status, body, _ = get(front.port, "/items/7?q=abc")
    assert status == 200
    data = json.loads(body)
    assert data["id"] == 7 and data["q"] == "abc" and data["client"] == "127.0.0.1"
    # (Debian's fastcgi_params pass HTTP_HOST as $host, without the port.)
    assert data["url"].startswith("http://127.0.0.1") and data["url"].endswith("/items/7?q=abc")
    assert get(front.port, "/items/nope")[0] == 404
    status, body, _ = get(
        front.port,
        "/echo",
        "POST",
        json.dumps({"a": [1, 2]}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and json.loads(body)["got"] == {"a": [1, 2]}
    status, body, _ = get(front.port, "/stream")
    assert status == 200 and body == b"part 0\npart 1\npart 2\npart 3\n"


def test_fastapi_app(serve, nginx) -> None:
    server = serve(f"{APPS}/asgi_fastapi.py:app", "--health", "/healthz", nproc=2)
    front = nginx(server.address, keep_conn=True)
    status, body, response = get(front.port, "/api/status")
    assert status == 200 and json.loads(body) == {"ok": True}
    assert response.getheader("content-type") == "application/json"
    status, body, _ = get(front.port, "/api/users/12?verbose=true")
    assert status == 200 and json.loads(body) == {"user_id": 12, "verbose": True}
    status, body, _ = get(front.port, "/api/users/404")
    assert status == 404 and json.loads(body) == {"detail": "no such user"}
    assert get(front.port, "/api/users/abc")[0] == 422
    order = json.dumps({"item": "tea", "quantity": 3}).encode()
    status, body, _ = get(
        front.port, "/api/orders", "POST", order, {"Content-Type": "application/json"}
    )
    assert status == 201 and json.loads(body) == {"item": "tea", "total": 6}
    bad = json.dumps({"item": "tea"}).encode()
    assert (
        get(front.port, "/api/orders", "POST", bad, {"Content-Type": "application/json"})[0] == 422
    )
    # Health checks are served by the app itself (a sync view in FastAPI's thread pool).
    assert request(server.address, "/healthz").status == 200


# ------------------------------------------------------------ concurrency and streaming


def test_100_waiting_requests_on_one_worker_finish_together(serve, nginx) -> None:
    server = serve(PLAIN, nproc=1)
    front = nginx(server.address)
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = get(front.port, "/sleep?s=0.5")[0]
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one) for _ in range(100)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    took = time.monotonic() - started
    assert results == [200] * 100
    # One at a time would take 50 s.
    assert took < 5, took


def test_streaming_response_arrives_in_pieces(serve, nginx) -> None:
    server = serve(PLAIN, nproc=1)
    front = nginx(server.address, buffering=False)
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        started = time.monotonic()
        conn.request("GET", "/stream?n=4&delay=0.5")
        response = conn.getresponse()
        arrivals = []
        data = b""
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break
            arrivals.append(time.monotonic() - started)
            data += chunk
    finally:
        conn.close()
    assert data == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\ndone\n"
    # The first chunk came long before the last (2 s of sleeps in between).
    assert len(arrivals) >= 3, arrivals
    assert arrivals[0] < 1.0 and arrivals[-1] - arrivals[0] > 1.2, arrivals


def test_large_upload_streams_with_flat_memory(serve, nginx) -> None:
    server = serve(PLAIN, nproc=1)
    front = nginx(server.address, buffering=False)
    before = int(get(front.port, "/rss")[1].split()[1])
    size = 50 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    def body():
        for _ in range(size // len(block)):
            yield block

    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
    try:
        conn.request("POST", "/echo", body=body(), headers={"Content-Length": str(size)})
        response = conn.getresponse()
        got = response.read()
    finally:
        conn.close()
    assert response.status == 200, got
    total, hexdigest, peak = got.split()
    assert int(total) == size and hexdigest.decode() == digest.hexdigest()
    # The worker's peak RSS grew by far less than the body.
    assert int(peak) - before < 20 * 1024, (before, int(peak))


def test_disconnect_is_delivered_when_the_client_goes_away(serve, nginx, tmp: Path) -> None:
    server = serve(PLAIN, nproc=1)
    front = nginx(server.address)
    mark = tmp / "disconnect.mark"
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as client:
        client.sendall(f"GET /disconnect?mark={mark} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # The request is in the app (waiting for a disconnect) once nginx holds an upstream
        # connection: give it a moment to get there, bounded.
        wait_for(lambda: request(server.address, "/hello").status == 200, 5, what="the worker")
        time.sleep(0.3)
    wait_for(mark.exists, 10, what="the app to see the disconnect")
    assert mark.read_text() == "http.disconnect"
    assert request(server.address, "/hello").status == 200


def test_errors_before_and_after_the_response_starts(serve, nginx) -> None:
    server = serve(PLAIN, nproc=1)
    front = nginx(server.address, keep_conn=True)
    status, body, _ = get(front.port, "/error")
    assert status == 500 and body == b"Internal Server Error"
    wait_for(lambda: "boom before the response" in server.log(), 5, what="the traceback")
    log = server.log()
    assert "Traceback (most recent call last)" in log and "app error on GET /error" in log
    # After the head went out the response is cut off: never a complete-looking one.
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        conn.request("GET", "/error-after")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
    assert get(front.port, "/hello")[0] == 200


def test_a_request_that_blocks_the_loop_is_killed_at_timeout(serve) -> None:
    server = serve(PLAIN, "--timeout", "1", nproc=1)
    from fcgi_engine.client import ClientError

    with pytest.raises(ClientError):
        request(server.address, "/block?s=30", timeout=10)
    wait_for(
        lambda: "stuck for" in server.log() and "/block" in server.log(),
        5,
        what="the timeout log line",
    )
    wait_for(lambda: request(server.address, "/hello").status == 200, 5, what="a new worker")


def test_max_requests_recycles_asgi_workers(serve) -> None:
    server = serve(PLAIN, "--max-requests", "5", nproc=1)
    pids = set()
    for _ in range(16):
        response = request(server.address, "/scope")
        assert response.status == 200
        pids.add(json.loads(response.body)["state"]["started"])
    assert len(pids) >= 3


# ------------------------------------------------------------ lifespan and rollouts


def test_lifespan_startup_failure_fails_serve(serve) -> None:
    server = serve(PLAIN, nproc=2, wait=False, env={"ASGI_FAIL_STARTUP": "1"})
    try:
        code = server.proc.wait(30)
    except Exception:  # noqa: BLE001 - reported below
        code = None
    assert code not in (0, None), server.log()
    assert "database is down" in server.log()


def test_lifespan_on_requires_support(serve, tmp: Path) -> None:
    app = tmp / "nolifespan.py"
    app.write_text(
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'http'\n"
        "    await send({'type': 'http.response.start', 'status': 204, 'headers': []})\n"
        "    await send({'type': 'http.response.body'})\n"
    )
    # auto: an app that raises on the lifespan scope does not support it; it serves.
    server = serve(f"{app}:app", nproc=1)
    assert request(server.address, "/").status == 204
    server.stop()
    failing = serve(f"{app}:app", "--lifespan", "on", nproc=1, wait=False)
    assert failing.proc.wait(30) != 0
    assert "AssertionError" in failing.log()


def test_lifespan_shutdown_runs_on_stop(serve, tmp: Path) -> None:
    mark = tmp / "shutdown.mark"
    server = serve(PLAIN, nproc=2, env={"ASGI_SHUTDOWN_MARK": str(mark)})
    assert request(server.address, "/hello").status == 200
    assert server.stop(signal.SIGTERM) == 0
    assert len(mark.read_text().split()) == 2


def test_rollout_to_a_failing_startup_is_rolled_back(serve, nginx, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, asgi_release(root, "v1"))
    server = serve("app.py", "--chdir", str(root / "current"), "--health", "/healthz", nproc=2)
    front = nginx(server.address, keep_conn=True)
    switch(root, asgi_release(root, "v2", fail=True))
    with Load(front.port, clients=4) as load:
        wait_for(lambda: load.ok > 10, 10, what="load to start")
        reply = ctl(server, "graceful")
        before = load.ok
        try:
            wait_for(lambda: load.ok > before + 10, 10, what="requests after the failed rollout")
        except AssertionError:
            print(server.log(), front.error_log(), load.errors[:5], reply)
            raise
    assert reply["ok"] is False, reply
    assert reply["rolled_back"] is True
    assert "cannot reach its database" in reply["error"] + server.log()
    assert not load.errors, load.errors[:10]
    assert load.versions == ["v1"]
    assert request(server.address, "/").body.startswith(b"v1 ")


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_rollouts_under_load_lose_nothing(serve, nginx, tmp: Path, keep_conn: bool) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, asgi_release(root, "v1"))
    server = serve_site(serve, root)
    front = nginx(server.address, keep_conn=keep_conn)
    with Load(front.port, clients=16) as load:
        wait_for(lambda: load.ok > 20, 10, what="load to start")
        roll_out_under_load(
            server, root, load, lambda v: asgi_release(root, v), range(2, 5), served_after=20
        )
    assert not load.errors, load.errors[:10]
    assert load.ok > 100
    assert load.versions[-1] == "v4"
    assert request(server.address, "/").body.startswith(b"v4 ")
    assert "upstream prematurely" not in front.error_log()
    status = ctl(server, "status")["status"]
    assert [g["phase"] for g in status["generations"]] == ["active"]


def test_access_log_and_usr1_reopen(serve, tmp: Path) -> None:
    path = tmp / "access.log"
    server = serve(PLAIN, "--access-log", str(path), nproc=1)
    assert request(server.address, "/hello?x=1").status == 200
    assert request(server.address, "/error").status == 500
    wait_for(lambda: path.exists() and path.read_text().count("\n") >= 2, 5, what="two lines")
    lines = path.read_text().splitlines()
    assert '"GET /hello' in lines[0] and " 200 " in lines[0], lines
    assert " 500 " in lines[1], lines
    path.rename(tmp / "access.log.1")
    os.kill(server.pid, signal.SIGUSR1)
    wait_for(
        lambda: request(server.address, "/hello").status == 200 and path.exists(),
        5,
        what="a new access log after USR1",
    )
