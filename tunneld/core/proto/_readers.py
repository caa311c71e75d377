"""Incremental readers (sans-IO): where one JSON message or proxy header ends in a byte stream."""

from __future__ import annotations

import re
from typing import Any

from tunneld.core._errors import LocalProtocolError, RemoteProtocolError

from ._codec import _json_type, _loads, decode_message, encode_message
from ._messages import _I64_LE, _U32_BE, MAX_MESSAGE_SIZE, ProxyHeader, StreamType

__all__ = ["JsonObjectReader", "ProxyHeaderReader", "encode_proxy_stream_prefix"]


# --------------------------------------------------------------------------------------------
# Incremental readers

_WS = b" \t\r\n"
# Outside strings only these bytes matter; inside, only the closing quote and escapes.
# Multi-byte UTF-8 sequences never contain ASCII bytes, so scanning bytes is safe.
_OUTSIDE_RE = re.compile(rb'[{}\[\]"]')
_INSIDE_RE = re.compile(rb'["\\]')


class JsonObjectReader:
    """Reads ONE JSON object from a byte stream, without waiting for EOF.

    Go peers send ``{...}\\n``; Rust peers send ``{...}`` and keep the stream open, so the end
    of the object must be found by tracking nesting outside strings.  Bytes after the object
    are kept in :attr:`leftover`.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, *, max_depth: int = 128) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        #: Bytes received after the end of the object (valid once :meth:`feed` returned it).
        self.leftover = b""
        #: The parsed object once complete.
        self.result: dict[str, Any] | None = None
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to scan
        self._start = -1  # index of the opening brace, -1 until seen
        self._depth = 0
        self._in_string = False
        self._escape = False  # the previous byte was a backslash inside a string

    def feed(self, data: bytes | bytearray | memoryview) -> dict[str, Any] | None:
        """Add bytes; return the object once it is complete, else None."""
        if self.result is not None:
            raise LocalProtocolError("JsonObjectReader.feed() after the object was complete")
        buf = self._buf
        buf += data
        n = len(buf)
        pos = self._pos
        if self._start < 0:
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos < n:
                if buf[pos] != 0x7B:  # "{"
                    raise RemoteProtocolError(f"expected a JSON object, got {bytes(buf[pos : pos + 16])!r}")
                self._start = pos
                self._depth = 1
                pos += 1
        end = -1
        if self._start >= 0:
            depth, in_string, escape = self._depth, self._in_string, self._escape
            while pos < n:
                if in_string:
                    if escape:
                        pos += 1  # the escaped byte, whatever it is
                        escape = False
                        continue
                    m = _INSIDE_RE.search(buf, pos)
                    if m is None:
                        pos = n
                        break
                    pos = m.end()
                    if buf[m.start()] == 0x22:  # '"'
                        in_string = False
                    else:
                        escape = True
                else:
                    m = _OUTSIDE_RE.search(buf, pos)
                    if m is None:
                        pos = n
                        break
                    pos = m.end()
                    c = buf[m.start()]
                    if c == 0x22:
                        in_string = True
                    elif c in b"{[":
                        depth += 1
                        if depth > self.max_depth:
                            raise RemoteProtocolError(
                                f"JSON message nested deeper than {self.max_depth} levels"
                            )
                    else:
                        # Any closer counts: for valid JSON the end is the same, and invalid
                        # JSON is rejected by the parser below.
                        depth -= 1
                        if depth == 0:
                            end = pos
                            break
            self._depth, self._in_string, self._escape = depth, in_string, escape
        self._pos = pos
        if end < 0:
            if n > self.max_size:
                raise RemoteProtocolError(f"JSON message larger than {self.max_size} bytes")
            return None
        if end > self.max_size:
            raise RemoteProtocolError(f"JSON message larger than {self.max_size} bytes")
        obj = _loads(buf[self._start : end])
        if not isinstance(obj, dict):  # cannot happen given the scan; kept as a guard
            raise RemoteProtocolError(f"expected a JSON object, got {_json_type(obj)}")
        self.leftover = bytes(buf[end:])
        self._buf = bytearray()  # drop the buffer: the reader is done
        self.result = obj
        return obj

    def feed_eof(self) -> None:
        """The stream ended: an error unless the object was complete."""
        if self.result is None:
            raise RemoteProtocolError("stream ended before a complete JSON object was received")


def encode_proxy_stream_prefix(h: ProxyHeader) -> bytes:
    """Stream type 3 (BE u32), int64 LE length, then the JSON :class:`ProxyHeader`.

    Send it as one write so that it lands in the SYN frame (Go reads the type with one Read).
    """
    body = encode_message(h)
    return _U32_BE.pack(StreamType.PROXY) + _I64_LE.pack(len(body)) + body


class ProxyHeaderReader:
    """Reads the proxy header of a type-3 stream; input starts AFTER the 4 type bytes."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        #: Payload bytes that followed the header (valid once :meth:`feed` returned it).
        self.leftover = b""
        #: The parsed header once complete.
        self.header: ProxyHeader | None = None
        self._buf = bytearray()
        self._length: int | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Add bytes; return the header once complete, else None."""
        if self.header is not None:
            raise LocalProtocolError("ProxyHeaderReader.feed() after the header was complete")
        self._buf += data
        if self._length is None:
            if len(self._buf) < _I64_LE.size:
                return None
            (length,) = _I64_LE.unpack_from(self._buf)
            if length < 0 or length > self.max_size:
                raise RemoteProtocolError(f"proxy header length {length} outside 0..{self.max_size}")
            self._length = length
        end = _I64_LE.size + self._length
        if len(self._buf) < end:
            return None
        header = decode_message(ProxyHeader, self._buf[_I64_LE.size : end])
        self.leftover = bytes(self._buf[end:])
        self._buf = bytearray()
        self.header = header
        return header

    def feed_eof(self) -> None:
        """The stream ended: an error unless the header was complete."""
        if self.header is None:
            raise RemoteProtocolError("stream ended before the proxy header was complete")
