"""Labeled tunnels (``StartTunnelWithLabel``): routed by labels to an edge configuration (built-in plugin).

ngrok's agents and SDKs start them with labels (``edge=edghts_...``) instead of a public name;
the control plane then decides where traffic goes.  This edge has no such control plane yet,
so its labeled tunnels are refused, with the same error as before they were dispatched through
the registry (``PROTO_UNSUPPORTED``).  A plugin serving them replaces this one
(disable it with ``TUNNELD_DISABLE_PLUGINS=tunneld.plugins.labeled``).
"""

from __future__ import annotations

from tunneld.plugin import (
    Code,
    EdgeContext,
    EdgeTunnel,
    SessionContext,
    TunnelRejected,
    TunnelTypeRegistry,
    hookimpl,
    proto,
)


class RefuseLabeled:
    """Serves labeled tunnels by refusing each one: no control plane gives them edges yet."""

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, request: proto.StartTunnelWithLabel,
                    tunnel_id: str) -> EdgeTunnel:
        raise TunnelRejected("labeled tunnels are not served by this edge", Code.PROTO_UNSUPPORTED)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add_labeled(RefuseLabeled())
