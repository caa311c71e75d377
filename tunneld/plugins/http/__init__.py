"""HTTP tunnels: Host-routed public HTTP/HTTPS endpoints (built-in plugin)."""

from __future__ import annotations

from collections.abc import Iterable

import trio

from tunneld import hookimpl
from tunneld.core import (
    AgentSession,
    AgentTunnel,
    BindRequest,
    Edge,
    EdgeService,
    TunnelConfig,
    TunnelType,
    TunnelTypeRegistry,
    UpstreamHandler,
    choose_host,
    proto,
    refuse_unenforced,
)

from ._agent import parse_http_addr, serve_http_stream
from ._auth import basic_auth_from_opts, bind_opts
from ._edge import HANDLED_OPTS, HttpEdgeTunnel, HttpIngress, refuse_sdk_host_rewrite


class HttpTunnelType(TunnelType):
    name = "http"
    bind_protos = ("http", "https")

    def __init__(self, registry: TunnelTypeRegistry | None = None) -> None:
        self._registry = registry
        #: Plugins answering requests themselves (``file://``), by normalised address.
        self._handlers: dict[str, UpstreamHandler] = {}

    def edge_tunnel(self, edge: Edge, session: AgentSession, bind: proto.Bind, tunnel_id: str) -> HttpEdgeTunnel:
        refuse_unenforced(bind.opts, HANDLED_OPTS)
        refuse_sdk_host_rewrite(session, bind.opts)
        # Before a name is chosen: a refused credential must not hold one.
        auth = basic_auth_from_opts(bind.opts)
        host = choose_host(edge, session, bind, bind.proto)
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
            "Hostname": config.hostname,
            "Subdomain": config.subdomain,
            "Auth": "",
            # Informational, as from ngrok's v2 agent: our agent rewrites Host itself.
            "HostHeaderRewrite": config.host_header == "rewrite",
            "LocalURLScheme": upstream.split("://", 1)[0],
        }
        if config.basic_auth:
            opts.update(bind_opts(config.basic_auth))
        # Like ngrok's v2 agent: one Bind per public scheme, https first; the edge gives both
        # the same hostname.  The http one is named "<name> (http)".
        requests = []
        for scheme in ("https", "http"):
            if scheme in config.schemes:
                name = config.name if scheme == "https" or "https" not in config.schemes else f"{config.name} (http)"
                requests.append(BindRequest(name, proto.Bind(proto=scheme, forwards_to=upstream, opts=dict(opts),
                                                             extra=proto.BindExtra(name=config.name))))
        return requests

    async def agent_handle(self, tunnel: AgentTunnel, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        handler = self._handlers.get(tunnel.upstream)
        if handler is not None:
            await handler.serve(stream, header, tunnel.metrics.request_done)
        else:
            await serve_http_stream(tunnel, stream, header)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add(HttpTunnelType(registry))


@hookimpl
def tunneld_edge_services(edge: Edge) -> Iterable[EdgeService]:
    return [HttpIngress(edge)]
