"""Through Apache httpd (mod_proxy_fcgi), lighttpd (mod_fastcgi) and Caddy (its FastCGI
transport): GET, POST, a streamed 100 MB upload and rollouts under load with zero failed
requests, over a unix socket and TCP, with connection reuse on and off, and lighttpd spawning
the engine itself; and a Flask app made by a factory behind each of them."""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import APPS, Server, wait_for
from tests.integration.test_nginx import MB, chunks, expected_digest
from tests.integration.test_rollout import Load, ctl, roll_out_under_load, serve_site, switch
from tests.webservers import Front, Fronts, Spawned, spawn_command

pytestmark = pytest.mark.integration

# A release of the site the rollouts deploy: answers "VERSION sha256(body)" as test_rollout's
# Load expects, streams an upload through a hash, shows its environ.
SITE_APP = """
import hashlib, json

VERSION = "{version}"


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/env":
        env = {{k: v for k, v in environ.items() if isinstance(v, str)}}
        env["wsgi.url_scheme"] = environ["wsgi.url_scheme"]
        out = json.dumps(env).encode()
    elif path == "/upload":
        digest, total = hashlib.sha256(), 0
        while chunk := environ["wsgi.input"].read(1 << 16):
            digest.update(chunk)
            total += len(chunk)
        out = json.dumps({{"length": total, "sha256": digest.hexdigest()}}).encode()
    else:
        body = environ["wsgi.input"].read()
        out = (VERSION + " " + hashlib.sha256(body).hexdigest()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    if path.startswith("/iter/"):
        return iter([out])  # an iterable, not a list: as frameworks (Flask, Django) answer
    return [out]
"""

# The front ends and how each reaches the engine.
SETUPS = [
    "apache-unix-reuse-off",
    "apache-unix-reuse-on",
    "apache-tcp-reuse-off",
    "apache-tcp-reuse-on",
    "lighttpd-unix",
    "lighttpd-tcp",
    "lighttpd-spawned",
    "caddy-unix",
    "caddy-tcp",
]

UPLOAD = 100 * MB
BURST = 200


@pytest.fixture
def fronts(tmp: Path, request: pytest.FixtureRequest) -> Iterator[Fronts]:
    started = Fronts(tmp, request)
    yield started
    started.stop_all()


def make_site_release(root: Path, version: str) -> Path:
    release = root / "releases" / version
    release.mkdir(parents=True)
    (release / "app.py").write_text(SITE_APP.format(version=version))
    return release


def start_setup(
    setup: str, serve, fronts: Fronts, tmp: Path, root: Path
) -> tuple[Server | Spawned, Front]:
    """The engine serving root/current and `setup`'s front end before it."""
    kind, transport = setup.split("-")[:2]
    if transport == "spawned":
        engine_log = str(tmp / "spawned.log")
        command = spawn_command(
            "app.py",
            str(tmp / "spawned.pid"),
            engine_log,
            "--chdir",
            str(root / "current"),
            "--health",
            "/healthz",
            "--graceful-timeout",
            "20",
            "--nproc",
            "2",
        )
        spawned = Spawned(str(tmp / "spawned.pid"), engine_log)
        fronts.watch("the engine lighttpd spawned", spawned.log)
        front = fronts.lighttpd(spawn=command)
        wait_for(
            lambda: ctl(spawned, "status")["status"]["generation"], 20, what="the spawned engine"
        )
        return spawned, front
    if transport == "tcp":
        serve = functools.partial(serve, listen="127.0.0.1:0")
    # Apache's workers run as www-data: the socket must let them in.
    mode = ("--socket-mode", "0666") if kind == "apache" else ()
    server = serve_site(serve, root, *mode)
    fronts.watch("fcgi-engine", server.log)
    if kind == "apache":
        return server, fronts.apache(server.address, reuse=setup.endswith("reuse-on"))
    if kind == "lighttpd":
        return server, fronts.lighttpd(server.address)
    return server, fronts.caddy(server.address)


