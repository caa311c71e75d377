"""Edge side of TLS tunnels: SNI routing on the public HTTPS port, TLS left unterminated.

Theory of operation
-------------------
HTTPS and TLS tunnels share one port.  Every connection on it first meets :class:`SniFront`
(this plugin's ``tunneld_edge_tls_front``), which reads until the ClientHello is complete
(at most :data:`HELLO_TIMEOUT` seconds and 16 KiB) and then:

* SNI names a TLS tunnel (route ``("tls", name)``): :meth:`TlsEdgeTunnel.serve` opens a proxy
  stream to its agent and writes the PROXY header (when the Bind asked for one), the bytes read
  so far, and from then on relays raw bytes both ways.  The edge never sees the plaintext.
* SNI names anything else: the bytes are handed back in a :class:`~tunneld.plugin.PrefixedStream`
  and the edge terminates TLS for HTTP tunnels as before; unknown names end in its "tunnel not
  found" page.
* no SNI: a ``handshake_failure`` alert — without a name no TLS tunnel can be chosen (ngrok
  refuses such clients too, ERR_NGROK_3003) — and a log line saying so.
* not TLS, malformed, too large or too slow: closed.

Connections run in the HTTPS ingress's handler nursery, like HTTP ones: an agent leaving breaks
their proxy streams, which ends them.  Every connection this module handles (all but those
handed back) gets one access-log line (:meth:`~tunneld.plugin.EdgeContext.log_connection`).
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from tunneld.plugin import (
    ByteCounts,
    ClaimTunnel,
    Code,
    EdgeContext,
    PrefixedStream,
    SessionContext,
    TunnelInfo,
    TunnelRejected,
    aclose_at_once,
    forward,
    local_addr,
    proto,
)

from ._clienthello import NEED_MORE, Alert, ClientHelloParser, Done, Error, alert_record

log = logging.getLogger("tunneld.tls")

#: Seconds a client has to deliver its whole ClientHello (ngrok's edge allows about as long).
HELLO_TIMEOUT = 3.0
#: Bind options the tls plugin carries out (names through ``choose_host``, the PROXY header
#: at connection time).
HANDLED_OPTS = {"hostname", "subdomain", "domain", "url", "proxyproto"}
#: Reads while peeking: one full record plus its header fits.
_PEEK = 16 * 1024 + 5


@attrs.define(eq=False)
class TlsEdgeTunnel(ClaimTunnel):
    """The route ``("tls", host)``: connections whose SNI is ``host`` go to this agent."""

    edge: EdgeContext
    session: SessionContext
    tunnel_id: str
    host: str
    #: PROXY protocol version to write before each connection's bytes (0: none).
    proxy_proto: int = 0
    url: str = ""

    async def claim(self) -> TunnelInfo:
        port = self.edge.ports.get("https")
        if port is None:
            raise TunnelRejected("this edge has no public https listener, which TLS tunnels share",
                                 Code.PROTO_UNSUPPORTED)
        self.edge.claim_host("tls", self.host, self, self.session.owner)
        self.url = f"tls://{self.host}" if port == 443 else f"tls://{self.host}:{port}"
        return TunnelInfo(self.url, "tls", ("host", self.host))

    def release(self) -> None:
        self.edge.release_host("tls", self.host, self)

    async def serve(self, public: trio.SocketStream, client_addr: str, peeked: bytes,
                    started: float) -> None:
        """Relay one public connection (its first bytes already read: ``peeked``) to the agent."""
        counts = ByteCounts()
        result = "agent_unreachable"
        try:
            head = b""
            if self.proxy_proto:
                # Written by the edge, as ngrok's SDKs expect (../shared/reference/ngrok-protocol.md §3.5).
                head = proto.encode_proxy_header(self.proxy_proto, client_addr, local_addr(public))
            # The ClientHello rides in the stream's SYN frame.
            stream = await self.session.open_stream(self.tunnel_id, client_addr, "tls",
                                                    passthrough_tls=True, first=head + peeked)
            try:
                counts.a_to_b = len(peeked)
                result = "ok"
                await forward(public, stream, counts)
            finally:
                await aclose_at_once(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the agent's session ended: nothing more to relay
        finally:
            self.edge.log_connection(client=client_addr, proto="tls", host=self.host,
                                     tunnel_id=self.tunnel_id, url=self.url, result=result,
                                     started=started, counts=counts)


@attrs.define(eq=False)
class SniFront:
    """The edge's TLS front: routes HTTPS-port connections by the SNI of their ClientHello."""

    edge: EdgeContext

    async def route(self, stream: trio.SocketStream, client_addr: str) -> trio.abc.Stream | None:
        started = time.monotonic()
        parser = ClientHelloParser()
        peeked = bytearray()
        outcome: Done | Error | str = "timeout"
        with trio.move_on_after(HELLO_TIMEOUT):
            try:
                while True:
                    data = await stream.receive_some(_PEEK)
                    if not data:
                        outcome = "closed"
                        break
                    peeked += data
                    answer = parser.feed(data)
                    if answer is not NEED_MORE:
                        assert isinstance(answer, (Done, Error))
                        outcome = answer
                        break
            except trio.BrokenResourceError:
                outcome = "closed"
        if isinstance(outcome, Done) and outcome.server_name is not None:
            tunnel = self.edge.lookup_host("tls", outcome.server_name)
            if tunnel is None:
                return PrefixedStream(stream, bytes(peeked))  # for the edge to terminate (HTTPS)
            await tunnel.serve(stream, client_addr, bytes(peeked), started)
            return None
        if isinstance(outcome, Done):
            result = "no_sni"
            log.info("TLS client %s sent no server name (SNI): cannot route it; refused with a "
                     "handshake_failure alert", client_addr)
            await _send_alert(stream, Alert.HANDSHAKE_FAILURE)
        elif isinstance(outcome, Error):
            result = outcome.kind
            log.debug("TLS client %s: %s; closing", client_addr, outcome.reason)
        else:
            result = outcome
            log.debug("TLS client %s: no complete ClientHello (%s); closing", client_addr, outcome)
        self.edge.log_connection(client=client_addr, proto="tls", result=result, started=started,
                                 counts=ByteCounts(a_to_b=len(peeked)))
        return None


async def _send_alert(stream: trio.SocketStream, alert: Alert) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(alert_record(alert))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
