"""Record and name-value codecs (FastCGI 1.0 sections 3.3 and 3.4)."""

from __future__ import annotations

from collections.abc import Iterable

from fcgi_engine.protocol.constants import (
    FCGI_VERSION_1,
    HEADER,
    MAX_CONTENT_LEN,
    MAX_OUTPUT_CHUNK,
)
from fcgi_engine.protocol.errors import ProtocolError

_pack_header = HEADER.pack


def encode_record(record_type: int, request_id: int, content: bytes = b"") -> bytes:
    """One record; `content` must fit in one (at most 65535 bytes)."""
    if len(content) > MAX_CONTENT_LEN:
        raise ValueError(f"record content of {len(content)} bytes exceeds {MAX_CONTENT_LEN}")
    return _pack_header(FCGI_VERSION_1, record_type, request_id, len(content), 0) + content


def encode_records(record_type: int, request_id: int, content: bytes | memoryview) -> bytes:
    """A stream's data as as many records as it needs (none for empty content)."""
    size = len(content)
    if size <= MAX_OUTPUT_CHUNK:
        if not size:
            return b""
        return _pack_header(FCGI_VERSION_1, record_type, request_id, size, 0) + bytes(content)
    view = memoryview(content)
    parts: list[bytes | memoryview] = []
    for start in range(0, size, MAX_OUTPUT_CHUNK):
        chunk = view[start : start + MAX_OUTPUT_CHUNK]
        parts.append(_pack_header(FCGI_VERSION_1, record_type, request_id, len(chunk), 0))
        parts.append(chunk)
    return b"".join(parts)


def _encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n > 0x7FFFFFFF:
        raise ValueError("name-value length exceeds 2**31-1")
    return (n | 0x80000000).to_bytes(4, "big")


def encode_name_values(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Name-value pairs, each length in 1 byte (<128) or 4 bytes."""
    out = bytearray()
    for name, value in pairs:
        out += _encode_length(len(name))
        out += _encode_length(len(value))
        out += name
        out += value
    return bytes(out)


def decode_name_values(data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
    """Decode a complete name-value block; a pair cut short is a ProtocolError."""
    pairs: list[tuple[bytes, bytes]] = []
    buf = bytes(data)
    pos = 0
    end = len(buf)
    while pos < end:
        lengths = []
        for _ in range(2):
            if pos >= end:
                raise ProtocolError("name-value pair cut short in its lengths")
            first = buf[pos]
            if first < 0x80:
                lengths.append(first)
                pos += 1
            else:
                if pos + 4 > end:
                    raise ProtocolError("name-value pair cut short in a 4-byte length")
                lengths.append(int.from_bytes(buf[pos : pos + 4], "big") & 0x7FFFFFFF)
                pos += 4
        name_len, value_len = lengths
        # Compare with what is there before slicing: a declared length never sizes an allocation.
        if name_len + value_len > end - pos:
            raise ProtocolError(
                f"name-value pair declares {name_len}+{value_len} bytes, only {end - pos} remain"
            )
        name = buf[pos : pos + name_len]
        pos += name_len
        pairs.append((name, buf[pos : pos + value_len]))
        pos += value_len
    return pairs


def decode_params(data: bytes | bytearray) -> dict[str, str]:
    """Decode a complete name-value block straight to latin-1 strings (the hot path).

    Latin-1 maps each byte to one character, so the block is decoded once and sliced: the
    lengths, counted in bytes, are the same in characters.
    """
    raw = bytes(data)
    text = raw.decode("latin-1")
    end = len(raw)
    pos = 0
    out: dict[str, str] = {}
    try:
        while pos < end:
            name_len = raw[pos]
            if name_len < 0x80:
                pos += 1
            else:
                name_len = int.from_bytes(raw[pos : pos + 4], "big") & 0x7FFFFFFF
                pos += 4
            value_len = raw[pos]
            if value_len < 0x80:
                pos += 1
            else:
                value_len = int.from_bytes(raw[pos : pos + 4], "big") & 0x7FFFFFFF
                pos += 4
            stop = pos + name_len + value_len
            if stop > end:
                raise ProtocolError(
                    f"name-value pair declares {name_len}+{value_len} bytes, "
                    f"only {end - pos} remain"
                )
            out[text[pos : pos + name_len]] = text[pos + name_len : stop]
            pos = stop
    except IndexError:
        raise ProtocolError("name-value pair cut short in its lengths") from None
    return out
