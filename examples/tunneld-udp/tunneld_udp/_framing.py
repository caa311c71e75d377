"""Datagrams on a byte stream: each one prefixed with its length, 2 bytes big-endian (sans-IO).

A UDP flow crosses the agent link as one proxy stream, a byte stream, so datagram boundaries
must be written into it.  A 2-byte length is enough: no UDP payload over IPv4 exceeds
:data:`MAX_DATAGRAM` bytes, and a larger length on the stream can only be a broken peer.

No I/O here and no trio: bytes in, datagrams out.  The decoder holds at most one unfinished
datagram (``2 + MAX_DATAGRAM`` bytes) beside the bytes last fed to it.
"""

from __future__ import annotations

#: Largest datagram carried: 65535 minus the IPv4 (20) and UDP (8) headers.  Larger ones (IPv6
#: allows 65527) are dropped where they are read, never framed.
MAX_DATAGRAM = 65507
#: Bytes of the length prefix.
HEADER = 2


class FramingError(ValueError):
    """A datagram too large to frame, or a length on the stream no datagram can have."""


def encode(datagram: bytes) -> bytes:
    """``datagram`` with its length prefix; FramingError if longer than :data:`MAX_DATAGRAM`."""
    size = len(datagram)
    if size > MAX_DATAGRAM:
        raise FramingError(f"a datagram of {size} bytes is larger than {MAX_DATAGRAM}")
    return size.to_bytes(HEADER, "big") + datagram


class Decoder:
    """Turns the bytes of a stream back into datagrams, whatever the chunks it arrives in."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Add ``data``; return the datagrams it completes (maybe none), in order.

        Raises FramingError on a length over :data:`MAX_DATAGRAM`: the stream cannot be
        trusted past it, and the decoder should be dropped with the stream.
        """
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        pos = 0
        end = len(buffer)
        while end - pos >= HEADER:
            size = int.from_bytes(buffer[pos:pos + HEADER], "big")
            if size > MAX_DATAGRAM:
                raise FramingError(f"length {size} on the stream exceeds any datagram ({MAX_DATAGRAM})")
            if end - pos - HEADER < size:
                break
            start = pos + HEADER
            datagrams.append(bytes(buffer[start:start + size]))
            pos = start + size
        # One deletion per feed, not per datagram: a burst of small datagrams stays linear.
        del buffer[:pos]
        return datagrams

    @property
    def pending(self) -> int:
        """Bytes held of a datagram not complete yet (0: the stream is at a datagram boundary)."""
        return len(self._buffer)
