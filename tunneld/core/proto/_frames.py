"""muxado framing: encode frame headers, decode a byte stream into frame events.

Theory of operation
-------------------
Every frame has an 8-byte big-endian header::

    0..2  payload length (uint24)
    3     type << 4 | flags
    4..7  stream id (31 bits; the high bit is reserved and masked off)

Types: RST (0), DATA (1), WNDINC (2), GOAWAY (3).  DATA flags: FIN = 0x1, SYN = 0x2.  There
is no preface: either side may send frames as soon as the carrier is up.

The decoder is streaming for DATA: a 256 KiB DATA frame that arrives over several reads is
handed up as several :class:`Data` events (``syn`` on the first piece, ``fin`` on the last),
each a slice of the input chunk.  That way no payload is buffered twice and the consumer sees
bytes as soon as they arrive.  Control frames (RST, WNDINC, GOAWAY) are small and are
reassembled before they are reported.

Limits are enforced here, not in the IO layer: a DATA frame longer than ``max_data_frame`` or
a control frame longer than ``MAX_CONTROL_FRAME`` is a :class:`RemoteProtocolError` with the
muxado FrameSizeError code.
"""

from __future__ import annotations

import enum
import struct

import attrs

from .._errors import RemoteProtocolError

__all__ = [
    "FrameType",
    "ErrorCode",
    "FLAG_FIN",
    "FLAG_SYN",
    "HEADER_SIZE",
    "MAX_CONTROL_FRAME",
    "Data",
    "Reset",
    "WindowUpdate",
    "GoAway",
    "FrameDecoder",
    "data_header",
    "encode_data",
    "encode_rst",
    "encode_wndinc",
    "encode_goaway",
]

HEADER_SIZE = 8
FLAG_FIN = 0x1
FLAG_SYN = 0x2
#: RST and WNDINC carry 4 bytes; GOAWAY 8 plus a debug string we cap at 64 KiB.
MAX_CONTROL_FRAME = 8 + 65536
_STREAM_MASK = 0x7FFFFFFF
_U32 = struct.Struct("!I")
_GOAWAY = struct.Struct("!II")


class FrameType(enum.IntEnum):
    RST = 0x0
    DATA = 0x1
    WNDINC = 0x2
    GOAWAY = 0x3


class ErrorCode(enum.IntEnum):
    """muxado error codes carried by RST and GOAWAY."""

    NONE = 0
    PROTOCOL = 1
    INTERNAL = 2
    FLOW_CONTROL = 3
    STREAM_CLOSED = 4
    STREAM_REFUSED = 5
    STREAM_CANCELLED = 6
    STREAM_RESET = 7
    FRAME_SIZE = 8
    ACCEPT_QUEUE_FULL = 9
    ENHANCE_YOUR_CALM = 10
    REMOTE_GONE_AWAY = 11
    STREAMS_EXHAUSTED = 12
    WRITE_TIMEOUT = 13
    SESSION_CLOSED = 14
    PEER_EOF = 15


@attrs.frozen(slots=True)
class Data:
    """A piece of a DATA frame: ``data`` may be empty (a bare SYN or FIN)."""

    stream_id: int
    data: bytes
    syn: bool
    fin: bool


@attrs.frozen(slots=True)
class Reset:
    """RST: the peer abandoned ``stream_id`` with ``code``."""

    stream_id: int
    code: int


@attrs.frozen(slots=True)
class WindowUpdate:
    """WNDINC: the peer consumed ``increment`` bytes of ``stream_id``."""

    stream_id: int
    increment: int


@attrs.frozen(slots=True)
class GoAway:
    """GOAWAY: the session is ending; treat as terminal."""

    last_stream_id: int
    code: int
    debug: bytes


def data_header(stream_id: int, length: int, *, syn: bool = False, fin: bool = False) -> bytes:
    """The 8-byte header of a DATA frame carrying ``length`` payload bytes."""
    flags = (FLAG_SYN if syn else 0) | (FLAG_FIN if fin else 0)
    return _pack_header(length, FrameType.DATA, flags, stream_id)


def encode_data(stream_id: int, payload: bytes = b"", *, syn: bool = False, fin: bool = False) -> bytes:
    """A whole DATA frame (header + payload) as one bytes object."""
    return data_header(stream_id, len(payload), syn=syn, fin=fin) + payload


def encode_rst(stream_id: int, code: int) -> bytes:
    return _pack_header(4, FrameType.RST, 0, stream_id) + _U32.pack(code)


def encode_wndinc(stream_id: int, increment: int) -> bytes:
    if not 0 < increment <= _STREAM_MASK:
        raise ValueError(f"window increment out of range: {increment}")
    return _pack_header(4, FrameType.WNDINC, 0, stream_id) + _U32.pack(increment)


def encode_goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    # Go writes length = 8 + len(debug) and Rust's decoder accepts that; Rust's own writer
    # is the odd one out (reference §2.2).  We always write 8 + len(debug).
    debug = debug[: MAX_CONTROL_FRAME - 8]
    return (
        _pack_header(8 + len(debug), FrameType.GOAWAY, 0, 0)
        + _GOAWAY.pack(last_stream_id & _STREAM_MASK, code)
        + debug
    )


def _pack_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    if length > 0xFFFFFF:
        raise ValueError(f"frame too long: {length}")
    return _HDR.pack((length << 8) | (ftype << 4) | flags, stream_id & _STREAM_MASK)


