"""One request through a WSGI app (PEP 3333): start_response, write(), the body iterable,
exc_info, close(), header validation, and errors turned into a 500 or a clean cut-off."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TextIO

from fcgi_engine.serving.body import BodyTooLarge, ClientDisconnected
from fcgi_engine.serving.loader import WSGIApp

log = logging.getLogger("fcgi_engine.app")

_STATUS_RE = re.compile(r"^[1-9][0-9]{2} [^\x00-\x1f\x7f]*$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)
# Large chunks go out in pieces so no response doubles its size in memory while framed.
_SEND_SLICE = 256 * 1024

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class HeaderError(ValueError):
    """The app gave start_response a status or header that is not valid HTTP."""


class ResponseCutOff(Exception):
    """The response failed after it started: the connection must be closed without END_REQUEST."""


_VALID_STATUSES: set[str] = set()


def validate_status(status: Any) -> str:
    if type(status) is str and status in _VALID_STATUSES:
        return status
    if type(status) is not str:
        raise HeaderError(f"status must be a str, got {type(status).__name__}")
    if not _STATUS_RE.match(status):
        raise HeaderError(f"invalid status line {status!r}")
    if len(_VALID_STATUSES) < 1024:
        _VALID_STATUSES.add(status)
    return status


# Header items already found valid: most responses repeat the same few, so the check is
# a set lookup. Bounded, so varying values (dates, lengths) cannot grow it without end.
_VALID_HEADERS: set[tuple[str, str]] = set()
_VALID_HEADERS_MAX = 4096


def validate_headers(headers: Any) -> list[tuple[str, str]]:
    if type(headers) is not list:
        raise HeaderError(f"headers must be a list, got {type(headers).__name__}")
    for item in headers:
        if type(item) is tuple and item in _VALID_HEADERS:
            continue
        if type(item) is not tuple or len(item) != 2:
            raise HeaderError(f"each header must be a (name, value) tuple, got {item!r}")
        name, value = item
        if type(name) is not str or not _TOKEN_RE.match(name):
            raise HeaderError(f"invalid header name {name!r}")
        if type(value) is not str or _BAD_VALUE_RE.search(value):
            raise HeaderError(f"invalid value for header {name}: {value!r}")
        if name.lower() in _HOP_BY_HOP:
            raise HeaderError(f"hop-by-hop header {name!r} is not allowed from a WSGI app")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise HeaderError(f"header {name} is not latin-1: {value!r}") from None
        if len(_VALID_HEADERS) < _VALID_HEADERS_MAX:
            _VALID_HEADERS.add(item)
    return headers


def _head(status: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"Status: {status}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


ERROR_500 = b"Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\nInternal Server Error"  # noqa: E501


def simple_response(status: str, text: str) -> bytes:
    body = text.encode("utf-8")
    return (
        f"Status: {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


class _ResponseState:
    __slots__ = ("head", "headers", "sent", "remaining", "ended", "excess")

    def __init__(self) -> None:
        self.head: bytes | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False  # the head went out
        # Body bytes still due by the head's Content-Length (-1: none declared); known once the
        # head goes out.
        self.remaining = -1
        self.ended = False  # the request's end went out, with the last of the body
        self.excess = 0  # body bytes the app sent past its Content-Length (dropped)


def clip_to_length(data: Any, remaining: int) -> tuple[Any, int, bool, int]:
    """A body chunk against the `remaining` bytes (>= 0) of a declared Content-Length: the part
    to send, how many bytes past the length the app sent (its bug, logged), whether the chunk
    completes the body (then the end records go out with it), and what remains after it."""
    if len(data) < remaining:
        return data, 0, False, remaining - len(data)
    return data[:remaining], len(data) - remaining, True, 0


def declared_length(headers: list[tuple[str, str]]) -> int:
    """The response's Content-Length, -1 when it has none (or not a number)."""
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            value = value.strip()
            return int(value) if value.isdigit() else -1
    return -1


