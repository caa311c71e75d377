"""TLS tunnels: SNI-routed TLS on the edge's HTTPS port, passed through unterminated (built-in plugin)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from OpenSSL import SSL

from tunneld.plugin import (
    AgentTunnelContext,
    BindRequest,
    EdgeContext,
    SessionContext,
    TlsFront,
    TunnelConfig,
    TunnelType,
    TunnelTypeRegistry,
    hookimpl,
    proto,
    proxy_proto_option,
    refuse_unenforced,
)

from ._agent import parse_tls_addr, serve_tls_stream, termination_context
from ._edge import HANDLED_OPTS, SniFront, TlsEdgeTunnel
from ._options import TLS_HELP, TLS_OPTIONS

if TYPE_CHECKING:
    import click


class TlsTunnelType(TunnelType):
    name = "tls"
    bind_protos = ("tls",)
    options = TLS_OPTIONS
    help = TLS_HELP

    def __init__(self) -> None:
        # Agent-side termination contexts by (crt, key): built once, when the agent starts.
        self._contexts: dict[tuple[str, str], SSL.Context] = {}

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, bind: proto.Bind,
                    tunnel_id: str) -> TlsEdgeTunnel:
        refuse_unenforced(bind.opts, HANDLED_OPTS)
        version = proxy_proto_option(bind.opts)
        # Names are shared with HTTP tunnels (one namespace on port 443); "tls" pairs with nothing.
        return TlsEdgeTunnel(edge, session, tunnel_id, session.choose_host(bind, "tls"), version)

    def parse_addr(self, addr: str) -> str:
        return parse_tls_addr(addr)

    def _context(self, config: TunnelConfig) -> SSL.Context | None:
        crt, key = config.option("crt"), config.option("key")
        if not crt and not key:
            return None
        found = self._contexts.get((crt, key))
        if found is None:
            # Raises ConfigError for a bad pair; called from agent_binds, i.e. before connecting.
            prefix = "--" if config.name == "command_line" else f"tunnels.{config.name}."
            found = termination_context(crt, key, crt_name=f"{prefix}crt", key_name=f"{prefix}key")
            self._contexts[(crt, key)] = found
        return found

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        upstream = parse_tls_addr(config.addr)
        self._context(config)
        opts = {"Hostname": config.option("hostname"), "Subdomain": config.option("subdomain"),
                "ProxyProto": config.option("proxy_proto")}
        return [BindRequest(config.name, proto.Bind(proto="tls", forwards_to=upstream, opts=opts,
                                                    extra=proto.BindExtra(name=config.name)))]

    async def agent_handle(self, tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        await serve_tls_stream(tunnel, stream, header, self._context(tunnel.config))


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add(TlsTunnelType())


@hookimpl
def tunneld_add_commands(cli: click.Group) -> None:
    from tunneld.plugin import tunnel_command

    cli.add_command(tunnel_command(TlsTunnelType()))


@hookimpl
def tunneld_edge_tls_front(edge: EdgeContext) -> TlsFront:
    return SniFront(edge)