# length (24 bits) and type/flags (8 bits) share the first big-endian uint32.
_HDR = struct.Struct("!II")

Event = Data | Reset | WindowUpdate | GoAway


class FrameDecoder:
    """Turns bytes into frame events.  Feed with :meth:`receive_data`.

    Args:
        max_data_frame: the largest DATA payload accepted (the receive window bounds it too,
            but a frame longer than any window is rejected here, before it is buffered).
    """

    __slots__ = ("_buf", "_max_data", "_data_sid", "_data_left", "_data_fin", "_data_syn", "closed")

    def __init__(self, max_data_frame: int = 0xFFFFFF) -> None:
        self._buf = bytearray()
        self._max_data = max_data_frame
        # State of a DATA frame whose payload is still arriving.
        self._data_sid = 0
        self._data_left = 0
        self._data_fin = False
        self._data_syn = False
        #: Set once a GOAWAY was decoded; later bytes are ignored (reference: do not resync).
        self.closed = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Consume ``data`` and return the events it completes, in order.

        No reference to ``data`` outlives the call: every payload handed up is ``data`` itself
        (a ``bytes`` that is one whole payload piece) or a copy, so a borrowed buffer will do.
        """
        events: list[Event] = []
        if self.closed:
            return events
        view = memoryview(data)
        pos = 0
        end = len(data)
        buf = self._buf
        while True:
            if self._data_left:
                # Inside a DATA payload: hand up whatever part of it this chunk holds.
                n = min(self._data_left, end - pos)
                if n == 0:
                    break
                self._data_left -= n
                last = self._data_left == 0
                # A piece that is the whole input is handed up as is (no copy) when it is bytes.
                chunk = data if n == end and type(data) is bytes else bytes(view[pos : pos + n])
                pos += n
                events.append(Data(self._data_sid, chunk, self._data_syn, last and self._data_fin))
                self._data_syn = False
                continue
            # Need a header (possibly completing one left in _buf from the last call).
            if buf:
                need = HEADER_SIZE - len(buf)
                if need > 0:
                    take = min(need, end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < HEADER_SIZE:
                        break
                header = bytes(buf[:HEADER_SIZE])
                rest_in_buf = bytes(buf[HEADER_SIZE:])
            else:
                if end - pos < HEADER_SIZE:
                    buf += view[pos:end]
                    pos = end
                    break
                header = bytes(view[pos : pos + HEADER_SIZE])
                pos += HEADER_SIZE
                rest_in_buf = b""
            word, sid = _HDR.unpack(header)
            length = word >> 8
            ftype = (word >> 4) & 0xF
            flags = word & 0xF
            sid &= _STREAM_MASK
            if ftype == FrameType.DATA:
                if rest_in_buf:  # pragma: no cover - buf only ever holds a partial header
                    raise AssertionError("decoder buffer invariant")
                buf.clear()
                if sid == 0:
                    raise RemoteProtocolError("DATA frame on stream 0", code=ErrorCode.PROTOCOL)
                if length > self._max_data:
                    raise RemoteProtocolError(
                        f"DATA frame of {length} bytes exceeds {self._max_data}", code=ErrorCode.FRAME_SIZE
                    )
                syn = bool(flags & FLAG_SYN)
                fin = bool(flags & FLAG_FIN)
                if length == 0:
                    events.append(Data(sid, b"", syn, fin))
                    continue
                self._data_sid, self._data_left, self._data_syn, self._data_fin = sid, length, syn, fin
                continue
            # Control frame: reassemble header + payload in buf.
            if length > MAX_CONTROL_FRAME:
                raise RemoteProtocolError(
                    f"control frame of {length} bytes is too long", code=ErrorCode.FRAME_SIZE
                )
            if not buf:
                buf += header
            have = len(buf) - HEADER_SIZE
            take = min(length - have, end - pos)
            if take > 0:
                buf += view[pos : pos + take]
                pos += take
            if len(buf) - HEADER_SIZE < length:
                break
            payload = bytes(buf[HEADER_SIZE:])
            buf.clear()
            events.append(self._control(ftype, sid, payload))
            if self.closed:
                break
        view.release()
        return events

    def _control(self, ftype: int, sid: int, payload: bytes) -> Event:
        if ftype == FrameType.RST:
            if len(payload) != 4 or sid == 0:
                raise RemoteProtocolError("malformed RST frame", code=ErrorCode.PROTOCOL)
            return Reset(sid, _U32.unpack(payload)[0])
        if ftype == FrameType.WNDINC:
            if len(payload) != 4 or sid == 0:
                raise RemoteProtocolError("malformed WNDINC frame", code=ErrorCode.PROTOCOL)
            inc = _U32.unpack(payload)[0] & _STREAM_MASK
            if inc == 0:
                raise RemoteProtocolError("WNDINC of zero", code=ErrorCode.PROTOCOL)
            return WindowUpdate(sid, inc)
        if ftype == FrameType.GOAWAY:
            self.closed = True
            if len(payload) < 8:
                # Rust peers may write a short length (reference §2.2); it is terminal anyway.
                return GoAway(0, ErrorCode.NONE, b"")
            last, code = _GOAWAY.unpack(payload[:8])
            return GoAway(last & _STREAM_MASK, code, payload[8:])
        raise RemoteProtocolError(f"unknown frame type {ftype}", code=ErrorCode.PROTOCOL)
