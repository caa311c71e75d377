"""A stream with bytes that were already read put back in front."""

from __future__ import annotations

import trio


class ReplayStream(trio.abc.HalfCloseableStream):
    """``stream`` whose first reads return ``prefix``: bytes peeked from it earlier.

    The edge peeks at the ClientHello to route by SNI; when the edge itself terminates the
    connection after all, its TLS engine must see those bytes again.  The agent does the same
    after taking a PROXY header off the front.  ``transport_stream`` lets ``peer_addr`` and
    friends see through the wrapper.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
