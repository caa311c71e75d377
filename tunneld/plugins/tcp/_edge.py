"""Edge side of TCP tunnels: a public port of its own per tunnel."""

from __future__ import annotations

import errno
import logging
import random
import time
from typing import Any

import attrs
import trio

from tunneld.plugin import (
    ByteCounts,
    Code,
    EdgeContext,
    SessionContext,
    TunnelInfo,
    TunnelRejected,
    aclose_at_once,
    close_forcefully,
    forward,
    lean,
    local_addr,
    open_listeners,
    peer_addr,
    proto,
)

log = logging.getLogger("tunneld.tcp")

#: The transport of this plugin's addresses (``EdgeContext.claim_address`` and friends).
TCP = "tcp"
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
    edge: EdgeContext
    session: SessionContext
    tunnel_id: str
    port: int | None
    #: The port this tunnel had before its agent reconnected (from the resume token).
    resumed: int | None = None
    #: PROXY protocol version the edge writes before each connection's bytes (0: none).
    proxy_proto: int = 0

    async def _bind(self) -> list[trio.SocketListener]:
        edge = self.edge
        span = edge.port_range(TCP)
        if span is None:
            raise TunnelRejected("this edge has no TCP ports for tunnels", Code.PROTO_UNSUPPORTED)
        tcp_host, low, high = span
        owner = self.session.owner
        if self.port is not None:
            if not low <= self.port <= high:
                raise TunnelRejected(f"port {self.port} is outside this edge's range {low}-{high}",
                                     Code.ADDRESS_NOT_ALLOWED)
            owner_now = edge.address_owner(TCP, self.port)
            if edge.lookup_address(TCP, self.port) is None and owner_now not in (None, owner):
                raise TunnelRejected(f"port {self.port} is held for its previous owner", Code.ADDRESS_IN_USE)
            candidates = [self.port]
        else:
            candidates = random.sample(range(low, high + 1), min(PORT_ATTEMPTS, high - low + 1))
            # A reconnecting agent gets its old port back when it is still free.
            if self.resumed is not None and low <= self.resumed <= high:
                candidates.insert(0, self.resumed)
        for port in candidates:
            # A requested port is checked when claimed (its owner's reservation and ACL); a random
            # pick skips ports that are routed, held for someone else, or reserved.
            if self.port is None and not edge.address_available(TCP, port, owner):
                continue
            try:
                return await open_listeners(tcp_host, port)
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise TunnelRejected(f"cannot listen on port {port}: {exc.strerror}",
                                         Code.NO_FREE_PORT) from exc
        if self.port is not None:
            raise TunnelRejected(f"port {self.port} is in use", Code.ADDRESS_IN_USE)
        raise TunnelRejected(f"no free TCP port in {low}-{high}", Code.NO_FREE_PORT)

    async def run(self, *, task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._bind()
        port = int(listeners[0].socket.getsockname()[1])
        edge = self.edge
        try:
            edge.claim_address(TCP, port, self, self.session.owner, requested=self.port is not None)
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        # Its listeners' descriptors come out of the public connections' budget.
        edge.count_listener_fds(len(listeners))
        try:
            async with trio.open_nursery() as nursery:
                # The edge's accept loop: connections beyond the descriptor budget are reset at
                # once, and running out of descriptors is logged once per interval, not per accept.
                await nursery.start(edge.serve_public, self._handle, listeners)
                task_status.started(TunnelInfo(f"tcp://{edge.domain}:{port}", "tcp",
                                               edge.address_name(TCP, port)))
        finally:
            # The listeners close with their accept loops; the port is free again right now.
            edge.count_listener_fds(-len(listeners))
            edge.release_address(TCP, port, self)

    async def _handle(self, public: trio.SocketStream) -> None:
        started = time.monotonic()
        client = peer_addr(public)
        server = local_addr(public)
        counts = ByteCounts()
        result = "agent_unreachable"
        try:
            try:
                # The edge writes the PROXY header, as official SDKs expect
                # (../shared/reference/ngrok-protocol.md §3.5), in the stream's SYN frame.
                head = b""
                if self.proxy_proto:
                    head = proto.encode_proxy_header(self.proxy_proto, client, server)
                stream = await self.session.open_stream(self.tunnel_id, client, "tcp", first=head)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            try:
                result = "ok"
                await forward(lean(public), stream, counts)
            finally:
                await aclose_at_once(stream)
        finally:
            await close_forcefully(public)
            port = server.rsplit(":", 1)[-1]
            self.edge.log_connection(client=client, proto="tcp", tunnel_id=self.tunnel_id,
                                     url=f"tcp://{self.edge.domain}:{port}", result=result, started=started,
                                     counts=counts)
