"""Stream wrappers shared by the core and the plugins."""

from __future__ import annotations

from typing import Any

import trio


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``stream`` whose first reads return ``prefix``: bytes already read from it.

    Used wherever bytes are peeked before deciding who handles a stream: the edge sniffing
    an agent's carrier or a ClientHello's SNI, the agent taking a proxy header or a PROXY
    protocol line off the front.  Whatever the inner stream offers beyond ``trio.abc.Stream``
    (half-close, ``reset``, ``send_all_parts``, ``receive_parts``) passes through;
    ``transport_stream`` lets ``peer_addr`` see the socket underneath.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = stream
        self.prefix = prefix
        send_parts = getattr(stream, "send_all_parts", None)
        if send_parts is not None:
            self.send_all_parts = send_parts
        # The inner stream's bound method (kept here, not a method of ours bound to self, which
        # would make every proxied connection a reference cycle for the collector).
        self._inner_parts = getattr(stream, "receive_parts", None)

    async def receive_parts(self, max_bytes: int) -> list[bytes]:
        """The prefix, then the inner stream's ``receive_parts`` (a mux stream's frames as they
        came, which a relay hands to ``writev`` unjoined); one piece per call over any other
        stream.  An empty list at end of stream."""
        if self.prefix or self._inner_parts is None:
            data = await self.receive_some(max_bytes)
            return [data] if data else []
        return await self._inner_parts(max_bytes)  # type: ignore[no-any-return]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.transport_stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        inner: Any = self.transport_stream
        await inner.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    def reset(self, *args: Any) -> None:
        """Abort the inner stream (a mux stream's RST), if it can be reset."""
        reset = getattr(self.transport_stream, "reset", None)
        if reset is not None:
            reset(*args)

    @property
    def eof_received(self) -> bool:
        return bool(getattr(self.transport_stream, "eof_received", False)) and not self.prefix
