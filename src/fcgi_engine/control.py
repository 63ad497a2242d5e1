"""The manager <-> master contract: JSON lines over a unix socket beside the pidfile (mode 0600).

Requests: {"cmd": "status"}, {"cmd": "graceful"} (answered when the rollout ends),
{"cmd": "stop", "fast": false} (answered when the server has stopped).
Replies: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class ControlError(Exception):
    """The master could not be reached or did not answer."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    value = json.loads(line.decode())
    if not isinstance(value, dict):
        raise ValueError("a control message is a JSON object")
    return value


def split_messages(buf: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The complete JSON lines in `buf` (bad lines skipped) and the incomplete rest."""
    *lines, rest = buf.split(b"\n")
    messages = []
    for line in lines:
        try:
            messages.append(decode(line))
        except ValueError:
            continue
    return messages, rest


def call(path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command and wait for its one reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
            sock.sendall(encode(message))
        except OSError as exc:
            raise ControlError(f"cannot reach the master at {path}: {exc.strerror or exc}") from exc
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise ControlError(f"the master did not answer within {timeout:g} s") from exc
            except OSError as exc:
                raise ControlError(f"the master closed the control connection: {exc}") from exc
            if not chunk:
                raise ControlError("the master closed the control connection without answering")
            buf += chunk
        return decode(buf)
    finally:
        sock.close()
