"""Numbers fixed by the FastCGI 1.0 specification."""

from __future__ import annotations

import enum
import struct

FCGI_VERSION_1 = 1
FCGI_NULL_REQUEST_ID = 0
FCGI_KEEP_CONN = 1
HEADER_LEN = 8
MAX_CONTENT_LEN = 0xFFFF
# Output records carry at most this much; a multiple of 8 keeps them aligned without padding.
MAX_OUTPUT_CHUNK = 0xFFF8

HEADER = struct.Struct("!BBHHBx")
BEGIN_REQUEST_BODY = struct.Struct("!HB5x")
END_REQUEST_BODY = struct.Struct("!LB3x")
UNKNOWN_TYPE_BODY = struct.Struct("!B7x")


class RecordType(enum.IntEnum):
    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(enum.IntEnum):
    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(enum.IntEnum):
    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


# GET_VALUES variable names.
FCGI_MAX_CONNS = "FCGI_MAX_CONNS"
FCGI_MAX_REQS = "FCGI_MAX_REQS"
FCGI_MPXS_CONNS = "FCGI_MPXS_CONNS"
