"""Through a real nginx: unix and TCP, fastcgi_keep_conn on and off, buffering on and off."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time

import pytest

pytestmark = pytest.mark.integration

MB = 1024 * 1024


def fetch(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if own:
            c.close()


def chunks(total: int, size: int = 256 * 1024):
    block = bytes(range(256)) * (size // 256)
    left = total
    while left > 0:
        piece = block[: min(left, size)]
        left -= len(piece)
        yield piece


def upload(conn: http.client.HTTPConnection, size: int, chunked: bool) -> None:
    """POST `size` bytes to /echo, streamed: with Content-Length, or chunked so that nginx
    (with request buffering off) sends no CONTENT_LENGTH."""
    if chunked:
        conn.request(
            "POST",
            "/echo",
            body=chunks(size),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
    else:
        conn.request("POST", "/echo", body=chunks(size), headers={"Content-Length": str(size)})


def expected_digest(total: int) -> str:
    digest = hashlib.sha256()
    for piece in chunks(total):
        digest.update(piece)
    return digest.hexdigest()


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def start_pair(
    serve, nginx, transport: str, keep_conn: bool, buffering: bool, nproc: int = 2, pool: int = 32
):
    listen = None if transport == "unix" else "127.0.0.1:0"
    server = serve(listen=listen, nproc=nproc)
    front = nginx(server.address, keep_conn=keep_conn, buffering=buffering, pool=pool)
    return server, front


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
@pytest.mark.parametrize("buffering", [True, False], ids=["buffered", "streamed"])
def test_get_upload_and_download(serve, nginx, transport, keep_conn, buffering) -> None:
    server, front = start_pair(serve, nginx, transport, keep_conn, buffering)
    assert fetch(front.port, "GET", "/hello") == (200, b"hello world\n")
    size = 20 * MB
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=120)
    upload(conn, size, chunked=not buffering)
    r = conn.getresponse()
    answer = json.loads(r.read())
    assert r.status == 200
    assert answer["length"] == size
    assert answer["sha256"] == expected_digest(size)
    status, body = fetch(front.port, "GET", f"/big?n={size}", conn=conn)
    assert status == 200 and len(body) == size
    assert hashlib.sha256(body).hexdigest() == expected_digest_big(size)
    conn.close()
    assert fetch(front.port, "GET", "/error")[0] == 500
    assert fetch(front.port, "GET", "/hello")[0] == 200


def expected_digest_big(total: int) -> str:
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    left = total
    while left > 0:
        piece = block[: min(left, len(block))]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_concurrent_clients_through_keepalive_pool(serve, nginx, keep_conn) -> None:
    """24 clients, keepalive pool 32, nproc 2: a pool larger than nproc never stalls."""
    server, front = start_pair(serve, nginx, "unix", keep_conn, True, nproc=2, pool=32)
    errors: list[str] = []
    counts = [0] * 24
    deadline = time.monotonic() + 3.0

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        try:
            for n in range(5000):  # bounded in count as well as time
                if time.monotonic() > deadline:
                    break
                if n % 3 == 0:
                    status, body = fetch(front.port, "POST", "/echo", b"x" * (n % 5000), conn=conn)
                    ok = status == 200 and json.loads(body)["length"] == n % 5000
                else:
                    status, body = fetch(front.port, "GET", "/hello", conn=conn)
                    ok = status == 200 and body == b"hello world\n"
                if not ok:
                    errors.append(f"client {i}: {status} {body[:100]!r}")
                counts[i] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is recorded
            errors.append(f"client {i}: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert all(c > 0 for c in counts), counts
    assert sum(counts) > 24 * 5
    assert "upstream" not in front.error_log()


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_body_the_app_never_reads(serve, nginx, transport, keep_conn) -> None:
    """The app answers without reading a large body: every answer arrives, no 502."""
    server, front = start_pair(serve, nginx, transport, keep_conn, False, nproc=1)
    body = b"u" * (5 * MB)
    for _ in range(4):
        assert fetch(front.port, "POST", "/hello", body) == (200, b"hello world\n")
    assert "upstream" not in front.error_log()


def test_oversized_params_get_431_not_502(serve, nginx) -> None:
    server, front = start_pair(serve, nginx, "unix", False, True, nproc=1)
    status, _ = fetch(front.port, "GET", "/hello", headers={"X-Big": "b" * 7000})
    assert status == 200  # as large a header as nginx passes by default is fine
    from fcgi_engine.client import request

    huge = request(server.address, "/hello", headers={"X-Huge": "h" * (2 << 20)})
    assert huge.status == 431


def test_client_disconnects_mid_response(serve, nginx) -> None:
    server, front = start_pair(serve, nginx, "unix", True, False, nproc=1)
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    conn.request("GET", f"/big?n={200 * MB}")
    r = conn.getresponse()
    assert r.status == 200
    r.read(1024 * 1024)
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    # The only worker gets over it and serves the next request.
    for _ in range(3):
        assert fetch(front.port, "GET", "/hello") == (200, b"hello world\n")


def _rss(front) -> tuple[int, int]:
    status, body = fetch(front.port, "GET", "/rss")
    data = json.loads(body)
    return data["pid"], data["rss_kb"]


@pytest.mark.parametrize("buffering", [True, False], ids=["buffered", "streamed"])
def test_memory_flat_for_100mb_upload_and_response(serve, nginx, buffering) -> None:
    server, front = start_pair(serve, nginx, "unix", False, buffering, nproc=1)
    pid, before = _rss(front)
    size = 100 * MB
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=120)
    upload(conn, size, chunked=not buffering)
    answer = json.loads(conn.getresponse().read())
    conn.close()
    assert answer["length"] == size and answer["pid"] == pid
    assert answer["rss_kb"] - before < 50 * 1024, (before, answer["rss_kb"])
    status, body = fetch(front.port, "GET", f"/big?n={size}")
    assert status == 200 and len(body) == size
    del body
    pid2, after = _rss(front)
    assert pid2 == pid
    assert after - before < 50 * 1024, (before, after)
