"""Edge side of UDP tunnels: a public UDP port per tunnel, one proxy stream per client flow.

Theory of operation.  UDP has no connections, so the edge makes them up: a *flow* is every
datagram from one source address (``host:port``) to the tunnel's port.  The first datagram of
a flow opens a proxy stream to the agent (:meth:`SessionContext.open_stream`); datagrams go
down it length-prefixed (:mod:`._framing`) and replies come back up it, to be sent from the
public port to the flow's address.  A flow ends when nothing went either way for the idle
timeout (the agent's ``udp_idle_timeout``), when the agent closes its stream, or with the
tunnel.

Nursery tree::

    UdpEdgeTunnel.run             binds the port, claims ("udp", port), reads every datagram
    └── _serve_flow (per flow)    opens the proxy stream; its cancel scope's deadline is the
          ├── _uplink             idle timeout, pushed back by each datagram either way
          └── _downlink

Bounds, all per tunnel: at most :data:`MAX_FLOWS` flows (datagrams that would open one more
are dropped); each flow queues at most :data:`FLOW_QUEUE_DATAGRAMS` datagrams and
:data:`FLOW_QUEUE_BYTES` bytes while its stream is busy (more are dropped, as a router would).
Drops are counted (``tunneld_udp_dropped_datagrams_total`` by reason, and
:attr:`UdpEdgeTunnel.dropped`), never queued without bound.

Which public port: the Bind's ``Addr`` if given (it must lie in the edge's UDP port range, or
its TCP range when it has no UDP one: ports the operator set aside for tunnels); otherwise a
free port of the UDP range when the edge has one; otherwise a port the kernel picks on the
host of the TCP range.  A reconnecting agent gets its old port back when it is still free.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from tunneld.plugin import (
    ByteCounts,
    Code,
    EdgeContext,
    SessionContext,
    TunnelInfo,
    TunnelRejected,
    format_host_port,
)

from ._framing import MAX_DATAGRAM, Decoder, FramingError, encode

log = logging.getLogger("tunneld.udp")

#: Flows one tunnel relays at once.
MAX_FLOWS = 256
#: Datagrams and bytes one flow may have waiting for its stream (worst case per tunnel:
#: MAX_FLOWS x FLOW_QUEUE_BYTES = 64 MiB).
FLOW_QUEUE_DATAGRAMS = 128
FLOW_QUEUE_BYTES = 256 * 1024
#: Queued datagrams written to the stream in one write (one mux frame for a burst).
BATCH_BYTES = 64 * 1024
#: Random ports tried in the UDP range before it is declared full.
PORT_ATTEMPTS = 64
#: Bytes asked of one recvfrom: more than any UDP payload, so an oversized one is seen whole.
RECV_SIZE = 65536
#: Receive buffer asked for the public socket.
RCVBUF = 1024 * 1024
#: Stream bytes read at once on the way back.
STREAM_CHUNK = 256 * 1024
#: Idle timeouts an agent may ask for, in seconds (a flow costs a stream and a queue).
MIN_IDLE, MAX_IDLE = 1.0, 3600.0
DEFAULT_IDLE = 30.0
#: The metric counting dropped datagrams, with a ``reason`` label.
DROPPED = "tunneld_udp_dropped_datagrams_total"


def requested_port(opts: dict[str, Any]) -> int | None:
    """The port of the Bind's ``Addr`` (``HOST:PORT``, ``:PORT``, ``PORT``), or None."""
    for key, value in opts.items():
        if key.lower() == "addr" and isinstance(value, (str, int)) and str(value).strip():
            port = str(value).strip().split("://", 1)[-1].rsplit(":", 1)[-1]
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise TunnelRejected(f"cannot read a UDP port from {value!r}", Code.ADDRESS_NOT_ALLOWED)
            return int(port)
    return None


def idle_timeout(opts: dict[str, Any]) -> float:
    """The Bind's ``IdleTimeout`` in seconds (default :data:`DEFAULT_IDLE`); TunnelRejected if bad."""
    for key, value in opts.items():
        if key.lower() == "idletimeout" and value not in (None, ""):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    MIN_IDLE <= value <= MAX_IDLE):
                raise TunnelRejected(f"the UDP idle timeout must be {MIN_IDLE:g} to {MAX_IDLE:g} seconds, "
                                     f"not {value!r}", Code.OPTION_UNSUPPORTED)
            return float(value)
    return DEFAULT_IDLE