def run_app(
    app: WSGIApp,
    environ: dict[str, Any],
    send_stdout: Callable[[bytes], None],
    finish: Callable[[bytes], None],
) -> None:
    """Call the app and stream its response.

    send_stdout(data) sends response bytes now; finish(data) sends the last bytes together with
    the end of the request. The end goes out with the last body bytes whenever they are known
    to be the last (a list or tuple body, a body of len() 1, or the head's Content-Length
    reached), so a web server that closes on Content-Length (lighttpd) still reads the end in
    the same segment; body bytes past Content-Length are dropped and logged (the app's bug).
    Raises ResponseCutOff when the response failed after it started, and ClientDisconnected
    when the web server went away.
    """
    state = _ResponseState()

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if state.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif state.head is not None:
            raise AssertionError("start_response called a second time without exc_info")
        state.headers = validate_headers(headers)
        state.head = _head(validate_status(status), state.headers)
        return write

    def emit(data: bytes, last: bool) -> None:
        """Send body bytes (after the head, the first time); with `last`, end the request."""
        if state.ended:
            state.excess += len(data)
            return
        prefix = b""
        if not state.sent:
            assert state.head is not None
            state.sent = True
            prefix = state.head
            state.remaining = declared_length(state.headers)
        if state.remaining >= 0:
            data, excess, complete, state.remaining = clip_to_length(data, state.remaining)
            state.excess += excess
            last = last or complete
        if last:
            state.ended = True
            _finish_sliced(send_stdout, finish, prefix, data)
        else:
            _send_sliced(send_stdout, prefix, data)

    def write(data: bytes) -> None:
        if type(data) is not bytes:
            raise TypeError(f"write() takes bytes, got {type(data).__name__}")
        if state.head is None:
            raise AssertionError("write() called before start_response")
        if data or not state.sent:
            emit(data, False)

    result: Iterable[bytes] | None = None
    try:
        result = app(environ, start_response)
        if isinstance(result, (list, tuple)) and not state.sent and len(result) <= 1:
            # The common case: one chunk. Head, body and end of request go out in one send.
            data = result[0] if result else b""
            if type(data) is not bytes:
                raise TypeError(f"the app yielded {type(data).__name__}, not bytes")
            head = state.head
            if head is None:
                raise AssertionError("the app returned without calling start_response")
            state.sent = state.ended = True
            _finish_sliced(send_stdout, finish, head, data)
            return
        # Chunks still to come when the body says how many it has (a list, or len() 1): the
        # last of them ends the request. -1: not known.
        left = len(result) if isinstance(result, (list, tuple)) else _length_hint(result)
        for chunk in result:
            if type(chunk) is not bytes:
                raise TypeError(f"the app yielded {type(chunk).__name__}, not bytes")
            left -= 1
            if chunk or not state.sent or left == 0:
                if state.head is None:
                    raise AssertionError("the app yielded before calling start_response")
                emit(chunk, left == 0)
        if state.head is None:
            raise AssertionError("the app returned without calling start_response")
        if not state.sent:
            state.sent = state.ended = True
            finish(state.head)
        elif not state.ended:
            state.ended = True
            finish(b"")
    except ClientDisconnected:
        raise
    except BodyTooLarge as exc:
        if state.ended:
            return
        if state.sent:
            raise ResponseCutOff(str(exc)) from exc
        finish(simple_response("413 Payload Too Large", str(exc) + "\n"))
    except Exception as exc:
        if state.ended:
            # The response is whole and ended: the connection carries on.
            _log_app_error(environ, "after its response was complete")
            return
        if state.sent:
            _log_app_error(environ, "after the response started; cutting it off")
            raise ResponseCutOff(repr(exc)) from exc
        _log_app_error(environ, "answering 500")
        finish(ERROR_500)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                _log_app_error(environ, "in the response's close()")
        if state.excess:
            log.error(
                "app error on %s %s: %d body bytes past its Content-Length, dropped",
                environ.get("REQUEST_METHOD", "?"),
                environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
                state.excess,
            )


def _length_hint(result: Any) -> int:
    """len(result) when its type has a length of 1 (the one chunk is then the last), else -1.
    Only 1 counts: an object's len() may count something else than chunks."""
    if getattr(type(result), "__len__", None) is None:
        return -1
    try:
        return 1 if len(result) == 1 else -1
    except Exception:  # noqa: BLE001 - a broken __len__ only costs the early end
        return -1


def _send_sliced(send: Callable[[Any], None], prefix: bytes, data: bytes) -> None:
    """Send `prefix` (the head, or b"") and `data`, in slices of at most _SEND_SLICE bytes. The
    head always starts a send of its own bytes, so a sink reads it whole."""
    if prefix:
        if len(prefix) + len(data) <= _SEND_SLICE:
            send(prefix + data)
            return
        send(prefix)
    if len(data) <= _SEND_SLICE:
        if data:
            send(data)
        return
    view = memoryview(data)
    for start in range(0, len(data), _SEND_SLICE):
        send(view[start : start + _SEND_SLICE])


def _finish_sliced(
    send: Callable[[Any], None], finish: Callable[[Any], None], prefix: bytes, data: bytes
) -> None:
    """As _send_sliced, the last slice going out with the end of the request."""
    if len(prefix) + len(data) <= _SEND_SLICE:
        finish(prefix + data if prefix else data)
        return
    if prefix:
        send(prefix)
    view = memoryview(data)
    last = max(0, len(data) - _SEND_SLICE)
    if last:
        _send_sliced(send, b"", view[:last])  # type: ignore[arg-type]
    finish(view[last:])


def _log_app_error(environ: dict[str, Any], what: str) -> None:
    method = environ.get("REQUEST_METHOD", "?")
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    log.error("app error on %s %s, %s", method, path, what, exc_info=sys.exc_info())


class FileWrapper:
    """wsgi.file_wrapper: iterates a file-like object in blocks and closes it."""

    def __init__(self, filelike: Any, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


class ErrorStream:
    """wsgi.errors: text the app writes goes to the error log, a line at a time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()
