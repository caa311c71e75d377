"""TCP tunnels: raw bytes on a public port of their own (built-in plugin)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from tunneld.plugin import (
    AgentTunnelContext,
    BindRequest,
    EdgeContext,
    SessionContext,
    TunnelConfig,
    TunnelType,
    TunnelTypeRegistry,
    hookimpl,
    parse_local_addr,
    proto,
    proxy_proto_option,
    refuse_unenforced,
)

from ._edge import TcpEdgeTunnel, requested_port
from ._options import TCP_HELP, TCP_OPTIONS

if TYPE_CHECKING:
    import click


def parse_tcp_addr(addr: str) -> str:
    """``22`` → ``localhost:22``; ``host:port`` kept; ``tcp://host:port`` accepted."""
    return parse_local_addr(addr, "tcp")


class TcpTunnelType(TunnelType):
    name = "tcp"
    bind_protos = ("tcp",)
    options = TCP_OPTIONS
    help = TCP_HELP

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, bind: proto.Bind,
                    tunnel_id: str) -> TcpEdgeTunnel:
        refuse_unenforced(bind.opts, {"addr", "url", "proxyproto"})
        # Resume tokens name a TCP port as ("port", "20001"): the kind is address_name's first.
        resumed = session.resumed_name(bind, edge.address_name("tcp", 0)[0])
        return TcpEdgeTunnel(edge, session, tunnel_id, requested_port(bind.opts),
                             int(resumed) if resumed and resumed.isdigit() else None,
                             proxy_proto=proxy_proto_option(bind.opts))

    def parse_addr(self, addr: str) -> str:
        return parse_tcp_addr(addr)

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        upstream = parse_tcp_addr(config.addr)
        opts: dict[str, object] = {"Addr": config.option("remote_addr"),
                                   "ProxyProto": config.option("proxy_proto")}
        return [BindRequest(config.name, proto.Bind(proto="tcp", forwards_to=upstream, opts=opts,
                                                    extra=proto.BindExtra(name=config.name)))]

    async def agent_handle(self, tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        # A PROXY header, if the tunnel asked for one, is already in the stream: passed on as is.
        await tunnel.forward_to_upstream(stream, header)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add(TcpTunnelType())


@hookimpl
def tunneld_add_commands(cli: click.Group) -> None:
    from tunneld.plugin import tunnel_command

    cli.add_command(tunnel_command(TcpTunnelType()))