def fetch(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def upload(port: int, size: int) -> dict:
    """POST `size` bytes to /upload, streamed from a generator (never held whole)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    try:
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        conn.request("POST", "/upload", body=chunks(size), headers=headers)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, (response.status, data[:500])
        return json.loads(data)
    finally:
        conn.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def complaints(log: str) -> list[str]:
    """Lines of an engine's log that call a request a failure."""
    return [line for line in log.splitlines() if "went away" in line or "Broken pipe" in line]


@pytest.mark.parametrize("setup", SETUPS)
def test_get_post_upload_and_rollouts_under_load(serve, fronts, tmp: Path, setup: str) -> None:
    root = tmp / "site"
    root.mkdir()
    switch(root, make_site_release(root, "v1"))
    with fronts.explain():
        server, front = start_setup(setup, serve, fronts, tmp, root)

        status, body = fetch(front.port, "GET", "/env?q=1")
        assert status == 200, body
        env = json.loads(body)
        # Whatever the web server's convention, the app is mounted at the root.
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/env")
        assert env["QUERY_STRING"] == "q=1"
        assert env["REQUEST_METHOD"] == "GET"
        assert env["wsgi.url_scheme"] == "http"
        assert env["SERVER_PORT"] == str(front.port)
        assert fetch(front.port, "GET", "/a/b") == (200, b"v1 " + sha(b"").encode())
        form = b"name=caddy&text=" + b"x" * 100_000
        assert fetch(front.port, "POST", "/form", form) == (200, b"v1 " + sha(form).encode())
        # Short answers from an iterable, each on a fresh connection: where lighttpd closed on
        # Content-Length before the end records arrived (issue 10, item 6).
        for n in range(BURST):
            assert fetch(front.port, "GET", f"/iter/{n}") == (200, b"v1 " + sha(b"").encode())
        assert not (found := complaints(server.log())), found[:3]

        started = time.monotonic()
        answer = upload(front.port, UPLOAD)
        took = time.monotonic() - started
        assert answer == {"length": UPLOAD, "sha256": expected_digest(UPLOAD)}
        print(f"{setup}: 100 MB upload in {took:.1f} s")

        with Load(front.port, clients=6, max_seconds=60) as load:
            wait_for(lambda: load.ok > 20, 10, what="load through the front end")
            replies = roll_out_under_load(
                server, root, load, lambda v: make_site_release(root, v), range(2, 5)
            )
        assert not load.errors, load.errors[:10]
        assert load.ok > 50
        assert [(r["from"] + 1, r["ok"]) for r in replies] == [(r["to"], True) for r in replies]
        assert load.versions[-1] == "v4", load.versions
        assert fetch(front.port, "GET", "/")[1].startswith(b"v4 ")
        # Every old generation is gone.
        generations = ctl(server, "status")["status"]["generations"]
        assert [g["phase"] for g in generations] == ["active"]
        # A complete response is never logged as a failure (issue 10, item 6: lighttpd closes
        # on Content-Length before the end records were sent).
        assert not (found := complaints(server.log())), found[:3]
        assert not front.errors(), front.errors()[:3]


FACTORY = "flask_factory:create_app('shop', greeting='hi')"


@pytest.mark.parametrize("setup", ["apache-unix", "lighttpd-unix", "caddy-unix"])
def test_flask_app_from_a_factory(serve, fronts, setup: str) -> None:
    kind = setup.split("-")[0]
    mode = ("--socket-mode", "0666") if kind == "apache" else ()
    server = serve(FACTORY, "--chdir", str(APPS), *mode, nproc=2)
    fronts.watch("fcgi-engine", server.log)
    with fronts.explain():
        if kind == "apache":
            front = fronts.apache(server.address, reuse=True)
        elif kind == "lighttpd":
            front = fronts.lighttpd(server.address)
        else:
            front = fronts.caddy(server.address)
        answers = [json.loads(fetch(front.port, "GET", "/")[1]) for _ in range(20)]
        first = answers[0]
        assert (first["name"], first["greeting"]) == ("shop", "hi")
        assert (first["script_name"], first["path"]) == ("", "/")
        assert first["url"] == f"http://127.0.0.1:{front.port}/"
        # The factory ran once, in the generation, before the workers forked.
        assert len({a["built_in"] for a in answers}) == 1
        status, body = fetch(
            front.port,
            "POST",
            "/form",
            b"who=flask&text=" + b"t" * 5000,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert (status, body) == (200, b"hi flask, 5000 chars")
        size = 8 * MB
        assert upload(front.port, size) == {"length": size, "sha256": expected_digest(size)}
        # Flask answers with an iterable, not a list: no complaint either (issue 10, item 6).
        assert not (found := complaints(server.log())), found[:3]
        assert not front.errors(), front.errors()[:3]
