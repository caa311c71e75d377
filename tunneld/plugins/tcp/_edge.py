"""Edge side of TCP tunnels: a public port of its own per tunnel."""

from __future__ import annotations

import errno
import logging
import random
from typing import Any

import attrs
import trio

from tunneld.core import (
    AgentSession,
    Code,
    Edge,
    TunnelInfo,
    TunnelRejected,
    forward,
    open_listeners,
    peer_addr,
    set_nodelay,
)

log = logging.getLogger("tunneld.tcp")
access_log = logging.getLogger("tunneld.access")

#: Random ports tried before the range is declared full.
PORT_ATTEMPTS = 64


def requested_port(opts: dict[str, Any]) -> int | None:
    for key, value in opts.items():
        if key.lower() in ("addr", "url") and isinstance(value, str) and value.strip():
            text = value.strip().split("://", 1)[-1]
            port = text.rsplit(":", 1)[-1]
            if not port.isdigit():
                raise TunnelRejected(f"cannot read a port from {value!r}", Code.ADDRESS_NOT_ALLOWED)
            return int(port)
    return None


@attrs.define(eq=False)
class TcpEdgeTunnel:
    edge: Edge
    session: AgentSession
    tunnel_id: str
    port: int | None

    async def _bind(self) -> list[trio.SocketListener]:
        cfg = self.edge.config
        low, high = cfg.tcp_ports
        if self.port is not None:
            if not low <= self.port <= high:
                raise TunnelRejected(f"port {self.port} is outside this edge's range {low}-{high}",
                                     Code.ADDRESS_NOT_ALLOWED)
            candidates = [self.port]
        else:
            candidates = random.sample(range(low, high + 1), min(PORT_ATTEMPTS, high - low + 1))
        for port in candidates:
            if port in self.edge.routes.ports:
                continue
            try:
                return await open_listeners(cfg.tcp_host, port)
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise TunnelRejected(f"cannot listen on port {port}: {exc.strerror}", Code.NO_FREE_PORT) from exc
        if self.port is not None:
            raise TunnelRejected(f"port {self.port} is in use", Code.ADDRESS_IN_USE)
        raise TunnelRejected(f"no free TCP port in {low}-{high}", Code.NO_FREE_PORT)

    async def run(self, *, task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._bind()
        port = int(listeners[0].socket.getsockname()[1])
        routes = self.edge.routes
        routes.ports[port] = self
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(TunnelInfo(f"tcp://{self.edge.config.domain}:{port}", "tcp"))
        finally:
            # The listeners close with serve_listeners; the port is free again right now.
            if routes.ports.get(port) is self:
                del routes.ports[port]

    async def _handle(self, public: trio.SocketStream) -> None:
        set_nodelay(public)
        client = peer_addr(public)
        try:
            try:
                stream = await self.session.open_proxy_stream(self.tunnel_id, client, "tcp")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            try:
                await forward(public, stream)
            finally:
                await stream.aclose()
        finally:
            await trio.aclose_forcefully(public)
