"""TCP tunnels: raw bytes on a public port of their own (built-in plugin)."""

from __future__ import annotations

import trio

from tunneld import hookimpl
from tunneld.core import (
    AgentSession,
    AgentTunnel,
    BindRequest,
    Edge,
    TunnelConfig,
    TunnelType,
    TunnelTypeRegistry,
    forward_to_upstream,
    parse_local_addr,
    proto,
    proxy_proto_option,
    refuse_unenforced,
)

from ._edge import TcpEdgeTunnel, requested_port


def parse_tcp_addr(addr: str) -> str:
    """``22`` → ``localhost:22``; ``host:port`` kept; ``tcp://host:port`` accepted."""
    return parse_local_addr(addr, "tcp")


class TcpTunnelType(TunnelType):
    name = "tcp"
    bind_protos = ("tcp",)

    def edge_tunnel(self, edge: Edge, session: AgentSession, bind: proto.Bind, tunnel_id: str) -> TcpEdgeTunnel:
        refuse_unenforced(bind.opts, {"addr", "url", "proxyproto"})
        resumed = session.resumed_name(bind, "port")
        return TcpEdgeTunnel(edge, session, tunnel_id, requested_port(bind.opts),
                             int(resumed) if resumed and resumed.isdigit() else None,
                             proxy_proto=proxy_proto_option(bind.opts))

    def parse_addr(self, addr: str) -> str:
        return parse_tcp_addr(addr)

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        upstream = parse_tcp_addr(config.addr)
        opts: dict[str, object] = {"Addr": config.remote_addr, "ProxyProto": config.proxy_proto}
        return [BindRequest(config.name, proto.Bind(proto="tcp", forwards_to=upstream, opts=opts,
                                                    extra=proto.BindExtra(name=config.name)))]

    async def agent_handle(self, tunnel: AgentTunnel, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        # A PROXY header, if the tunnel asked for one, is already in the stream: passed on as is.
        await forward_to_upstream(tunnel, stream, header)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add(TcpTunnelType())
