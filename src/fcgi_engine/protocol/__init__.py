"""The FastCGI 1.0 protocol, sans-IO: bytes in, events out; responses in, bytes out.

Nothing here touches a socket, a clock or WSGI; it is layer 0 and imports nothing of ours.
"""

from fcgi_engine.protocol.codec import (
    decode_name_values,
    encode_name_values,
    encode_record,
    encode_records,
)
from fcgi_engine.protocol.connection import Connection, Limits
from fcgi_engine.protocol.constants import (
    FCGI_VERSION_1,
    ProtocolStatus,
    RecordType,
    Role,
)
from fcgi_engine.protocol.errors import ProtocolError
from fcgi_engine.protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    RequestAborted,
    RequestReady,
    RequestRefused,
    StdinData,
    StdinEnd,
)

__all__ = [
    "FCGI_VERSION_1",
    "NEED_DATA",
    "Connection",
    "ConnectionClosed",
    "Event",
    "Limits",
    "ProtocolError",
    "ProtocolStatus",
    "RecordType",
    "RequestAborted",
    "RequestReady",
    "RequestRefused",
    "Role",
    "StdinData",
    "StdinEnd",
    "decode_name_values",
    "encode_name_values",
    "encode_record",
    "encode_records",
]
