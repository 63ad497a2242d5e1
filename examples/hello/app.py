"""The demo app: a plain WSGI callable that reports its release and takes a while to boot."""

import os
import time

RELEASE = os.path.basename(os.path.realpath(os.getcwd()))
# Real apps take seconds to import; this one pretends to.
time.sleep(float(os.environ.get("HELLO_BOOT_SECONDS", "1")))


def application(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    text = f"hello from {RELEASE}, pid {os.getpid()}, {len(body)} bytes in\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]
