"""ADDR: a unix socket path (`/run/app.sock`, `unix:/run/app.sock`) or HOST:PORT (`[::1]:9000`);
and the allow-list of TCP peers (FCGI_WEB_SERVER_ADDRS, `allowed_addrs`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

# What a TCP listener accepts when nobody said otherwise: this host only.
LOOPBACK = ("127.0.0.0/8", "::1")
ANY = "any"


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


def parse_address(text: str, *, any_port: bool = False) -> Address:
    """A unix socket path or HOST:PORT. With `any_port` (a listener's own address), port 0 asks
    the kernel for any free port; the listener reports the one it bound."""
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
    lowest = 0 if any_port else 1
    if not port.isdigit() or not lowest <= int(port) < 65536:
        raise AddressError(f"{text!r}: port must be a number from {lowest} to 65535")
    return TcpAddress(host or "127.0.0.1", int(port))


class AllowList:
    """Which TCP peers may talk to us: IP addresses and CIDR ranges (IPv4 and IPv6), or `any`.

    Exact addresses are kept in a set, so the common check (one address, the web server's) is one
    lookup; ranges are searched only when that misses.
    """

    __slots__ = ("allows_any", "_exact", "_networks", "entries")

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(e.strip() for e in entries if e.strip())
        self.allows_any = any(e.lower() == ANY for e in self.entries)
        exact: set[str] = set()
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in self.entries:
            if entry.lower() == ANY:
                continue
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise AddressError(
                    f"{entry!r} is not an IP address, a CIDR range (10.0.0.0/8) or 'any'"
                ) from None
            net = _unmapped(net)
            if net.num_addresses == 1:
                exact.add(str(net.network_address))
            else:
                networks.append(net)
        self._exact = frozenset(exact)
        self._networks = tuple(networks)

    def allows(self, host: str) -> bool:
        if self.allows_any or host in self._exact:
            return True
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            # An IPv4 client on a dual-stack socket: judge it by its IPv4 address.
            ip = mapped
            if str(ip) in self._exact:
                return True
        if str(ip) in self._exact:
            return True
        return any(ip.version == net.version and ip in net for net in self._networks)

    def __repr__(self) -> str:
        return f"AllowList({list(self.entries)!r})"


def _unmapped(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped entry (::ffff:198.18.0.5, ::ffff:198.18.0.0/111) as the IPv4 range it
    means: peers are judged by their IPv4 address (see AllowList.allows), so the entry must be
    too, or it would never match."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def is_loopback_host(host: str) -> bool:
    """Whether a listener's host only takes connections from this machine: a loopback address
    or `localhost`. A wildcard (0.0.0.0, ::) or any other name is not."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
