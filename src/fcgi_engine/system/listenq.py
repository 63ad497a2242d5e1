"""How many connections wait in a listening socket's accept queue, and how many it may hold
(Linux): what tells a saturated server from a quiet one.

- TCP: getsockopt(TCP_INFO) on the listening socket. For a listener the kernel reports the
  accept queue's length in tcpi_unacked and its limit (the backlog) in tcpi_sacked.
- Unix stream: a NETLINK_SOCK_DIAG request for the socket's inode with UDIAG_SHOW_RQLEN; for a
  listener the answer's rqueue is the number of pending connections and wqueue the backlog.

Either gives None where it cannot be measured (another family, an old kernel, a failure), and
never raises.
"""

from __future__ import annotations

import os
import socket
import struct

# struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked.
_TCP_INFO_QUEUE = struct.Struct("=8x16xII")
_TCP_INFO_LEN = _TCP_INFO_QUEUE.size

# linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UDIAG_SHOW_RQLEN = 0x10
_TCP_LISTEN_STATE = 10
_NO_COOKIE = 0xFFFFFFFF
# unix_diag_msg: family, type, state, pad, ino, cookie[2]
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_NLATTR = struct.Struct("=HH")
_UNIX_DIAG_RQLEN = 4
_RQLEN = struct.Struct("=II")  # rqueue, wqueue


class ListenQueue:
    """Measures one listening socket's accept queue; `sample()` as often as needed."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.family = listener.family
        self._netlink: socket.socket | None = None
        self._seq = 0
        self._broken = False

    def sample(self) -> tuple[int | None, int | None]:
        """(connections waiting now, the queue's limit); None for what cannot be measured."""
        if self._broken:
            return None, None
        try:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                return _tcp_queue(self.listener)
            if self.family == socket.AF_UNIX:
                return self._unix_queue()
        except (OSError, struct.error, ValueError):
            self._broken = True
            self.close()
        return None, None

    def _unix_queue(self) -> tuple[int | None, int | None]:
        if self._netlink is None:
            self._netlink = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
            )
            self._netlink.settimeout(0.5)
        inode = os.fstat(self.listener.fileno()).st_ino
        self._seq += 1
        body = _UNIX_DIAG_REQ.pack(
            socket.AF_UNIX,
            0,
            0,
            1 << _TCP_LISTEN_STATE,
            inode,
            _UDIAG_SHOW_RQLEN,
            _NO_COOKIE,
            _NO_COOKIE,
        )
        header = _NLMSG_HDR.pack(
            _NLMSG_HDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, self._seq, 0
        )
        self._netlink.send(header + body)
        while True:
            reply = self._netlink.recv(8192)
            length, kind, _flags, seq, _pid = _NLMSG_HDR.unpack_from(reply)
            if seq == self._seq:
                break
        if kind == _NLMSG_ERROR:
            raise ValueError("sock_diag refused the request")
        at = _NLMSG_HDR.size + _UNIX_DIAG_MSG.size
        end = min(length, len(reply))
        while at + _NLATTR.size <= end:
            attr_len, attr_type = _NLATTR.unpack_from(reply, at)
            if attr_len < _NLATTR.size:
                break
            if attr_type == _UNIX_DIAG_RQLEN:
                waiting, limit = _RQLEN.unpack_from(reply, at + _NLATTR.size)
                return waiting, limit
            at += (attr_len + 3) & ~3
        return None, None

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None


def _tcp_queue(listener: socket.socket) -> tuple[int | None, int | None]:
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    unacked, sacked = _TCP_INFO_QUEUE.unpack_from(info)
    return unacked, sacked
