"""Listening sockets: atomic unix bind with the final mode, TCP (IPv6 too), inherited fd 0, and
refusing new connections on a listener whose queue must still be served (`refuse_new_connections`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct

from fcgi_engine.config.address import Address, TcpAddress, UnixAddress
from fcgi_engine.system.pidfile import check_directory, describe_uid

BACKLOG = 1024


class SocketInUse(OSError):
    """Another live server listens on this address."""


def bind(
    address: Address, mode: int = 0o660, owner: tuple[int, int] | None = None
) -> socket.socket:
    if isinstance(address, UnixAddress):
        return bind_unix(address.path, mode, owner)
    assert isinstance(address, TcpAddress)
    return bind_tcp(address.host, address.port)


def bind_tcp(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SocketInUse(exc.errno, f"{host}:{port} is already in use") from None
            raise
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def unix_socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_unix(path: str, mode: int = 0o660, owner: tuple[int, int] | None = None) -> socket.socket:
    """Bind a temporary name under a strict umask, set mode and owner, then rename onto `path`.

    The socket never exists at `path` with the wrong mode. A live listener at `path` is refused;
    a stale socket file is replaced; anything else at `path` is left alone and refused.

    The directory must not let other users replace what we create (UnsafeDirectory, an OSError);
    in a sticky world-writable one like /tmp, another user's file at `path` is refused, and the
    file at `path` after the rename must be the one we bound.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    check_directory(directory, "socket")
    expected_uid = owner[0] if owner is not None else os.geteuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(errno.EEXIST, f"{path} exists and is not a socket")
        if unix_socket_is_live(path):
            raise SocketInUse(errno.EADDRINUSE, f"a live server already listens on {path}")
        if st.st_uid not in (os.geteuid(), 0, expected_uid):
            raise SocketInUse(
                errno.EEXIST,
                f"{path} is a socket file of {describe_uid(st.st_uid)}; not replacing another "
                "user's file: remove it, or listen elsewhere",
            )
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        sock.bind(temp)
        bound = os.lstat(temp)
        if owner is not None:
            os.chown(temp, owner[0], owner[1])
        os.chmod(temp, mode)
        sock.listen(BACKLOG)
        os.rename(temp, path)
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != (bound.st_dev, bound.st_ino) or st.st_uid != expected_uid:
            # Someone swapped the file between our rename and now: it is not ours to serve on.
            raise SocketInUse(errno.EEXIST, f"{path} was replaced by another file as we bound it")
    except BaseException:
        sock.close()
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    finally:
        os.umask(old_umask)
    sock.set_inheritable(False)
    return sock


def listening_socket_from_fd(fd: int) -> socket.socket | None:
    """The listening socket at `fd` (fd 0 from a web server, LISTEN_FDS), or None."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        sock.detach()
        return None
    if not accepting:
        sock.detach()
        return None
    return sock


SD_LISTEN_FDS_START = 3


def systemd_listen_fd() -> int | None:
    """The first socket passed by systemd socket activation, if it was passed to us."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    if pid != os.getpid() or count < 1:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return SD_LISTEN_FDS_START


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name)


def unix_socket_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def remove_unix_socket(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file at `path` if it is still the one we bound (same inode)."""
    if identity is not None and unix_socket_identity(path) == identity:
        try:
            os.unlink(path)
        except OSError:
            pass


# Linux's SO_ATTACH_FILTER (the socket module does not name it).
_SO_ATTACH_FILTER = 26
# A classic BPF program run on every packet the listener receives (the TCP header at offset 0):
# drop a SYN without ACK (a new connection), keep everything else, so that a handshake already
# under way completes into the queue, where it is served, instead of being reset later.
_DROP_NEW_CONNECTIONS = (
    (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else keep
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole packet
)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Make a TCP listener take no new connection while those queued can still be accepted.

    New SYNs are dropped (by a socket filter, on the socket itself, so on every process's copy);
    the client retransmits, and once every copy of the listener is closed its next SYN is
    refused, which a web server retries on another upstream. Closing or shutting down a listener
    instead would reset the connections queued in it, after they sent their request. False
    when it could not be done (not TCP, or the kernel refused)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    program = b"".join(struct.pack("HBBI", *insn) for insn in _DROP_NEW_CONNECTIONS)
    code = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog: an unsigned short count, then a pointer to the instructions (the
    # kernel copies them during the call, so `code` need only outlive it).
    fprog = struct.pack("HP", len(_DROP_NEW_CONNECTIONS), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True
