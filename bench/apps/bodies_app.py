"""The big-bodies benchmark app: `/1mb` and `/100mb` answer that many bytes (in 64 KiB
pieces, as a WSGI app streaming a file would), `/upload` reads the request body in 64 KiB
reads and answers the byte count."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

CHUNK = b"x" * 65536
SIZES = {"/1mb": 1 << 20, "/100mb": 100 << 20}


def _pieces(total: int) -> Iterator[bytes]:
    whole, rest = divmod(total, len(CHUNK))
    for _ in range(whole):
        yield CHUNK
    if rest:
        yield CHUNK[:rest]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ.get("PATH_INFO", "")
    if path == "/upload":
        stream = environ["wsgi.input"]
        received = 0
        while True:
            data = stream.read(65536)
            if not data:
                break
            received += len(data)
        text = f"{received}\n".encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))]
        )
        return [text]
    size = SIZES.get(path)
    if size is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    start_response(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
    )
    return _pieces(size)
