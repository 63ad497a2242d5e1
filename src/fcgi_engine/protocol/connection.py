"""The per-connection state machine: the heart of the sans-IO protocol layer.

Feed it bytes with `receive_data`, pull events with `next_event`, send what `data_to_send`
returns (answers the specification requires without the application: GET_VALUES_RESULT,
UNKNOWN_TYPE, CANT_MPX_CONN, UNKNOWN_ROLE), and turn a response into bytes with `stdout`,
`stderr` and `end_request`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from fcgi_engine.protocol.codec import (
    decode_name_values,
    decode_params,
    encode_name_values,
    encode_record,
    encode_records,
)
from fcgi_engine.protocol.constants import (
    BEGIN_REQUEST_BODY,
    END_REQUEST_BODY,
    FCGI_KEEP_CONN,
    FCGI_MAX_CONNS,
    FCGI_MAX_REQS,
    FCGI_MPXS_CONNS,
    FCGI_VERSION_1,
    HEADER,
    HEADER_LEN,
    UNKNOWN_TYPE_BODY,
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
    _NeedData,
)

_unpack_header = HEADER.unpack_from
_BEGIN = RecordType.BEGIN_REQUEST
_ABORT = RecordType.ABORT_REQUEST
_PARAMS = RecordType.PARAMS
_STDIN = RecordType.STDIN
_DATA = RecordType.DATA
_STDOUT = RecordType.STDOUT
_STDERR = RecordType.STDERR
_END = RecordType.END_REQUEST
# How many finished request ids a connection remembers, to ignore their late records.
_ENDED_MEMORY = 32


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one connection accepts.

    max_params_size bounds one request's encoded params (nginx sends a few KiB); max_conns and
    max_reqs are what GET_VALUES reports.
    """

    max_params_size: int = 1 << 20
    max_conns: int = 1
    max_reqs: int = 1


class _Stage(enum.Enum):
    PARAMS = "params"
    STDIN = "stdin"
    STDIN_DONE = "stdin done"
    DISCARD = "discard"


class _Request:
    __slots__ = ("request_id", "keep_conn", "stage", "params")

    def __init__(self, request_id: int, keep_conn: bool) -> None:
        self.request_id = request_id
        self.keep_conn = keep_conn
        self.stage = _Stage.PARAMS
        self.params = bytearray()