@dataclass(eq=False)
class _Flow:
    """One client address's datagrams: the queue to its stream and its idle deadline."""

    addr: Any
    client: str
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Bytes of the datagrams in the queue.
    queued: int = 0
    counts: ByteCounts = field(default_factory=ByteCounts)

    def offer(self, datagram: bytes) -> bool:
        """Queue ``datagram`` for the agent; False (dropped) when the queue is full."""
        if self.queued + len(datagram) > FLOW_QUEUE_BYTES:
            return False
        try:
            self.send.send_nowait(datagram)
        except trio.WouldBlock:
            return False
        self.queued += len(datagram)
        return True


@dataclass(eq=False)
class UdpEdgeTunnel:
    """One UDP tunnel on the edge (an ``EdgeTunnel``: started with ``nursery.start(tunnel.run)``)."""

    edge: EdgeContext
    session: SessionContext
    tunnel_id: str
    #: Public port the agent asked for (``--remote-addr``), or None.
    port: int | None
    #: The port this tunnel had before its agent reconnected (from the resume token).
    resumed: int | None = None
    idle_timeout: float = DEFAULT_IDLE
    max_flows: int = MAX_FLOWS
    #: Live flows by client address.
    flows: dict[Any, _Flow] = field(default_factory=dict, init=False)
    #: Datagrams dropped, by reason: ``flows`` (too many), ``queue`` (stream busy), ``size``
    #: (larger than a frame), ``stopping`` (edge shutting down), ``send`` (reply not sent).
    dropped: Counter[str] = field(default_factory=Counter, init=False)
    url: str = field(default="", init=False)

    # ---- the public port ---------------------------------------------------------------------

    def _candidates(self) -> tuple[str, list[int]]:
        """The host to bind and the ports to try, in order (0: any the kernel picks)."""
        udp_range = self.edge.port_range("udp")
        tcp_range = self.edge.port_range("tcp")
        host = (udp_range or tcp_range or ("", 0, 0))[0]
        if self.port is not None:
            allowed = udp_range or tcp_range
            if allowed is None or not allowed[1] <= self.port <= allowed[2]:
                where = f"{allowed[1]}-{allowed[2]}" if allowed else "(none)"
                raise TunnelRejected(f"UDP port {self.port} is outside this edge's range {where}",
                                     Code.ADDRESS_NOT_ALLOWED)
            return host, [self.port]
        if udp_range is not None:
            _, low, high = udp_range
            ports = random.sample(range(low, high + 1), min(PORT_ATTEMPTS, high - low + 1))
            if self.resumed is not None and low <= self.resumed <= high:
                ports.insert(0, self.resumed)
            return host, ports
        # No UDP range: any free port on the TCP range's host; a few tries of 0, in case the
        # kernel hands out a port still held for another owner.
        return host, ([self.resumed] if self.resumed else []) + [0, 0, 0]

    async def _bind(self) -> tuple[trio.socket.SocketType, int]:
        host, ports = self._candidates()
        owner = self.session.owner
        for port in ports:
            if port and not self.edge.address_available("udp", port, owner):
                continue
            infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM,
                                                  flags=socket.AI_PASSIVE)
            family, type_, proto, _, addr = infos[0]
            sock = trio.socket.socket(family, type_, proto)
            try:
                # Room for a burst of datagrams while the receive loop is busy (the kernel caps
                # it at net.core.rmem_max).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                await sock.bind(addr)
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise TunnelRejected(f"cannot bind UDP port {port}: {exc.strerror}",
                                     Code.NO_FREE_PORT) from exc
            bound = int(sock.getsockname()[1])
            if port == 0 and not self.edge.address_available("udp", bound, owner):
                sock.close()
                continue
            return sock, bound
        if self.port is not None:
            raise TunnelRejected(f"UDP port {self.port} is in use", Code.ADDRESS_IN_USE)
        raise TunnelRejected("no free UDP port on this edge", Code.NO_FREE_PORT)

    async def run(self, *, task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind and claim the public port, report ``udp://DOMAIN:PORT``, relay until cancelled.

        The port is released and its socket closed on the way out; TunnelRejected before
        ``started()`` when no port can be had.
        """
        sock, port = await self._bind()
        with sock:
            # ``requested``: refusals name the address asked for, not a random one.
            self.edge.claim_address("udp", port, self, self.session.owner, requested=self.port is not None)
            # The socket is a descriptor like a TCP tunnel's listener: it comes out of the budget.
            self.edge.count_listener_fds(1)
            try:
                self.url = f"udp://{self.edge.domain}:{port}"
                async with trio.open_nursery() as nursery:
                    task_status.started(TunnelInfo(url=self.url, proto="udp",
                                                   name=self.edge.address_name("udp", port)))
                    await self._receive(sock, nursery)
            finally:
                self.edge.count_listener_fds(-1)
                self.edge.release_address("udp", port, self)

    # ---- datagrams in ------------------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.edge.count(DROPPED, reason=reason)

    async def _receive(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Read every datagram of the public port and hand it to its flow."""
        while True:
            try:
                datagram, addr = await sock.recvfrom(RECV_SIZE)
            except (ConnectionRefusedError, ConnectionResetError):
                continue  # an ICMP error for an earlier reply (some platforms report them here)
            if len(datagram) > MAX_DATAGRAM:
                self._drop("size")
                continue
            flow = self.flows.get(addr)
            if flow is None:
                if self.edge.stopping.is_set():
                    self._drop("stopping")
                    continue
                if len(self.flows) >= self.max_flows:
                    self._drop("flows")
                    continue
                send, receive = trio.open_memory_channel[bytes](FLOW_QUEUE_DATAGRAMS)
                host, port = addr[0], addr[1]
                flow = self.flows[addr] = _Flow(addr, format_host_port(host, port), send, receive)
                nursery.start_soon(self._serve_flow, flow, sock)
            # Activity from the client keeps the flow open, even when the datagram is dropped.
            flow.scope.deadline = trio.current_time() + self.idle_timeout
            if not flow.offer(datagram):
                self._drop("queue")

    async def _serve_flow(self, flow: _Flow, sock: trio.socket.SocketType) -> None:
        started = time.monotonic()
        result = "agent_unreachable"
        try:
            with flow.scope:
                try:
                    stream = await self.session.open_stream(self.tunnel_id, flow.client, "udp")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                result = "ok"
                try:
                    async with stream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._uplink, flow, stream)
                        await self._downlink(flow, stream, sock)
                        nursery.cancel_scope.cancel()  # the agent ended the flow
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the session is gone; so is the flow
                except* FramingError as group:
                    log.warning("tunnel %s: flow %s: %s", self.tunnel_id, flow.client, group.exceptions[0])
                    result = "bad_framing"
        finally:
            if self.flows.get(flow.addr) is flow:
                del self.flows[flow.addr]
            flow.send.close()
            flow.receive.close()
            self.edge.log_connection(client=flow.client, proto="udp", result=result, started=started,
                                     tunnel_id=self.tunnel_id, url=self.url, counts=flow.counts)

    async def _uplink(self, flow: _Flow, stream: trio.abc.HalfCloseableStream) -> None:
        """Queued datagrams → the agent, several to a write when they have piled up."""
        async for datagram in flow.receive:
            frames = [encode(datagram)]
            payload = len(datagram)
            while payload < BATCH_BYTES:
                try:
                    datagram = flow.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                frames.append(encode(datagram))
                payload += len(datagram)
            flow.queued -= payload
            await stream.send_all(b"".join(frames))
            flow.counts.a_to_b += payload  # datagram bytes, as the way back counts them

    async def _downlink(self, flow: _Flow, stream: trio.abc.HalfCloseableStream,
                        sock: trio.socket.SocketType) -> None:
        """The agent's replies → the client, from the public port; returns when the agent ends the flow."""
        decoder = Decoder()
        while data := await stream.receive_some(STREAM_CHUNK):
            for datagram in decoder.feed(data):
                try:
                    await sock.sendto(datagram, flow.addr)
                except OSError:
                    self._drop("send")  # e.g. ENOBUFS: a lost datagram, as on any network
                    continue
                flow.counts.b_to_a += len(datagram)
                flow.scope.deadline = trio.current_time() + self.idle_timeout
        if decoder.pending:
            raise FramingError("the agent's stream ended inside a datagram")
