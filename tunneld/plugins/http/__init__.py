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
    proto,
    refuse_unenforced,
)

from ._agent import parse_http_addr, serve_http_stream
from ._edge import HANDLED_OPTS, HttpEdgeTunnel, HttpIngress, choose_host


class HttpTunnelType(TunnelType):
    name = "http"
    bind_protos = ("http", "https")

    def edge_tunnel(self, edge: Edge, session: AgentSession, bind: proto.Bind, tunnel_id: str) -> HttpEdgeTunnel:
        refuse_unenforced(bind.opts, HANDLED_OPTS)
        host = choose_host(edge, session, bind, bind.proto)
        return HttpEdgeTunnel(edge, session, tunnel_id, bind.proto, host)

    def parse_addr(self, addr: str) -> str:
        return parse_http_addr(addr)

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        upstream = parse_http_addr(config.addr)
        opts = {
            "Hostname": config.hostname,
            "Subdomain": config.subdomain,
            "Auth": "",
            "HostHeaderRewrite": False,
            "LocalURLScheme": upstream.split("://", 1)[0],
        }
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
        await serve_http_stream(tunnel, stream, header)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add(HttpTunnelType())


@hookimpl
def tunneld_edge_services(edge: Edge) -> Iterable[EdgeService]:
    return [HttpIngress(edge)]
