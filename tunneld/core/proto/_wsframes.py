"""WebSocket framing (RFC 6455 section 5) for the WebSocket carrier, sans I/O.

The carrier sends the mux's bytes as binary frames and reads them back as one byte stream:
message boundaries mean nothing to it, so payloads are handed on as they arrive, never
gathered into messages.  What it refuses, as the RFC says a receiver must: reserved bits or
opcodes, a client frame without a mask or a server frame with one, control frames that are
fragmented or longer than 125 bytes, lengths not in their shortest form or with the top bit
set, a continuation outside a fragmented message, a new message inside one, malformed close
frames.  Text frames are refused too: the carrier is binary.
"""

from __future__ import annotations

from typing import Final

from .._errors import RemoteProtocolError

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_DATA_OPS: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPS: Final = frozenset({OP_CLOSE, OP_PING, OP_PONG})

#: What a control frame may carry (section 5.5).
MAX_CONTROL_PAYLOAD: Final = 125
#: The longest header: 2 bytes, an 8-byte length, a 4-byte key.
MAX_HEADER: Final = 14
#: Close status codes a peer may send (section 7.4: 1004-1006 and 1015 are never sent).
_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002


_XOR: Final = [bytes(b ^ k for b in range(256)) for k in range(256)]


def mask_py(data: bytes | bytearray | memoryview, key: bytes, offset: int) -> bytes:
    """``data`` XOR ``key`` repeated, starting at ``key[offset % 4]`` (RFC 6455 5.3)."""
    if len(key) != 4:
        raise ValueError("a masking key is 4 bytes")
    out = bytearray(data)
    for lane in range(4):
        k = key[(offset + lane) & 3]
        if k:
            out[lane::4] = out[lane::4].translate(_XOR[k])
    return bytes(out)


try:
    from ._wsmask import mask as mask
except ImportError:  # built without a C compiler: the same in pure Python
    mask = mask_py

#: Whether the compiled masking is in use.
COMPILED_MASK: Final = mask is not mask_py


