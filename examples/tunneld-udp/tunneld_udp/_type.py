"""The ``udp`` tunnel type: its options, its Binds, and which side does what."""

from __future__ import annotations

import math

import trio

from tunneld.plugin import (
    AgentTunnelContext,
    BindRequest,
    EdgeContext,
    SessionContext,
    TunnelConfig,
    TunnelOption,
    TunnelType,
    parse_local_addr,
    proto,
    refuse_unenforced,
)

from ._agent import relay_flow
from ._edge import DEFAULT_IDLE, MAX_IDLE, MIN_IDLE, UdpEdgeTunnel, idle_timeout, requested_port

#: Config key (and ``--idle-timeout``): seconds without a datagram either way before a flow closes.
IDLE_KEY = "udp_idle_timeout"
#: Config key (and ``--remote-addr``): the public port to ask for.
REMOTE_ADDR_KEY = "remote_addr"


def parse_idle_timeout(value: object) -> float:
    """``udp_idle_timeout`` / ``--idle-timeout``: seconds, 1 to 3600; ValueError otherwise."""
    try:
        seconds = float(str(value).strip()) if not isinstance(value, bool) else math.nan
    except ValueError:
        seconds = math.nan
    if not MIN_IDLE <= seconds <= MAX_IDLE:  # NaN fails too
        raise ValueError(f"expected seconds from {MIN_IDLE:g} to {MAX_IDLE:g}, got {str(value)[:64]!r}")
    return seconds


def parse_remote_addr(value: object) -> str:
    """``remote_addr`` / ``--remote-addr``: ``[HOST:]PORT`` ("" for any); ValueError otherwise."""
    text = str(value or "").strip()
    port = text.rsplit(":", 1)[-1]
    if text and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"expected [HOST:]PORT, got {text[:64]!r}")
    return text


def parse_udp_addr(addr: str) -> str:
    """The upstream: ``5353`` → ``localhost:5353``; ``host:port`` kept; ``udp://host:port`` accepted."""
    return parse_local_addr(addr, "udp")


class UdpTunnelType(TunnelType):
    """UDP tunnels: ``tunneld udp 5353`` → ``udp://DOMAIN:PORT`` on the edge."""

    name = "udp"
    bind_protos = ("udp",)
    help = ("Forward UDP datagrams sent to a public port of the edge to ADDR, a local UDP service "
            "(PORT or HOST:PORT).  Each client address is a flow, closed after --idle-timeout "
            "seconds without traffic.\n\nExample: tunneld udp 5353 --idle-timeout 30")
    options = (
        TunnelOption(IDLE_KEY, "--idle-timeout", f"Close a client's flow after this many seconds without "
                     f"a datagram either way ({MIN_IDLE:g}-{MAX_IDLE:g}).",
                     kind=float, default=DEFAULT_IDLE, parse=parse_idle_timeout, metavar="SECONDS"),
        TunnelOption(REMOTE_ADDR_KEY, "--remote-addr", "Public [HOST:]PORT to ask for (within the edge's "
                     "range).", default="", parse=parse_remote_addr, metavar="[HOST:]PORT"),
    )

    # ---- edge ----

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, bind: proto.Bind,
                    tunnel_id: str) -> UdpEdgeTunnel:
        # Anything else a client asks for (basic auth, IP restrictions ...) is refused, not ignored.
        refuse_unenforced(bind.opts, {"addr", "idletimeout"})
        kind = edge.address_name("udp", 0)[0]
        resumed = session.resumed_name(bind, kind)
        return UdpEdgeTunnel(edge, session, tunnel_id, requested_port(bind.opts),
                             int(resumed) if resumed and resumed.isdigit() else None,
                             idle_timeout=idle_timeout(bind.opts))

    # ---- agent ----

    def parse_addr(self, addr: str) -> str:
        return parse_udp_addr(addr)

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        # The edge needs the idle timeout too: it ends flows and frees their streams.
        opts: dict[str, object] = {"IdleTimeout": float(config.option(IDLE_KEY))}
        if remote := config.option(REMOTE_ADDR_KEY):
            opts["Addr"] = remote
        bind = proto.Bind(proto="udp", forwards_to=parse_udp_addr(config.addr), opts=opts,
                          extra=proto.BindExtra(name=config.name))
        return [BindRequest(config.name, bind)]

    async def agent_handle(self, tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        await relay_flow(tunnel, stream, header, float(tunnel.config.option(IDLE_KEY)))
