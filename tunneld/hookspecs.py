"""The plugin contract: every hook tunneld calls, with what it passes and expects.

Built-in tunnel types (http, tcp, ...) implement these hooks exactly as a third-party plugin
does; third-party plugins are found through the ``tunneld`` entry-point group.  Hooks are
synchronous: asynchronous work is returned as objects with ``run(*, task_status)`` that the
core starts in a nursery it owns (plugins never receive a nursery).

Every type named here comes from :mod:`tunneld.plugin`, the plugin API, and never from the
edge or agent implementation (which imports this module: no cycle, ``tests/test_plugin_api.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from tunneld.plugin import EdgeContext, EdgeService, TlsFront, TunnelTypeRegistry, UpstreamHandler

hookspec = pluggy.HookspecMarker("tunneld")

# ---- registration (once, at startup, on the edge and on the agent) -------------------------


@hookspec
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    """Add tunnel types with ``registry.add(tunnel_type)``; a duplicate name is an error."""


# ---- edge ------------------------------------------------------------------------------------


@hookspec
def tunneld_edge_services(edge: EdgeContext) -> Iterable[EdgeService]:
    """Return long-running edge services (public listeners, gateways).

    Each is started with ``await nursery.start(service.run)`` before the edge reports ready;
    ``run`` must call ``task_status.started()`` once its listeners are bound.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this


@hookspec
def tunneld_edge_tls_front(edge: EdgeContext) -> TlsFront | None:
    """Return the object that sees each public HTTPS connection before the edge terminates TLS.

    Called once, before the edge services start.  Its ``route(stream, client_addr)`` peeks at
    the ClientHello and either takes the connection (SNI-routed TLS tunnels) or hands back a
    stream replaying what it read, which the edge then terminates as usual.  Return None to
    stay out; more than one plugin returning a front is a PluginError.
    """


# ---- agent -----------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tunneld_agent_upstream(url: str) -> UpstreamHandler | None:
    """Claim an HTTP tunnel's forwarding address, to answer its requests in the agent itself.

    Called on the agent for each HTTP tunnel's address as the user wrote it (``file:///srv``,
    but also ``8080``: ignore what is not yours).  Return an object whose
    ``serve(stream, header, request_done)`` answers one public connection's HTTP/1.x requests,
    or None.  Raise ValueError, with a message for the user, for an address in your scheme
    that cannot be served (relative path, missing directory).  The first non-None answer wins.
    """


# ---- command line ----------------------------------------------------------------------------


@hookspec
def tunneld_add_commands(cli: click.Group) -> None:
    """Attach extra click commands to the ``tunneld`` command group."""
