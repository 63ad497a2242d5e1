"""Rollouts under load through a real nginx: zero failed requests, rollback on a bad release,
supervision (worker and master SIGKILL, USR2 re-exec, TTIN/TTOU, max_requests, timeout)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fcgi_engine import control
from fcgi_engine.client import request
from tests.conftest import APPS, wait_for

pytestmark = pytest.mark.integration

APP_TEMPLATE = """
import hashlib, os, time
time.sleep({import_sleep})
VERSION = "{version}"
{extra}

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/healthz":
        status = "{health_status}"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"health"]
    body = environ["wsgi.input"].read()
    out = (VERSION + " " + hashlib.sha256(body).hexdigest()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
"""


def make_release(
    root: Path,
    version: str,
    *,
    import_sleep: float = 1.0,
    extra: str = "",
    health_status: str = "200 OK",
) -> Path:
    release = root / "releases" / version
    release.mkdir(parents=True)
    (release / "app.py").write_text(
        APP_TEMPLATE.format(
            version=version, import_sleep=import_sleep, extra=extra, health_status=health_status
        )
    )
    return release


def switch(root: Path, release: Path) -> None:
    tmp_link = root / "current.tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(release)
    os.replace(tmp_link, root / "current")


def ctl(server, cmd: str, timeout: float = 60.0) -> dict:
    return control.call(server.pidfile + ".ctl", {"cmd": cmd}, timeout=timeout)


class Load:
    """N keep-alive HTTP clients, GETs and POSTs with bodies, checking every answer."""

    def __init__(self, port: int, clients: int = 8, max_seconds: float = 60.0) -> None:
        self.port = port
        self.errors: list[str] = []
        self.ok = 0
        self.versions: list[str] = []
        self.stop_flag = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]
        self.lock = threading.Lock()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)

    def client(self, i: int) -> None:
        import hashlib

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = 0
        while not self.stop_flag.is_set() and time.monotonic() < self.deadline and n < 100000:
            n += 1
            body = (f"client {i} request {n} " * (n % 50)).encode() if n % 2 else None
            try:
                conn.request("POST" if body else "GET", f"/r/{i}/{n}", body=body)
                r = conn.getresponse()
                data = r.read()
            except Exception as exc:  # noqa: BLE001 - every failure counts
                with self.lock:
                    self.errors.append(f"client {i} #{n}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            version, _, digest = data.decode(errors="replace").partition(" ")
            if r.status != 200 or digest != hashlib.sha256(body or b"").hexdigest():
                with self.lock:
                    self.errors.append(f"client {i} #{n}: {r.status} {data[:200]!r}")
                continue
            with self.lock:
                self.ok += 1
                if not self.versions or self.versions[-1] != version:
                    self.versions.append(version)
        conn.close()


def serve_site(serve, root: Path, *args: str):  # type: ignore[no-untyped-def]
    """Serve root/current/app.py as a rollout test does: 2 workers, /healthz proves a release,
    20 s for a drain."""
    return serve(
        "app.py",
        "--chdir",
        str(root / "current"),
        "--health",
        "/healthz",
        "--graceful-timeout",
        "20",
        *args,
        nproc=2,
    )


def roll_out_under_load(
    server,  # type: ignore[no-untyped-def]
    root: Path,
    load: Load,
    release: Callable[[str], Path],
    versions: range,
    before_each: Callable[[], object] = lambda: None,
    served_after: int = 10,
) -> list[dict]:
    """Deploy each version and roll it out with `graceful` while `load` runs; each rollout must
    succeed and be followed by `served_after` answered requests. The replies, in order."""
    replies = []
    for n in versions:
        switch(root, release(f"v{n}"))
        before_each()
        reply = ctl(server, "graceful")
        assert reply["ok"], reply
        replies.append(reply)
        before = load.ok
        wait_for(lambda b=before: load.ok > b + served_after, 10, what="requests after the rollout")
    return replies


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_five_rollouts_under_load_lose_nothing(serve, nginx, tmp: Path, keep_conn: bool) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1"))
    server = serve_site(serve, root)
    front = nginx(server.address, keep_conn=keep_conn)
    master_pid = server.pid
    with Load(front.port) as load:
        wait_for(lambda: load.ok > 20, 10, what="load to start")
        replies = roll_out_under_load(
            server, root, load, lambda v: make_release(root, v), range(2, 7)
        )
    assert all(reply["to"] == reply["from"] + 1 for reply in replies), replies
    assert not load.errors, load.errors[:10]
    assert load.ok > 100
    assert request(server.address, "/").body.startswith(b"v6 ")
    assert load.versions[-1] == "v6"
    assert ctl(server, "status")["pid"] == master_pid
    assert "upstream prematurely" not in front.error_log()
    # Every old generation is gone: one generation, nproc workers.
    status = ctl(server, "status")["status"]
    assert [g["phase"] for g in status["generations"]] == ["active"]


@pytest.mark.parametrize("bad", ["import-error", "health-500"])
def test_bad_release_is_rolled_back_and_old_keeps_serving(
    serve, nginx, tmp: Path, bad: str
) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0.2))
    server = serve("app.py", "--chdir", str(root / "current"), "--health", "/healthz", nproc=2)
    front = nginx(server.address, keep_conn=True)
    if bad == "import-error":
        release = make_release(
            root, "v2", import_sleep=0.2, extra="raise RuntimeError('release v2 is broken')"
        )
        expected = "release v2 is broken"
    else:
        release = make_release(
            root, "v2", import_sleep=0.2, health_status="500 Internal Server Error"
        )
        expected = "500"
    switch(root, release)
    with Load(front.port, clients=4) as load:
        wait_for(lambda: load.ok > 10, 10, what="load to start")
        reply = ctl(server, "graceful")
        before = load.ok
        wait_for(lambda: load.ok > before + 10, 10, what="requests after the failed rollout")
    assert reply["ok"] is False
    assert expected in reply["error"]
    assert reply["rolled_back"] is True
    assert not load.errors, load.errors[:10]
    assert load.versions == ["v1"]
    assert request(server.address, "/").body.startswith(b"v1 ")


def test_hanging_import_killed_at_boot_timeout(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve("app.py", "--chdir", str(root / "current"), "--boot-timeout", "2", nproc=1)
    switch(root, make_release(root, "v2", import_sleep=600))
    started = time.monotonic()
    reply = ctl(server, "graceful")
    assert reply["ok"] is False and "boot_timeout" in reply["error"]
    assert time.monotonic() - started < 8
    assert request(server.address, "/").body.startswith(b"v1 ")
    wait_for(
        lambda: len(ctl(server, "status")["status"]["generations"]) == 1,
        5,
        what="the hung generation to be reaped",
    )


def test_rollout_while_one_runs_is_refused(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve("app.py", "--chdir", str(root / "current"), nproc=1)
    switch(root, make_release(root, "v2", import_sleep=2))
    result: dict[str, dict] = {}
    first = threading.Thread(target=lambda: result.setdefault("a", ctl(server, "graceful")))
    first.start()
    wait_for(lambda: ctl(server, "status")["status"]["booting"], 5, what="the rollout to start")
    second = ctl(server, "graceful")
    first.join(30)
    assert second["ok"] is False and "already running" in second["error"]
    assert result["a"]["ok"] is True


def test_hup_rolls_out(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve("app.py", "--chdir", str(root / "current"), nproc=1)
    switch(root, make_release(root, "v2", import_sleep=0))
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: request(server.address, "/").body.startswith(b"v2 "), 10, what="v2")


def test_master_sigkill_leaves_no_worker(serve, tmp: Path) -> None:
    server = serve(nproc=2)
    status = ctl(server, "status")["status"]
    pids = [w["pid"] for w in status["workers"]] + status["generations"][0]["pids"]
    assert pids
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)

    def all_gone() -> bool:
        return not server.tree()

    wait_for(all_gone, 8, what="every generation and worker to exit")
    # The next start works on the same socket path (the stale file is replaced).
    again = serve(listen=server.address)
    assert request(again.address, "/hello").status == 200


def test_worker_sigkill_under_load(serve, nginx) -> None:
    server = serve(nproc=2)
    front = nginx(server.address, keep_conn=True)
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        try:
            for _ in range(100000):
                if stop.is_set():
                    break
                try:
                    conn.request("GET", "/hello")
                    r = conn.getresponse()
                    if r.read() != b"hello world\n":
                        errors.append(str(r.status))
                except Exception as exc:  # noqa: BLE001
                    errors.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        finally:
            conn.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        victim = ctl(server, "status")["status"]["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                victim not in [w["pid"] for w in ctl(server, "status")["status"]["workers"]]
                and len(ctl(server, "status")["status"]["workers"]) == 2
            ),
            3,
            what="the worker to be replaced",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert len(errors) <= 1, errors


def test_usr2_reexec_keeps_pid_and_loses_nothing(serve, nginx, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve("app.py", "--chdir", str(root / "current"), nproc=2)
    front = nginx(server.address, keep_conn=True)
    before = ctl(server, "status")["status"]
    with Load(front.port, clients=4) as load:
        wait_for(lambda: load.ok > 10, 10, what="load")
        os.kill(server.pid, signal.SIGUSR2)
        wait_for(lambda: "master re-executed" in server.log(), 10, what="the re-exec")
        after_ok = load.ok
        wait_for(lambda: load.ok > after_ok + 20, 10, what="requests after the re-exec")
    assert not [e for e in load.errors], load.errors[:5]
    after = ctl(server, "status")
    assert after["pid"] == server.pid
    assert after["status"]["generation"] == before["generation"]
    assert server.proc.poll() is None


def test_ttin_ttou_change_worker_count(serve) -> None:
    server = serve(nproc=2)
    os.kill(server.pid, signal.SIGTTIN)
    wait_for(lambda: len(ctl(server, "status")["status"]["workers"]) == 3, 5, what="3 workers")
    os.kill(server.pid, signal.SIGTTOU)
    wait_for(lambda: ctl(server, "status")["status"]["nproc"] == 2, 5, what="nproc 2")
    os.kill(server.pid, signal.SIGTTOU)
    wait_for(lambda: len(ctl(server, "status")["status"]["workers"]) == 1, 5, what="1 worker")
    assert ctl(server, "status")["status"]["nproc"] == 1
    assert request(server.address, "/hello").status == 200


def test_ttou_under_keepalive_load_hands_idle_connections_on(serve, nginx, tmp: Path) -> None:
    """A worker a resize retires drains like a rollout's: its idle kept-alive connections go to
    its siblings, never closed under nginx's feet (a POST on such a connection is a 502)."""
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve_site(serve, root)
    front = nginx(server.address, keep_conn=True)
    with Load(front.port, clients=8) as load:
        wait_for(lambda: load.ok > 50, 10, what="load to start")
        for _ in range(3):
            os.kill(server.pid, signal.SIGTTIN)
            wait_for(lambda: len(ctl(server, "status")["status"]["workers"]) == 3, 10, what="3")
            before = load.ok
            wait_for(lambda b=before: load.ok > b + 50, 10, what="requests on 3 workers")
            os.kill(server.pid, signal.SIGTTOU)
            wait_for(lambda: len(ctl(server, "status")["status"]["workers"]) == 2, 10, what="2")
            before = load.ok
            wait_for(lambda b=before: load.ok > b + 50, 10, what="requests on 2 workers")
    assert not load.errors, load.errors[:5]
    assert "upstream" not in front.error_log()


def test_max_requests_recycles_workers(serve) -> None:
    server = serve(f"{APPS}/testapp.py", "--max-requests", "5", nproc=1)
    pids = set()
    for _ in range(16):
        response = request(server.address, "/rss")
        assert response.status == 200
        pids.add(json.loads(response.body)["pid"])
    assert len(pids) >= 3


def test_timeout_kills_a_stuck_worker(serve) -> None:
    server = serve(f"{APPS}/testapp.py", "--timeout", "1", nproc=1)
    from fcgi_engine.client import ClientError

    with pytest.raises(ClientError):
        request(server.address, "/slow?s=30", timeout=10)
    wait_for(
        lambda: "stuck for" in server.log() and "/slow" in server.log(),
        5,
        what="the timeout log line",
    )
    wait_for(lambda: request(server.address, "/hello").status == 200, 5, what="a new worker")


def test_signal_storm_during_a_rollout_does_not_wedge_the_master(serve, tmp: Path) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_release(root, "v1", import_sleep=0))
    server = serve("app.py", "--chdir", str(root / "current"), nproc=2)
    switch(root, make_release(root, "v2", import_sleep=1.5))
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: ctl(server, "status")["status"]["booting"], 5, what="the rollout to start")
    for sig in (
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGUSR1,
        signal.SIGHUP,
        signal.SIGTTOU,
        signal.SIGUSR2,
        signal.SIGHUP,
    ):
        os.kill(server.pid, sig)
    assert request(server.address, "/").status == 200
    try:
        wait_for(lambda: request(server.address, "/").body.startswith(b"v2 "), 15, what="v2")
    except AssertionError:
        print(server.log())
        raise
    wait_for(
        lambda: len(ctl(server, "status")["status"]["generations"]) == 1, 15, what="one generation"
    )
    switch(root, make_release(root, "v3", import_sleep=0))
    reply = ctl(server, "graceful")
    assert reply["ok"], reply
    assert request(server.address, "/").body.startswith(b"v3 ")
    assert "rollout queued" in server.log()  # the HUPs during the boot were queued, and said so
