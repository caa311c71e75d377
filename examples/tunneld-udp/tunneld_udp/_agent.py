"""Agent side of UDP tunnels: one connected UDP socket to the upstream per flow.

Each proxy stream the edge opens is one public client's flow.  The agent sends its datagrams
from a UDP socket of its own, connected to the upstream, so the upstream's replies (and only
they) come back on it and go up the same stream.  The flow ends when the edge closes the
stream, or after the idle timeout without a datagram either way (the edge enforces the same
timeout; doing it here too means a lost edge never leaves sockets behind).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from tunneld.plugin import AgentTunnelContext, proto, split_host_port

from ._framing import MAX_DATAGRAM, Decoder, FramingError, encode

log = logging.getLogger("tunneld.udp")

#: Bytes asked of one recv: more than any UDP payload, so an oversized reply is seen whole.
RECV_SIZE = 65536
#: Receive buffer asked for each upstream socket.
RCVBUF = 1024 * 1024
#: Stream bytes read at once.
STREAM_CHUNK = 256 * 1024


async def open_upstream(upstream: str) -> trio.socket.SocketType:
    """A UDP socket connected to ``upstream`` (``host:port``); OSError if it cannot be.

    IPv4 first: ``localhost:5353`` most often means a service on 127.0.0.1, and UDP gives no
    sign of a wrong guess (no handshake to fail, just silence).
    """
    host, port = split_host_port(upstream)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, type_, protocol, _, addr = infos[0]
    sock = trio.socket.socket(family, type_, protocol)
    try:
        # Room for a burst of replies while the stream to the edge is busy (capped by the
        # kernel at net.core.rmem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def relay_flow(tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                     header: proto.ProxyHeader, idle_timeout: float) -> None:
    """Relay one flow between ``stream`` and the tunnel's upstream; the caller closes ``stream``."""
    try:
        sock = await open_upstream(tunnel.upstream)
    except OSError as exc:
        log.warning("tunnel %s: cannot reach upstream %s for %s: %s", tunnel.name, tunnel.upstream,
                    header.client_addr, exc)
        return
    with sock, trio.CancelScope() as scope:

        def touch() -> None:
            scope.deadline = trio.current_time() + idle_timeout

        touch()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_replies, sock, stream, touch)
                await _requests(stream, sock, touch)
                nursery.cancel_scope.cancel()  # the edge ended the flow
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the link to the edge is gone, and the flow with it
        except* (FramingError, OSError) as group:
            # A broken stream from the edge, or a socket error other than "nobody listens":
            # this flow ends, the agent and its other flows carry on.
            log.warning("tunnel %s: flow %s: %s", tunnel.name, header.client_addr, group.exceptions[0])
    if scope.cancelled_caught:
        log.debug("tunnel %s: flow %s idle for %gs, closed", tunnel.name, header.client_addr, idle_timeout)


async def _requests(stream: trio.abc.HalfCloseableStream, sock: trio.socket.SocketType,
                    touch: Callable[[], None]) -> None:
    """Datagrams from the edge → the upstream; returns when the edge ends the flow."""
    decoder = Decoder()
    while data := await stream.receive_some(STREAM_CHUNK):
        for datagram in decoder.feed(data):
            try:
                await sock.send(datagram)
            except OSError:
                continue  # ECONNREFUSED from an earlier datagram, ENOBUFS: lost, as UDP may be
            touch()
    if decoder.pending:
        raise FramingError("the edge's stream ended inside a datagram")


async def _replies(sock: trio.socket.SocketType, stream: trio.abc.HalfCloseableStream,
                   touch: Callable[[], None]) -> None:
    """The upstream's datagrams → the edge, framed."""
    while True:
        try:
            datagram = await sock.recv(RECV_SIZE)
        except (ConnectionRefusedError, ConnectionResetError):
            # Nothing listens upstream (an ICMP port unreachable for what we sent): as with
            # any UDP service that is down, the client hears nothing.
            continue
        if len(datagram) > MAX_DATAGRAM:
            continue  # an IPv6 upstream may send up to 65527 bytes; no frame carries that
        await stream.send_all(encode(datagram))
        touch()