class Connection:
    """One transport connection from a web server, serving one request at a time."""

    def __init__(self, limits: Limits | None = None, ended: Iterable[int] = ()) -> None:
        self.limits = limits or Limits()
        # Immutable bytes: the common whole-request read is kept as it is, and each record's
        # content is one slice.
        self._buf = b""
        self._pos = 0
        self._eof = False
        # Why the peer broke the protocol: the message only. A stored exception would keep its
        # traceback, whose frames hold this connection and its buffers until the cyclic GC runs.
        self._broken: str | None = None
        self._out = bytearray()
        self._request: _Request | None = None
        # Requests this side already ended: their late records are ignored. A connection that
        # moves to another process carries this list with it.
        self._ended: deque[int] = deque(ended, maxlen=_ENDED_MEMORY)
        # Set when a request ended without FCGI_KEEP_CONN: the connection must close after it.
        self.must_close = False
        # Set when the last request ended before its stdin stream did: the web server may still
        # be sending it, so a close must linger (read and drop) rather than reset.
        self.unread_input = False

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the transport; b"" means the peer closed its side."""
        if data:
            pos = self._pos
            if pos >= len(self._buf):
                self._buf = bytes(data)
            else:
                # Keep only what is not parsed yet, so memory stays bounded by one read.
                self._buf = self._buf[pos:] + data
            self._pos = 0
        else:
            self._eof = True

    @property
    def has_buffered_input(self) -> bool:
        return self._pos < len(self._buf)

    @property
    def leftover(self) -> bytes:
        """Bytes received but not yet parsed (handed along with the connection when it moves)."""
        return self._buf[self._pos :]

    @property
    def ended_ids(self) -> list[int]:
        return list(self._ended)

    @property
    def idle(self) -> bool:
        """No request is open on this connection."""
        return self._request is None

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises ProtocolError when the peer broke the protocol."""
        if self._broken is not None:
            raise ProtocolError(self._broken)
        buf = self._buf
        end = len(buf)
        try:
            while True:
                pos = self._pos
                if end - pos < HEADER_LEN:
                    break
                version, rtype, rid, clen, plen = _unpack_header(buf, pos)
                if version != FCGI_VERSION_1:
                    raise ProtocolError(f"unsupported FastCGI version {version}")
                start = pos + HEADER_LEN
                stop = start + clen
                if stop + plen > end:
                    break
                self._pos = stop + plen
                event = self._handle_record(rtype, rid, buf[start:stop])
                if event is not None:
                    return event
        except ProtocolError as exc:
            self._broken = str(exc)
            raise
        if self._eof:
            return ConnectionClosed()
        return NEED_DATA

    def _handle_record(self, rtype: int, rid: int, content: bytes) -> Event | None:
        if rid == 0:
            self._handle_management(rtype, content)
            return None
        request = self._request
        if request is not None and request.request_id == rid:
            return self._handle_request_record(request, rtype, content)
        if rtype == _BEGIN:
            return self._begin(rid, content)
        if rid in self._ended:
            # The spec: records for a request id that is not active are ignored.
            if rtype == _STDIN and not content:
                self.unread_input = False
            return None
        if rtype in (_ABORT, _PARAMS, _STDIN, _DATA):
            raise ProtocolError(f"{RecordType(rtype).name} record for unknown request id {rid}")
        raise ProtocolError(f"unexpected record type {_type_name(rtype)} from the web server")

    def _handle_management(self, rtype: int, content: bytes) -> None:
        if rtype == RecordType.GET_VALUES:
            known = {
                FCGI_MAX_CONNS: str(self.limits.max_conns),
                FCGI_MAX_REQS: str(self.limits.max_reqs),
                FCGI_MPXS_CONNS: "0",
            }
            answers = []
            for name, _value in decode_name_values(content):
                text = name.decode("latin-1")
                if text in known:
                    answers.append((name, known[text].encode("ascii")))
            self._out += encode_record(
                RecordType.GET_VALUES_RESULT, 0, encode_name_values(answers)[:0xFFFF]
            )
        else:
            self._out += encode_record(RecordType.UNKNOWN_TYPE, 0, UNKNOWN_TYPE_BODY.pack(rtype))

    def _begin(self, rid: int, content: bytes) -> Event | None:
        if len(content) < BEGIN_REQUEST_BODY.size:
            raise ProtocolError(f"BEGIN_REQUEST body of {len(content)} bytes, expected 8")
        role, flags = BEGIN_REQUEST_BODY.unpack_from(content)
        if self._request is not None:
            # One request at a time, as GET_VALUES says (FCGI_MPXS_CONNS=0).
            self._refuse(rid, ProtocolStatus.CANT_MPX_CONN)
            return None
        if role != Role.RESPONDER:
            self._refuse(rid, ProtocolStatus.UNKNOWN_ROLE)
            return None
        if rid in self._ended:
            self._ended.remove(rid)
        self._request = _Request(rid, bool(flags & FCGI_KEEP_CONN))
        return None

    def _refuse(self, rid: int, status: ProtocolStatus) -> None:
        self._out += encode_record(_END, rid, END_REQUEST_BODY.pack(0, status))
        if rid not in self._ended:
            self._ended.append(rid)

    def _handle_request_record(self, request: _Request, rtype: int, content: bytes) -> Event | None:
        stage = request.stage
        rid = request.request_id
        if rtype == _PARAMS:
            if stage is _Stage.DISCARD:
                return None
            if stage is not _Stage.PARAMS:
                raise ProtocolError(f"PARAMS record after the params stream ended (request {rid})")
            if content:
                if len(request.params) + len(content) > self.limits.max_params_size:
                    request.stage = _Stage.DISCARD
                    request.params = bytearray()
                    return RequestRefused(
                        rid,
                        f"params exceed {self.limits.max_params_size} bytes",
                        request.keep_conn,
                    )
                request.params += content
                return None
            params = decode_params(request.params)
            request.params = bytearray()
            request.stage = _Stage.STDIN
            return RequestReady(rid, params, request.keep_conn)
        if rtype == _STDIN:
            if stage is _Stage.STDIN:
                if content:
                    return StdinData(rid, content)
                request.stage = _Stage.STDIN_DONE
                return StdinEnd(rid)
            if stage is _Stage.DISCARD:
                return None
            if stage is _Stage.PARAMS:
                raise ProtocolError(f"STDIN record before the params stream ended (request {rid})")
            raise ProtocolError(f"STDIN record after the stdin stream ended (request {rid})")
        if rtype == _ABORT:
            if stage is _Stage.PARAMS:
                # Nothing was handed to the application yet: end it here.
                self._out += self.end_request(rid)
                return None
            return RequestAborted(rid)
        if rtype == _BEGIN:
            raise ProtocolError(f"BEGIN_REQUEST for request id {rid}, which is already open")
        if rtype == _DATA and stage is _Stage.DISCARD:
            return None
        raise ProtocolError(f"unexpected {_type_name(rtype)} record for request {rid}")

    # ---------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        """Answers queued by the protocol itself; send them before anything else."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def stdout(self, request_id: int, data: bytes | memoryview) -> bytes:
        return encode_records(_STDOUT, request_id, data)

    def stderr(self, request_id: int, data: bytes | memoryview) -> bytes:
        return encode_records(_STDERR, request_id, data)

    def end_request(
        self,
        request_id: int,
        app_status: int = 0,
        protocol_status: ProtocolStatus = ProtocolStatus.REQUEST_COMPLETE,
    ) -> bytes:
        """Close the stdout stream and end the request. The request id then becomes free."""
        request = self._request
        if request is not None and request.request_id == request_id:
            self._request = None
            self.unread_input = request.stage is not _Stage.STDIN_DONE
            if not request.keep_conn:
                self.must_close = True
        if request_id not in self._ended:
            self._ended.append(request_id)
        return encode_record(_STDOUT, request_id) + encode_record(
            _END, request_id, END_REQUEST_BODY.pack(app_status & 0xFFFFFFFF, protocol_status)
        )


def _type_name(rtype: int) -> str:
    try:
        return RecordType(rtype).name
    except ValueError:
        return f"type {rtype}"
