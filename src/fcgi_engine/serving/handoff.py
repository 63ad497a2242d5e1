"""The hand-off of connections between processes lives in fcgi_engine.handoff (layer 1, since
the master hands connections on too); the serving side's names stay importable from here."""

from __future__ import annotations

from fcgi_engine.handoff import (
    MESSAGE_MAX,
    SEND_TIMEOUT,
    HandedOver,
    decode_handoff,
    encode_handoff,
    receive_connection,
    send_connection,
)

__all__ = [
    "MESSAGE_MAX",
    "SEND_TIMEOUT",
    "HandedOver",
    "decode_handoff",
    "encode_handoff",
    "receive_connection",
    "send_connection",
]
