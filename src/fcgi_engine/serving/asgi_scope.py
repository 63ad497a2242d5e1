"""FastCGI params -> an ASGI HTTP connection scope.

The params are normalised exactly as for the WSGI environ (environ.normalise_params: the CGI
defaults, the server name and port, SCRIPT_NAME/PATH_INFO split at the mount point); the scope
is then what ASGI servers give: `path` is the whole decoded path (root_path included, as
uvicorn and Starlette have it), `root_path` the mount point, `raw_path` the request target as
it arrived (REQUEST_URI without its query), headers lower-cased byte pairs.
"""

from __future__ import annotations

from functools import cache
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from fcgi_engine.serving.environ import normalise_params

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}

_HTTP_VERSIONS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0", "HTTP/2.0": "2", "HTTP/2": "2"}
# CGI keys that are request headers without the HTTP_ prefix.
_CONTENT_HEADERS = (("CONTENT_TYPE", b"content-type"), ("CONTENT_LENGTH", b"content-length"))
_HEADER_NAMES: dict[str, bytes] = {}


def _decoded(cgi: str) -> str:
    """A CGI path (each byte one latin-1 character) as the text it spells in UTF-8."""
    try:
        cgi.encode("ascii")
        return cgi
    except UnicodeEncodeError:
        return cgi.encode("latin-1").decode("utf-8", "replace")


def _port(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _header_name(key: str) -> bytes:
    name = _HEADER_NAMES.get(key)
    if name is None:
        name = key[5:].lower().replace("_", "-").encode("latin-1")
        if len(_HEADER_NAMES) < 1024:
            _HEADER_NAMES[key] = name
    return name


def build_scope(
    params: dict[str, str],
    script_name: str | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The HTTP scope of one request. `params` is normalised in place (and kept by the caller
    for the access log); `state` is the lifespan state, copied into the scope when given."""
    scheme = normalise_params(params, script_name)
    root = params["SCRIPT_NAME"]
    cgi_path = root + params["PATH_INFO"]
    uri = params.get("REQUEST_URI")
    raw_path = (
        uri.partition("?")[0].encode("latin-1")
        if uri
        else quote(cgi_path, safe="/:@!$&'()*+,;=~", encoding="latin-1").encode("ascii")
    )
    headers = [
        (_header_name(key), value.encode("latin-1"))
        for key, value in params.items()
        if key.startswith("HTTP_")
    ]
    for key, name in _CONTENT_HEADERS:
        value = params.get(key)
        if value is not None:
            headers.append((name, value.encode("latin-1")))
    protocol = params["SERVER_PROTOCOL"]
    remote = params.get("REMOTE_ADDR")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": ASGI_VERSION,
        "http_version": _HTTP_VERSIONS.get(protocol, protocol.partition("/")[2] or "1.1"),
        "method": params["REQUEST_METHOD"].upper(),
        "scheme": scheme,
        "path": _decoded(cgi_path),
        "raw_path": raw_path,
        "query_string": params["QUERY_STRING"].encode("latin-1"),
        "root_path": _decoded(root),
        "headers": headers,
        "client": (remote, _port(params.get("REMOTE_PORT")) or 0) if remote else None,
        "server": (params["SERVER_NAME"], _port(params.get("SERVER_PORT"))),
    }
    if state is not None:
        scope["state"] = dict(state)
    return scope


@cache
def status_line(status: int) -> bytes:
    """The CGI head's first line for an HTTP status code."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"Status: {status} {reason}\r\n".encode("latin-1")


def declared_length(headers: Any) -> int:
    """The Content-Length among ASGI response headers (byte pairs), -1 when there is none."""
    for name, value in headers:
        if len(name) == 14 and bytes(name).lower() == b"content-length":
            value = bytes(value).strip()
            return int(value) if value.isdigit() else -1
    return -1


def response_head(status: int, headers: Any) -> bytes:
    """The CGI response head (Status line, headers, blank line) for http.response.start.
    Raises ValueError on a header that could split the response (CR, LF or NUL in it)."""
    parts = [status_line(status)]
    for name, value in headers:
        name = bytes(name)
        value = bytes(value)
        if b"\r" in value or b"\n" in value or b"\0" in value or not name or b":" in name:
            raise ValueError(f"invalid response header {name!r}: {value!r}")
        if b"\r" in name or b"\n" in name or b" " in name:
            raise ValueError(f"invalid response header name {name!r}")
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
