"""HTTP tunnels: Host-routed public HTTP/HTTPS endpoints (built-in plugin)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from tunneld.http1 import basic_auth_bind_opts
from tunneld.plugin import (
    AgentTunnelContext,
    BindRequest,
    EdgeContext,
    EdgeService,
    SessionContext,
    TunnelConfig,
    TunnelType,
    TunnelTypeRegistry,
    UpstreamHandler,
    hookimpl,
    proto,
    refuse_unenforced,
)

from ._agent import parse_http_addr, serve_http_stream
from ._auth import basic_auth_from_opts
from ._edge import HANDLED_OPTS, HttpEdgeTunnel, HttpIngress, refuse_sdk_host_rewrite
from ._options import HTTP_HELP, HTTP_OPTIONS

if TYPE_CHECKING:
    import click


class HttpTunnelType(TunnelType):
    name = "http"
    bind_protos = ("http", "https")
    options = HTTP_OPTIONS
    help = HTTP_HELP
    inspects = True

    def __init__(self, registry: TunnelTypeRegistry | None = None) -> None:
        self._registry = registry
        #: Plugins answering requests themselves (``file://``), by normalised address.
        self._handlers: dict[str, UpstreamHandler] = {}

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, bind: proto.Bind,
                    tunnel_id: str) -> HttpEdgeTunnel:
        refuse_unenforced(bind.opts, HANDLED_OPTS)
        refuse_sdk_host_rewrite(session, bind.opts)
        # Before a name is chosen: a refused credential must not hold one.
        auth = basic_auth_from_opts(bind.opts)
        host = session.choose_host(bind, bind.proto)
        return HttpEdgeTunnel(edge, session, tunnel_id, bind.proto, host, auth)

    def parse_addr(self, addr: str) -> str:
        # Another plugin may claim the address (file://) and answer the requests itself.
        handler = self._registry.agent_upstream(addr) if self._registry is not None else None
        if handler is not None:
            self._handlers[handler.url] = handler
            return handler.url
        return parse_http_addr(addr)

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        upstream = self.parse_addr(config.addr)
        opts = {
            "Hostname": config.option("hostname"),
            "Subdomain": config.option("subdomain"),
            "Auth": "",
            # Informational, as from ngrok's v2 agent: our agent rewrites Host itself.
            "HostHeaderRewrite": config.option("host_header") == "rewrite",
            "LocalURLScheme": upstream.split("://", 1)[0],
        }
        if config.option("basic_auth"):
            opts.update(basic_auth_bind_opts(config.option("basic_auth")))
        # Like ngrok's v2 agent: one Bind per public scheme, https first; the edge gives both
        # the same hostname.  The http one is named "<name> (http)".
        schemes = config.option("schemes")
        requests = []
        for scheme in ("https", "http"):
            if scheme in schemes:
                name = config.name if scheme == "https" or "https" not in schemes else f"{config.name} (http)"
                requests.append(BindRequest(name, proto.Bind(proto=scheme, forwards_to=upstream,
                                                             opts=dict(opts),
                                                             extra=proto.BindExtra(name=config.name))))
        return requests

    async def agent_handle(self, tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        handler = self._handlers.get(tunnel.upstream)
        if handler is not None:
            await handler.serve(stream, header, tunnel.request_done)
        else:
            await serve_http_stream(tunnel, stream, header)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add(HttpTunnelType(registry))


@hookimpl
def tunneld_edge_services(edge: EdgeContext) -> Iterable[EdgeService]:
    return [HttpIngress(edge)]


@hookimpl
def tunneld_add_commands(cli: click.Group) -> None:
    from tunneld.plugin import tunnel_command

    cli.add_command(tunnel_command(HttpTunnelType()))
