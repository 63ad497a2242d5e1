"""ADDR: a unix socket path (`/run/app.sock`, `unix:/run/app.sock`) or HOST:PORT (`[::1]:9000`)."""

from __future__ import annotations

from dataclasses import dataclass


class AddressError(ValueError):
    """An ADDR that is neither a unix socket path nor HOST:PORT."""


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Address = UnixAddress | TcpAddress


def parse_address(text: str) -> Address:
    text = text.strip()
    if not text:
        raise AddressError("empty address")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise AddressError(f"{text!r}: no socket path after unix:")
        return UnixAddress(path)
    if "/" in text or text.endswith(".sock"):
        return UnixAddress(text)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise AddressError(f"{text!r}: expected a socket path or HOST:PORT")
        if ":" in host:
            raise AddressError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{text!r}: port must be a number from 1 to 65535")
    return TcpAddress(host or "127.0.0.1", int(port))
