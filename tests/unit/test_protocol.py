"""The sans-IO protocol layer: records, name-values, the connection state machine."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgi_engine.client import encode_request
from fcgi_engine.protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Limits,
    ProtocolError,
    ProtocolStatus,
    RecordType,
    RequestAborted,
    RequestReady,
    RequestRefused,
    Role,
    StdinData,
    StdinEnd,
    decode_name_values,
    encode_name_values,
    encode_record,
)
from fcgi_engine.protocol.constants import BEGIN_REQUEST_BODY, HEADER

PARAMS = {"REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/x", "QUERY_STRING": "a=1"}


def events(conn: Connection) -> list[object]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def parse_records(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        version, rtype, rid, clen, plen = HEADER.unpack_from(data, pos)
        assert version == 1
        out.append((rtype, rid, data[pos + 8 : pos + 8 + clen]))
        pos += 8 + clen + plen
    return out


def begin(rid: int = 1, role: int = Role.RESPONDER, keep: bool = False) -> bytes:
    return encode_record(RecordType.BEGIN_REQUEST, rid, BEGIN_REQUEST_BODY.pack(role, int(keep)))


def test_whole_request_in_one_read() -> None:
    conn = Connection()
    conn.receive_data(encode_request(1, PARAMS, b"hello", keep_conn=True))
    evs = events(conn)
    assert evs == [RequestReady(1, PARAMS, True), StdinData(1, b"hello"), StdinEnd(1)]


def test_byte_at_a_time() -> None:
    conn = Connection()
    got = []
    for byte in encode_request(7, PARAMS, b"body"):
        conn.receive_data(bytes([byte]))
        got += events(conn)
    assert got == [RequestReady(7, PARAMS, False), StdinData(7, b"body"), StdinEnd(7)]


def test_name_value_lengths_one_and_four_bytes() -> None:
    pairs = [(b"A", b"x" * 127), (b"B" * 128, b""), (b"C", b"y" * 70000)]
    encoded = encode_name_values(pairs)
    assert encoded[0] == 1 and encoded[1] == 127
    assert decode_name_values(encoded) == pairs


def test_name_value_pair_spanning_params_records() -> None:
    nv = encode_name_values([(b"HTTP_X", b"v" * 1000)])
    conn = Connection()
    conn.receive_data(begin(1))
    for i in range(0, len(nv), 7):
        conn.receive_data(encode_record(RecordType.PARAMS, 1, nv[i : i + 7]))
    conn.receive_data(encode_record(RecordType.PARAMS, 1) + encode_record(RecordType.STDIN, 1))
    evs = events(conn)
    assert evs[0] == RequestReady(1, {"HTTP_X": "v" * 1000}, False)


def test_padding_is_skipped() -> None:
    content = b"abc"
    record = HEADER.pack(1, RecordType.STDIN, 1, len(content), 5) + content + b"\0" * 5
    conn = Connection()
    conn.receive_data(encode_request(1, {}, b"")[:-8])  # everything but the final empty STDIN
    conn.receive_data(record + encode_record(RecordType.STDIN, 1))
    assert events(conn)[1:] == [StdinData(1, b"abc"), StdinEnd(1)]


def test_get_values_answered_and_unknown_names_omitted() -> None:
    conn = Connection(Limits(max_conns=4, max_reqs=4))
    query = encode_name_values(
        [(b"FCGI_MAX_CONNS", b""), (b"FCGI_MPXS_CONNS", b""), (b"NOPE", b"")]
    )
    conn.receive_data(encode_record(RecordType.GET_VALUES, 0, query))
    assert events(conn) == []
    [(rtype, rid, content)] = parse_records(conn.data_to_send())
    assert (rtype, rid) == (RecordType.GET_VALUES_RESULT, 0)
    assert dict(decode_name_values(content)) == {b"FCGI_MAX_CONNS": b"4", b"FCGI_MPXS_CONNS": b"0"}


def test_unknown_management_type_answered() -> None:
    conn = Connection()
    conn.receive_data(encode_record(42, 0, b"zz"))
    assert events(conn) == []
    [(rtype, rid, content)] = parse_records(conn.data_to_send())
    assert rtype == RecordType.UNKNOWN_TYPE and rid == 0 and content[0] == 42


@pytest.mark.parametrize("role", [Role.AUTHORIZER, Role.FILTER, 99])
def test_other_roles_refused_with_unknown_role(role: int) -> None:
    conn = Connection()
    conn.receive_data(encode_request(3, PARAMS, b"x", role=role))
    assert events(conn) == []
    records = parse_records(conn.data_to_send())
    assert records == [
        (RecordType.END_REQUEST, 3, struct.pack("!LB3x", 0, ProtocolStatus.UNKNOWN_ROLE))
    ]
    # The connection still serves a responder afterwards.
    conn.receive_data(encode_request(4, PARAMS, b""))
    assert isinstance(events(conn)[0], RequestReady)


def test_second_concurrent_request_refused_cant_mpx() -> None:
    conn = Connection()
    conn.receive_data(begin(1, keep=True) + begin(2, keep=True))
    conn.receive_data(encode_request(2, PARAMS, b"ignored")[16:])  # request 2's params + stdin
    assert events(conn) == []
    records = parse_records(conn.data_to_send())
    assert records == [
        (RecordType.END_REQUEST, 2, struct.pack("!LB3x", 0, ProtocolStatus.CANT_MPX_CONN))
    ]
    conn.receive_data(encode_request(1, PARAMS, b"")[16:])
    assert events(conn)[0] == RequestReady(1, PARAMS, True)


def test_request_id_reused_after_end() -> None:
    conn = Connection()
    conn.receive_data(encode_request(1, PARAMS, b"", keep_conn=True))
    assert len(events(conn)) == 2
    out = conn.end_request(1)
    assert [r[0] for r in parse_records(out)] == [RecordType.STDOUT, RecordType.END_REQUEST]
    assert not conn.must_close
    conn.receive_data(encode_request(1, PARAMS, b"again", keep_conn=True))
    assert events(conn)[1] == StdinData(1, b"again")


def test_records_of_an_ended_request_are_ignored() -> None:
    conn = Connection()
    full = encode_request(1, PARAMS, b"unread body", keep_conn=True)
    conn.receive_data(full[: -8 - 19])  # up to the params end
    assert isinstance(events(conn)[0], RequestReady)
    conn.end_request(1)
    conn.receive_data(full[-8 - 19 :] + encode_record(RecordType.ABORT_REQUEST, 1))
    assert events(conn) == []


def test_keep_conn_off_means_close_after_end() -> None:
    conn = Connection()
    conn.receive_data(encode_request(1, PARAMS, b""))
    events(conn)
    conn.end_request(1)
    assert conn.must_close


def test_abort_during_body() -> None:
    conn = Connection()
    conn.receive_data(encode_request(1, PARAMS, b"")[:-8])
    conn.receive_data(encode_record(RecordType.ABORT_REQUEST, 1))
    assert events(conn)[-1] == RequestAborted(1)


def test_abort_before_params_end_answered_by_the_protocol() -> None:
    conn = Connection()
    conn.receive_data(begin(1) + encode_record(RecordType.ABORT_REQUEST, 1))
    assert events(conn) == []
    [(rtype, rid, _)] = parse_records(conn.data_to_send())[-1:]
    assert (rtype, rid) == (RecordType.END_REQUEST, 1)


def test_params_limit_refuses_request_cleanly() -> None:
    conn = Connection(Limits(max_params_size=100))
    conn.receive_data(encode_request(1, {"HTTP_BIG": "x" * 500}, b"body", keep_conn=True))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], RequestRefused)
    conn.end_request(1)
    conn.receive_data(encode_request(1, PARAMS, b""))
    assert isinstance(events(conn)[0], RequestReady)


@pytest.mark.parametrize(
    "data, message",
    [
        (HEADER.pack(2, 1, 1, 8, 0) + b"\0" * 8, "version"),
        (encode_record(RecordType.STDIN, 9, b"x"), "unknown request id"),
        (encode_record(RecordType.PARAMS, 5, b""), "unknown request id"),
        (begin(1) + encode_record(RecordType.STDIN, 1, b"early"), "before the params"),
        (begin(1) + begin(1), "already open"),
        (encode_record(RecordType.STDOUT, 1, b"x"), "unexpected"),
        (encode_record(RecordType.BEGIN_REQUEST, 1, b"\0\1"), "BEGIN_REQUEST body"),
        (
            begin(1)
            + encode_record(RecordType.PARAMS, 1, b"\x05\x05ab")
            + encode_record(RecordType.PARAMS, 1),
            "only 2 remain",
        ),
    ],
)
def test_malformed_input_raises_protocol_error(data: bytes, message: str) -> None:
    conn = Connection()
    conn.receive_data(data)
    with pytest.raises(ProtocolError, match=message):
        events(conn)
    with pytest.raises(ProtocolError):
        conn.next_event()  # stays broken


def test_eof_yields_connection_closed() -> None:
    conn = Connection()
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed()]


def test_large_output_split_into_records() -> None:
    conn = Connection()
    data = b"z" * 200000
    records = parse_records(conn.stdout(1, data))
    assert all(r[0] == RecordType.STDOUT for r in records)
    assert all(len(r[2]) <= 65535 for r in records)
    assert b"".join(r[2] for r in records) == data
    assert conn.stdout(1, b"") == b""


# ---------------------------------------------------------------- properties


LATIN1 = st.characters(max_codepoint=255)
stream_requests = st.lists(
    st.tuples(
        st.dictionaries(
            st.text(LATIN1, min_size=1, max_size=20), st.text(LATIN1, max_size=300), max_size=8
        ),
        st.binary(max_size=3000),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(
    requests=stream_requests, cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=30)
)
def test_any_split_parses_the_same(
    requests: list[tuple[dict[str, str], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_request(1, p, b, keep_conn=True) for p, b in requests)

    def run(chunks: list[bytes]) -> list[object]:
        conn = Connection()
        got: list[object] = []
        for chunk in chunks:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA:
                got.append(ev)
                if isinstance(ev, StdinEnd):
                    conn.end_request(ev.request_id)
        return got

    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    whole = run([stream])
    assert run(chunks) == whole
    ready = [e for e in whole if isinstance(e, RequestReady)]
    assert [e.params for e in ready] == [p for p, _ in requests]
    body = b"".join(e.data for e in whole if isinstance(e, StdinData))
    assert body == b"".join(b for _, b in requests)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    conn = Connection(Limits(max_params_size=4096))
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        events(conn)
    except ProtocolError:
        pass
    conn.data_to_send()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_name_value_decoder_never_trusts_declared_lengths(data: bytes) -> None:
    # A 4-byte length near 2**31 must fail fast, not allocate.
    try:
        pairs = decode_name_values(b"\xff\xff\xff\xff\x01" + data)
    except ProtocolError:
        return
    assert sum(len(n) + len(v) for n, v in pairs) <= len(data) + 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=10))
def test_fast_params_decoder_matches_the_general_one(pairs: list[tuple[bytes, bytes]]) -> None:
    from fcgi_engine.protocol.codec import decode_params

    encoded = encode_name_values(pairs)
    expected = {n.decode("latin-1"): v.decode("latin-1") for n, v in decode_name_values(encoded)}
    assert decode_params(encoded) == expected
    for cut in range(1, min(len(encoded), 12)):
        try:
            decode_params(encoded[:-cut])
        except ProtocolError:
            pass


def test_a_moved_connection_still_ignores_records_of_ended_requests() -> None:
    from fcgi_engine.handoff import decode_handoff, encode_handoff

    old = Connection()
    full = encode_request(1, PARAMS, b"body the app never read", keep_conn=True)
    old.receive_data(full[:60])
    while old.next_event() is not NEED_DATA:
        pass
    old.end_request(1)
    ended, leftover = decode_handoff(encode_handoff(old.ended_ids, old.leftover))
    assert ended == [1]
    new = Connection(ended=ended)
    new.receive_data(leftover + full[60:] + encode_request(1, PARAMS, b"", keep_conn=True))
    assert isinstance(new.next_event(), RequestReady)


def test_unread_input_tracks_whether_the_web_server_is_still_sending() -> None:
    conn = Connection()
    full = encode_request(1, PARAMS, b"a body nobody reads")
    cut = full.index(b"a body nobody reads") - 8
    conn.receive_data(full[:cut])
    assert isinstance(conn.next_event(), RequestReady)
    conn.end_request(1)
    assert conn.unread_input and conn.must_close
    conn.receive_data(full[cut:])
    assert conn.next_event() is NEED_DATA
    assert not conn.unread_input
