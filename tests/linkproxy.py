"""A TCP proxy between an agent and its edge that can break the link in the two ways networks do."""

from __future__ import annotations

import socket
import struct
from functools import partial

import attrs
import trio


@attrs.define(eq=False)
class LinkProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``.

    :meth:`freeze` makes every open connection go silent (no FIN, no RST: a NAT that forgot the
    flow, a pulled cable) — only heartbeats can tell.  :meth:`cut` resets them (an edge or
    router restart).  Connections made afterwards are forwarded normally.
    """

    target: int
    port: int = 0
    connections: int = 0
    _frozen: trio.Event = attrs.field(factory=trio.Event)
    _cut: trio.Event = attrs.field(factory=trio.Event)

    async def start(self, nursery: trio.Nursery) -> LinkProxy:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return self

    def freeze(self) -> None:
        self._frozen.set()
        self._frozen = trio.Event()

    def cut(self) -> None:
        self._cut.set()
        self._cut = trio.Event()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        frozen, cut = self._frozen, self._cut
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        what: list[str] = []

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
            try:
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # One end reset (or went away before our FIN): pass the reset on to the other,
                # as a NAT would, instead of failing the test's nursery.
                what.append("reset")
                scope.cancel()

        async def on(event: trio.Event, scope: trio.CancelScope, what: list[str], name: str) -> None:
            await event.wait()
            what.append(name)
            scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server, nursery.cancel_scope)
                nursery.start_soon(pump, server, client, nursery.cancel_scope)
                nursery.start_soon(on, frozen, nursery.cancel_scope, what, "freeze")
                nursery.start_soon(on, cut, nursery.cancel_scope, what, "cut")
            if what == ["freeze"]:
                # Keep both sockets open and silent until the test ends.
                await cut.wait()
        finally:
            for stream in (client, server):
                # SO_LINGER 0: close with RST, as a crashed peer's kernel would.
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await trio.aclose_forcefully(stream)
