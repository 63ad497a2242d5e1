"""The access log: one line per request the app answered, in one of two formats
(`access_log_format`).

`combined` (the default) is nginx's combined format plus the time taken, in seconds with
millisecond precision as nginx's $request_time:

    127.0.0.1 - alice [02/Jan/2025:10:00:00 +0000] "GET /p?q=1 HTTP/1.1" 200 12 "-" "curl" 0.004

`json` is one JSON object a line, with the keys time (ISO 8601, local time with its offset),
remote_addr, remote_user, method, uri, protocol, status, body_bytes, referer, user_agent,
request_time (seconds) and pid.

The size is the response body's bytes (the CGI head is not counted, as nginx's
$body_bytes_sent); the status is "-" (JSON: null) when the response never started. A field the
request lacks is "-" (JSON: null), and a quote, backslash or byte that is not printable ASCII is
written \\xHH, as nginx does, so a line is always one parseable line. Each line is one write(2)
to a descriptor opened with O_APPEND (or the process's stdout, for `-`), so the lines of every
worker sharing the file never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from fcgi_engine.system.logfile import open_log

log = logging.getLogger("fcgi_engine.worker")

FORMATS = ("combined", "json")
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _escaped(value: str) -> str:
    """`value` (a CGI string: one character per byte) with what would break a line escaped."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return _UNSAFE.sub(_hex, value)


def _hex(match: re.Match[str]) -> str:
    return "".join(f"\\x{b:02X}" for b in match[0].encode("latin-1", "replace"))


def _text(value: str) -> str:
    """A CGI string (each byte one latin-1 character) as the UTF-8 text it spells."""
    if value.isascii():
        return value
    return value.encode("latin-1", "replace").decode("utf-8", "backslashreplace")


def request_uri(environ: dict[str, Any]) -> str:
    """The request target as the client sent it: REQUEST_URI, else the path and query."""
    uri = environ.get("REQUEST_URI")
    if uri:
        return uri
    uri = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING")
    return f"{uri}?{query}" if query else uri


def format_combined(
    environ: dict[str, Any], status: bytes, body_bytes: int, took: float, when: float
) -> str:
    """One combined line: `status` is the three digits (b"" if none was sent), `took` the
    seconds the request took, `when` its time (time.time())."""
    get = environ.get
    return (
        f"{get('REMOTE_ADDR') or '-'} - {_escaped(get('REMOTE_USER') or '-')} "
        f"[{_local_time(when)}] "
        f'"{_escaped(get("REQUEST_METHOD") or "-")} {_escaped(request_uri(environ))} '
        f'{_escaped(get("SERVER_PROTOCOL") or "-")}" '
        f"{status.decode('latin-1') or '-'} {body_bytes} "
        f'"{_escaped(get("HTTP_REFERER") or "-")}" "{_escaped(get("HTTP_USER_AGENT") or "-")}" '
        f"{took:.3f}\n"
    )


def format_json(
    environ: dict[str, Any], status: bytes, body_bytes: int, took: float, when: float
) -> str:
    """One JSON line, with the arguments of format_combined."""
    get = environ.get
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
        + f".{int(when * 1000) % 1000:03d}"
        + _offset(when),
        "remote_addr": get("REMOTE_ADDR") or None,
        "remote_user": _text(get("REMOTE_USER") or "") or None,
        "method": get("REQUEST_METHOD") or None,
        "uri": _text(request_uri(environ)),
        "protocol": get("SERVER_PROTOCOL") or None,
        "status": int(status) if status else None,
        "body_bytes": body_bytes,
        "referer": _text(get("HTTP_REFERER") or "") or None,
        "user_agent": _text(get("HTTP_USER_AGENT") or "") or None,
        "request_time": round(took, 3),
        "pid": os.getpid(),
    }
    return json.dumps(record, separators=(", ", ": ")) + "\n"


def _offset(when: float) -> str:
    """The local UTC offset at `when`, as ISO 8601 writes it: +01:00."""
    zone = time.strftime("%z", time.localtime(when))
    return f"{zone[:3]}:{zone[3:]}" if len(zone) == 5 else "+00:00"


# nginx's $time_local changes once a second: format it once a second.
_last_second = -1
_last_local = ""


def _local_time(when: float) -> str:
    global _last_second, _last_local
    second = int(when)
    if second != _last_second:
        _last_local = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
        _last_second = second
    return _last_local


Formatter = Callable[[dict[str, Any], bytes, int, float, float], str]
_FORMATTERS: dict[str, Formatter] = {"combined": format_combined, "json": format_json}


class AccessLog:
    """The file at `path`, or the descriptor `fd` already opened for it, written in `fmt`.

    The generation opens the file as the app's user (so that a failure is reported as the
    rollout's error) and passes the descriptor; a worker on its own opens it here. reopen()
    (on SIGUSR1, after log rotation) opens `path` again and closes the old descriptor.
    """

    def __init__(self, path: str | None, fd: int = -1, fmt: str = "combined") -> None:
        self.path = path
        self.fd = fd
        self.format = _FORMATTERS[fmt]
        if fd < 0:
            self.reopen()

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def reopen(self) -> None:
        """Open the file again; raises OSError when it cannot (the old one stays in use)."""
        if not self.path:
            return
        fd = open_log(self.path)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def write(self, environ: dict[str, Any], status: bytes, body_bytes: int, began: float) -> None:
        """Log a request that began at `began` (time.monotonic()) and has just ended, whose
        response had `status` (b"": none) and `body_bytes` bytes of body."""
        took = time.monotonic() - began
        line = self.format(environ, status, body_bytes, took, time.time())
        try:
            os.write(self.fd, line.encode("latin-1", "replace"))
        except OSError as exc:
            log.error("cannot write the access log: %s", exc)