def frame_header(opcode: int, length: int, key: bytes | None = None) -> bytes:
    """The header of one final frame of ``length`` bytes; ``key`` masks it (a client's frame)."""
    first = 0x80 | opcode
    bit = 0x80 if key is not None else 0
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 1 << 16:
        head = bytes((first, bit | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + length.to_bytes(8, "big")
    return head + key if key is not None else head


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code, then the reason cut to fit (on a character boundary)."""
    text = reason.encode()[:MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode()
    return code.to_bytes(2, "big") + text


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """A close frame's code (None if it has none) and reason; RemoteProtocolError if malformed."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise RemoteProtocolError("WebSocket close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _CLOSE_CODES and not 3000 <= code <= 4999:
        raise RemoteProtocolError(f"WebSocket close frame with invalid status code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("WebSocket close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Turns received bytes into payload pieces and control frames.

    Feed bytes with :meth:`feed` once :meth:`next` has answered None (all of the last input
    used); :meth:`next` answers ``(OP_BINARY, piece)`` for each piece of a data frame's payload
    as it arrives (unmasked) and ``(opcode, payload)`` for a whole control frame.  It holds at
    most a header and a control frame of input besides the piece being handed on.
    """

    def __init__(self, *, masked: bool, max_frame: int) -> None:
        #: Frames from a client are masked (the server's reader); from a server, not.
        self._masked = masked
        self._max_frame = max_frame
        self._data = memoryview(b"")  # the last input, not yet used
        self._partial = bytearray()  # the start of a header or control frame split across inputs
        self._left = 0  # payload bytes of the current data frame not yet handed on
        self._key = b""
        self._key_offset = 0
        self._fragmented = False  # a message whose last frame has not come
        self.closed = False  # a close frame was read: nothing may follow it

    @property
    def in_frame(self) -> bool:
        """Whether input ended part-way through a frame."""
        return bool(self._left or self._partial or self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._data:
            raise RuntimeError("feed() before next() used the last input")
        if self.closed and data:
            raise RemoteProtocolError("WebSocket data after the close frame")
        self._data = memoryview(data)

    def next(self, max_bytes: int) -> tuple[int, bytes] | None:
        """The next payload piece (at most ``max_bytes``) or control frame; None: feed more."""
        while True:
            if self._left:
                data = self._data
                if not data:
                    return None
                n = min(self._left, len(data), max_bytes)
                piece = data[:n]
                self._data = data[n:]
                self._left -= n
                if self._masked:
                    out = mask(piece, self._key, self._key_offset)
                    self._key_offset = (self._key_offset + n) & 3
                else:
                    out = bytes(piece)
                return OP_BINARY, out
            event = self._next_header()
            if event is None:
                return None
            if event[0] != OP_CONTINUATION:
                return event

    def _next_header(self) -> tuple[int, bytes] | None:
        """Read one header (and a control frame's payload); None if input ends first.

        Answers a control frame, or ``(OP_CONTINUATION, b"")`` once a data frame's payload
        is due.
        """
        if self.closed and (self._partial or self._data):
            raise RemoteProtocolError("WebSocket data after the close frame")
        want = MAX_HEADER + MAX_CONTROL_PAYLOAD - len(self._partial)
        view = bytes(self._partial) + bytes(self._data[:want]) if self._partial else self._data[:want]
        total = len(view)
        if total < 2:
            return self._hold(view)
        first, second = view[0], view[1]
        if first & 0x70:
            raise RemoteProtocolError("WebSocket frame with reserved bits set (no extension was agreed)")
        opcode = first & 0x0F
        fin = bool(first & 0x80)
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise RemoteProtocolError(f"WebSocket frame with reserved opcode {opcode:#x}")
        if bool(second & 0x80) != self._masked:
            raise RemoteProtocolError("unmasked WebSocket frame from the client" if self._masked
                                      else "masked WebSocket frame from the server")
        length = second & 0x7F
        size = 2
        if length == 126:
            if total < 4:
                return self._hold(view)
            length = int.from_bytes(view[2:4], "big")
            size = 4
            if length < 126:
                raise RemoteProtocolError("WebSocket frame length not in its shortest form")
        elif length == 127:
            if total < 10:
                return self._hold(view)
            length = int.from_bytes(view[2:10], "big")
            size = 10
            if length >> 63:
                raise RemoteProtocolError("WebSocket frame length with the top bit set")
            if length < 1 << 16:
                raise RemoteProtocolError("WebSocket frame length not in its shortest form")
        if self._masked:
            size += 4
        if opcode in _CONTROL_OPS:
            if not fin:
                raise RemoteProtocolError("fragmented WebSocket control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise RemoteProtocolError(f"WebSocket control frame of {length} bytes (at most 125)")
            if total < size + length:
                return self._hold(view)
            payload = bytes(view[size:size + length])
            if self._masked:
                payload = mask(payload, bytes(view[size - 4:size]), 0)
            self._consume(size + length)
            if opcode == OP_CLOSE:
                parse_close(payload)
                self.closed = True
            return opcode, payload
        if total < size:
            return self._hold(view)
        if opcode == OP_TEXT:
            raise RemoteProtocolError("text message on the tunnel carrier; expected binary")
        if opcode == OP_CONTINUATION and not self._fragmented:
            raise RemoteProtocolError("WebSocket continuation frame outside a fragmented message")
        if opcode != OP_CONTINUATION and self._fragmented:
            raise RemoteProtocolError("new WebSocket message inside a fragmented one")
        if length > self._max_frame:
            raise RemoteProtocolError(f"WebSocket frame of {length} bytes (at most {self._max_frame})")
        self._fragmented = not fin
        if self._masked:
            self._key = bytes(view[size - 4:size])
            self._key_offset = 0
        self._left = length
        self._consume(size)
        return OP_CONTINUATION, b""

    def _hold(self, view: bytes | memoryview) -> tuple[int, bytes] | None:
        """Keep what there is of a header or control frame until more comes (answers None)."""
        self._partial[:] = view
        self._data = memoryview(b"")
        return None

    def _consume(self, n: int) -> None:
        """``n`` bytes of ``_partial`` + ``_data`` were used."""
        used = n - len(self._partial)
        self._partial.clear()
        self._data = self._data[used:]
