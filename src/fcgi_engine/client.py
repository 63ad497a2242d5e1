"""A FastCGI client: `fcgi-engine request`, health checks and tests all speak through it."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fcgi_engine.config.address import Address, TcpAddress, UnixAddress, parse_address
from fcgi_engine.protocol.codec import encode_name_values, encode_record, encode_records
from fcgi_engine.protocol.constants import (
    BEGIN_REQUEST_BODY,
    END_REQUEST_BODY,
    FCGI_KEEP_CONN,
    HEADER,
    HEADER_LEN,
    ProtocolStatus,
    RecordType,
    Role,
)


class ClientError(Exception):
    """Could not connect, or the application broke the protocol; the message says which."""


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    stderr: bytes = b""
    app_status: int = 0
    protocol_status: int = 0
    raw: bytes = field(default=b"", repr=False)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def connect(address: str | Address, timeout: float = 30.0) -> socket.socket:
    addr = parse_address(address) if isinstance(address, str) else address
    try:
        if isinstance(addr, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(addr.path)
        else:
            assert isinstance(addr, TcpAddress)
            sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        raise ClientError(f"cannot connect to {addr}: {exc.strerror or exc}") from exc
    return sock


def build_params(
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: Mapping[str, str] | None = None,
    body_length: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "fcgi-engine-client",
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "REQUEST_URI": path + ("?" + query if query else ""),
        "QUERY_STRING": query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
    }
    if body_length is not None:
        params["CONTENT_LENGTH"] = str(body_length)
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            params[key] = value
        else:
            params["HTTP_" + key] = value
    params.update(extra or {})
    return params


def encode_request(
    request_id: int,
    params: Mapping[str, str],
    body: bytes = b"",
    keep_conn: bool = False,
    role: int = Role.RESPONDER,
) -> bytes:
    """The records of one whole request, as a web server sends them."""
    nv = encode_name_values((k.encode("latin-1"), v.encode("latin-1")) for k, v in params.items())
    return b"".join(
        (
            encode_record(
                RecordType.BEGIN_REQUEST,
                request_id,
                BEGIN_REQUEST_BODY.pack(role, FCGI_KEEP_CONN if keep_conn else 0),
            ),
            encode_records(RecordType.PARAMS, request_id, nv),
            encode_record(RecordType.PARAMS, request_id),
            encode_records(RecordType.STDIN, request_id, body),
            encode_record(RecordType.STDIN, request_id),
        )
    )


def parse_cgi_response(data: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Split a CGI response (`Status:` line, headers, blank line, body)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        index = data.find(sep)
        if index >= 0:
            head, body = data[:index], data[index + len(sep) :]
            break
    else:
        raise ClientError("the response has no end of headers")
    status, reason = 200, "OK"
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").splitlines():
        name, sep2, value = line.partition(":")
        if not sep2:
            raise ClientError(f"malformed response header line {line!r}")
        value = value.strip()
        if name.lower() == "status":
            code, _, reason = value.partition(" ")
            if not code.isdigit():
                raise ClientError(f"malformed Status header {value!r}")
            status = int(code)
        else:
            headers.append((name, value))
            if name.lower() == "location" and status == 200:
                status, reason = 302, "Found"
    return status, reason, headers, body


class Exchange:
    """Read one request's answer off a connection."""

    def __init__(self, sock: socket.socket, request_id: int) -> None:
        self.sock = sock
        self.request_id = request_id
        self.buf = bytearray()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except TimeoutError as exc:
                raise ClientError("timed out waiting for the application") from exc
            except OSError as exc:
                raise ClientError(f"connection failed: {exc}") from exc
            if not chunk:
                raise ClientError("the application closed the connection before END_REQUEST")
            self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_response(self, parse: bool = True) -> Response:
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        while True:
            version, rtype, rid, clen, plen = HEADER.unpack(self._read_exact(HEADER_LEN))
            if version != 1:
                raise ClientError(f"the application sent FastCGI version {version}")
            content = self._read_exact(clen + plen)[:clen]
            if rid != self.request_id:
                if rid == 0:
                    continue
                raise ClientError(f"record for request id {rid}, expected {self.request_id}")
            if rtype == RecordType.STDOUT:
                stdout.append(content)
            elif rtype == RecordType.STDERR:
                stderr.append(content)
            elif rtype == RecordType.END_REQUEST:
                if len(content) < 8:
                    raise ClientError("END_REQUEST body too short")
                app_status, proto_status = END_REQUEST_BODY.unpack(content[:8])
                break
            else:
                raise ClientError(f"unexpected record type {rtype} from the application")
        raw = b"".join(stdout)
        if proto_status != ProtocolStatus.REQUEST_COMPLETE:
            return Response(
                0,
                ProtocolStatus(proto_status).name,
                [],
                b"",
                b"".join(stderr),
                app_status,
                proto_status,
                raw,
            )
        if not parse:
            return Response(0, "", [], raw, b"".join(stderr), app_status, proto_status, raw)
        status, reason, headers, body = parse_cgi_response(raw)
        return Response(
            status, reason, headers, body, b"".join(stderr), app_status, proto_status, raw
        )


def request(
    address: str | Address | socket.socket,
    path: str = "/",
    method: str = "GET",
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    keep_conn: bool = False,
    request_id: int = 1,
) -> Response:
    """One request; a socket given as `address` is used as it is (and left open)."""
    path, _, query = path.partition("?")
    all_params = build_params(
        method,
        path,
        query,
        headers,
        len(body) if body or method in ("POST", "PUT", "PATCH") else None,
        params,
    )
    own = not isinstance(address, socket.socket)
    sock = address if isinstance(address, socket.socket) else connect(address, timeout)
    try:
        try:
            sock.sendall(encode_request(request_id, all_params, body, keep_conn))
        except OSError as exc:
            raise ClientError(f"sending the request failed: {exc}") from exc
        return Exchange(sock, request_id).read_response()
    finally:
        if own:
            sock.close()


def get_values(sock: socket.socket, names: Iterable[str]) -> dict[str, str]:
    """Ask FCGI_GET_VALUES on an open connection."""
    from fcgi_engine.protocol.codec import decode_name_values

    sock.sendall(
        encode_record(
            RecordType.GET_VALUES, 0, encode_name_values((n.encode(), b"") for n in names)
        )
    )
    ex = Exchange(sock, 0)
    version, rtype, rid, clen, plen = HEADER.unpack(ex._read_exact(HEADER_LEN))
    content = ex._read_exact(clen + plen)[:clen]
    if rtype != RecordType.GET_VALUES_RESULT:
        raise ClientError(f"expected GET_VALUES_RESULT, got record type {rtype}")
    return {k.decode(): v.decode() for k, v in decode_name_values(content)}
