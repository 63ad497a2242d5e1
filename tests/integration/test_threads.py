"""Threaded WSGI workers (`threads: N`) through a real nginx: N requests at once per worker,
wsgi.multithread, rollouts under load with every thread busy, timeout, max_requests, Flask."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fcgi_engine.client import ClientError, request
from tests.conftest import APPS, wait_for
from tests.integration.test_rollout import Load, roll_out_under_load, serve_site, switch

pytestmark = pytest.mark.integration

THREADS_APP = f"{APPS}/threads_app.py"

# The rollout test's release: every request waits 20 ms in the app, so with 16 clients on
# 2 workers x 4 threads every thread has a request in flight when the rollout comes.
RELEASE = """
import hashlib, time
VERSION = "{version}"

def application(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    body = environ["wsgi.input"].read()
    time.sleep(0.02)
    out = (VERSION + " " + hashlib.sha256(body).hexdigest()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
"""


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def at_once(port: int, paths: list[str]) -> tuple[list[tuple[int, bytes]], float]:
    """GET every path on its own HTTP connection, all at once: the answers and the time taken."""
    results: list[tuple[int, bytes]] = [(0, b"")] * len(paths)

    def one(i: int) -> None:
        try:
            status, body, _ = get(port, paths[i])
        except OSError as exc:
            status, body = -1, repr(exc).encode()
        results[i] = (status, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, time.monotonic() - began


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_eight_waits_finish_together(serve, nginx, keep_conn: bool) -> None:
    server = serve(THREADS_APP, "--threads", "8", nproc=1)
    front = nginx(server.address, keep_conn=keep_conn)
    for _round in range(2):  # the second round reuses nginx's kept-alive connections
        results, took = at_once(front.port, [f"/wait?s=0.5&n={i}" for i in range(8)])
        assert [status for status, _ in results] == [200] * 8, results
        answers = [json.loads(body) for _, body in results]
        assert len({a["pid"] for a in answers}) == 1
        assert len({a["thread"] for a in answers}) == 8
        assert all(a["multithread"] for a in answers)
        assert took < 2.0, f"8 x 0.5 s took {took:.2f} s"
    assert "upstream prematurely" not in front.error_log()


def test_multithread_is_set_only_with_threads(serve) -> None:
    threaded = serve(THREADS_APP, "--threads", "2", nproc=1)
    inline = serve(THREADS_APP, nproc=1)
    assert json.loads(request(threaded.address, "/").body)["multithread"] is True
    assert json.loads(request(inline.address, "/").body)["multithread"] is False


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_rollouts_with_every_thread_busy_lose_nothing(
    serve, nginx, tmp: Path, keep_conn: bool
) -> None:
    root = tmp / "site"
    releases = root / "releases"

    def release(version: str) -> Path:
        path = releases / version
        path.mkdir(parents=True)
        (path / "app.py").write_text(RELEASE.format(version=version))
        return path

    root.mkdir()
    switch(root, release("v1"))
    server = serve_site(serve, root, "--threads", "4")
    front = nginx(server.address, keep_conn=keep_conn)
    with Load(front.port, clients=16) as load:
        wait_for(lambda: load.ok > 50, 10, what="load to start")
        roll_out_under_load(
            server,
            root,
            load,
            release,
            range(2, 5),
            # Every thread of both workers has a request in flight when it rolls out.
            before_each=lambda: wait_for(
                lambda: _all_threads_busy(server), 5, what="every thread busy"
            ),
            served_after=20,
        )
    assert not load.errors, load.errors[:10]
    assert load.versions[-1] == "v4"
    assert "upstream prematurely" not in front.error_log()


def _all_threads_busy(server: Any) -> bool:
    """Both workers busy in the scoreboard (the oldest of their 4 requests shows)."""
    workers = server.status()["workers"]
    return len(workers) >= 2 and all(w["state"] == "busy" for w in workers)


def test_timeout_kills_a_worker_whose_thread_is_stuck(serve) -> None:
    server = serve(THREADS_APP, "--threads", "4", "--timeout", "1", nproc=1)
    failed: list[BaseException] = []

    def stuck() -> None:
        try:
            request(server.address, "/wait?s=30", timeout=15)
        except ClientError as exc:
            failed.append(exc)

    thread = threading.Thread(target=stuck)
    thread.start()
    # The other threads keep serving while one is stuck.
    wait_for(lambda: request(server.address, "/quick", timeout=5).status == 200, 5)
    thread.join(15)
    assert failed, "the stuck request should have failed with its worker"
    wait_for(
        lambda: "stuck for" in server.log() and "/wait" in server.log(),
        5,
        what="the timeout log line naming the request",
    )
    wait_for(lambda: request(server.address, "/after").status == 200, 5, what="a new worker")


def test_max_requests_recycles_without_failing_in_flight(serve) -> None:
    server = serve(THREADS_APP, "--threads", "4", "--max-requests", "3", nproc=1)
    pids: set[int] = set()
    for _round in range(4):
        answers: list[Any] = [None] * 4

        def one(i: int, answers: list[Any] = answers) -> None:
            try:
                answers[i] = request(server.address, f"/wait?s=0.3&i={i}", timeout=15)
            except ClientError as exc:
                answers[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert all(getattr(a, "status", None) == 200 for a in answers), answers
        pids |= {json.loads(a.body)["pid"] for a in answers}
    assert len(pids) >= 2
    assert "recycling" in server.log()


def test_flask_app_on_threads(serve, nginx) -> None:
    server = serve(f"{APPS}/threads_flask.py:app", "--threads", "4", nproc=1)
    front = nginx(server.address, keep_conn=True)
    results, took = at_once(front.port, [f"/api/items/{i}?wait=0.4" for i in range(4)])
    assert [s for s, _ in results] == [200] * 4
    assert [json.loads(b) for _, b in results] == [
        {"item": i, "multithread": True} for i in range(4)
    ]
    assert took < 1.2, took
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/form",
            body="name=ada&text=" + "x" * 5000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello ada, 5000 chars")
        cookie = response.getheader("Set-Cookie") or ""
        assert cookie.startswith("visitor=ada")
    finally:
        conn.close()
    status, body, _ = get(front.port, "/whoami", {"Cookie": "visitor=ada"})
    assert (status, json.loads(body)) == (200, {"visitor": "ada"})
