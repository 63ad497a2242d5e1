"""The app the integration tests serve: one endpoint per behaviour under test.

`application` is wrapped in wsgiref's validator, so every request the tests make also checks
that the server speaks PEP 3333 to the letter; `raw` is the same app without it, for the
endpoints that break the rules on purpose.
"""

import hashlib
import json
import os
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

VERSION = os.environ.get("TESTAPP_VERSION", "v1")


def _qs(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _text(start_response, body, status="200 OK", ctype="text/plain"):
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(data)))])
    return [data]


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def raw(environ, start_response):
    path = environ["PATH_INFO"]
    q = _qs(environ)
    if path in ("/", "/hello"):
        return _text(start_response, "hello world\n")
    if path == "/version":
        return _text(start_response, VERSION + "\n")
    if path == "/echo":
        # Streams the body in chunks: memory stays flat for any size.
        digest = hashlib.sha256()
        total = 0
        stream = environ["wsgi.input"]
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        body = json.dumps(
            {
                "sha256": digest.hexdigest(),
                "length": total,
                "rss_kb": _rss_kb(),
                "pid": os.getpid(),
                "version": VERSION,
            }
        )
        return _text(start_response, body, ctype="application/json")
    if path == "/lines":
        lines = list(environ["wsgi.input"])
        return _text(start_response, json.dumps([line.decode() for line in lines]))
    if path == "/big":
        size = int(q.get("n", "1048576"))
        chunk = bytes(range(256)) * 256  # 64 KiB

        def gen():
            left = size
            while left > 0:
                piece = chunk[: min(left, len(chunk))]
                left -= len(piece)
                yield piece

        start_response(
            "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        )
        return gen()
    if path == "/rss":
        return _text(start_response, json.dumps({"rss_kb": _rss_kb(), "pid": os.getpid()}))
    if path == "/env":
        env = {k: v for k, v in environ.items() if isinstance(v, str)}
        env["wsgi.url_scheme"] = environ["wsgi.url_scheme"]
        env["wsgi.input_terminated"] = environ.get("wsgi.input_terminated")
        return _text(start_response, json.dumps(env), ctype="application/json")
    if path == "/error":
        raise RuntimeError("boom: the app failed on purpose")
    if path == "/error-after-start":

        def broken():
            yield b"partial"
            raise RuntimeError("boom after the response started")

        start_response("200 OK", [("Content-Type", "text/plain")])
        return broken()
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"and returned"]
    if path == "/slow":
        time.sleep(float(q.get("s", "1")))
        return _text(start_response, "slept\n")
    if path == "/stderr":
        environ["wsgi.errors"].write("a line for the error log\n")
        return _text(start_response, "ok\n")
    if path == "/bad-header":
        start_response("200 OK", [("Bad Header", "x")])
        return [b"never"]
    if path == "/exc-info":
        try:
            raise ValueError("handled")
        except ValueError:
            import sys

            start_response("200 OK", [("Content-Type", "text/plain")])
            start_response(
                "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
            )
            return [b"replaced"]
    if path == "/close":

        class Body:
            def __iter__(self):
                yield b"body"

            def close(self):
                with open(os.environ.get("TESTAPP_CLOSE_FILE", "/dev/null"), "a") as f:
                    f.write("closed\n")

        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()
    if path == "/whoami":
        return _text(start_response, json.dumps({"uid": os.getuid(), "gid": os.getgid()}))
    if path == "/healthz":
        return _text(start_response, "ok\n")
    return _text(start_response, "not found\n", status="404 Not Found")


application = validator(raw)
