"""wsgi.input: the request body, received whole before the app runs, and read by the app.

The worker collects a request's FCGI_STDIN records without blocking on the connection (so a
peer that trickles its body never holds the worker) into a SpooledBody: in memory up to
`body_buffer_size`, in an unlinked temporary file beyond it, so memory stays flat for any body
size. No CONTENT_LENGTH is needed (nginx `fastcgi_request_buffering off` sends none): the empty
STDIN record ends the body. The app reads it through an InputStream.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from typing import IO

READ_CHUNK = 256 * 1024


class ClientDisconnected(OSError):
    """The web server went away (or aborted the request) while the body was being read."""


class EndNotDelivered(ClientDisconnected):
    """The whole response went out but its end records (END_REQUEST) could not: the web server
    closed once it had the body (lighttpd does, on Content-Length). The response is complete:
    this is no failure, only a connection to close."""


class BodyTooLarge(Exception):
    """The body exceeded the configured max_body_size."""


class SpooledBody:
    """A request body as it arrives: chunks in memory, moved to a temporary file past `limit`."""

    __slots__ = ("size", "_chunks", "_file", "_limit")

    def __init__(self, limit: int) -> None:
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._limit = limit

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self._limit:
            # Unlinked at once: nothing is left on disk if the worker dies.
            self._file = tempfile.TemporaryFile(prefix="fcgi-engine-body-")
            self._file.writelines(self._chunks)
            self._chunks = []

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def reader(self) -> Callable[[], bytes]:
        """A pull function over the whole body (b"" at the end), for an InputStream."""
        if self._file is not None:
            f = self._file
            f.flush()
            f.seek(0)
            return lambda: f.read(READ_CHUNK)
        chunks = iter(self._chunks)
        return lambda: next(chunks, b"")

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None


EMPTY_BODY: Callable[[], bytes] = lambda: b""  # noqa: E731 - a shared, stateless pull


class InputStream:
    """A read-only, forward-only file-like object over a pull function (b"" at the end)."""

    def __init__(self, pull: Callable[[], bytes], max_size: int = 0) -> None:
        self._pull = pull
        self._buf = b""
        self._eof = False
        self._received = 0
        self._max = max_size

    def _fill(self) -> bool:
        """Pull one more chunk into the buffer; False at the end of the body."""
        if self._eof:
            return False
        chunk = self._pull()
        if not chunk:
            self._eof = True
            return False
        self._received += len(chunk)
        if self._max and self._received > self._max:
            raise BodyTooLarge(f"request body exceeds {self._max} bytes")
        self._buf = self._buf + chunk if self._buf else chunk
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf]
            self._buf = b""
            while self._fill():
                parts.append(self._buf)
                self._buf = b""
            return b"".join(parts)
        while len(self._buf) < size and self._fill():
            pass
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        searched = 0
        while True:
            index = self._buf.find(b"\n", searched)
            if index >= 0:
                end = index + 1
                break
            if 0 <= limit <= len(self._buf):
                end = limit
                break
            searched = len(self._buf)
            if not self._fill():
                end = len(self._buf)
                break
        if 0 <= limit < end:
            end = limit
        line, self._buf = self._buf[:end], self._buf[end:]
        return line

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line
