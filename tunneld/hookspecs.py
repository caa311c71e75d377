"""The plugin contract: every hook tunneld calls, with what it passes and expects.

Built-in tunnel types (http, tcp, ...) implement these hooks exactly as a third-party plugin
does; third-party plugins are found through the ``tunneld`` entry-point group.  Hooks are
synchronous: asynchronous work is returned as objects with ``run(*, task_status)`` that the
core starts in a nursery it owns (plugins never receive a nursery).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from tunneld.core import Edge, EdgeService, TunnelTypeRegistry

hookspec = pluggy.HookspecMarker("tunneld")

# ---- registration (once, at startup, on the edge and on the agent) -------------------------


@hookspec
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    """Add tunnel types with ``registry.add(tunnel_type)``; a duplicate name is an error."""


# ---- edge ------------------------------------------------------------------------------------


@hookspec
def tunneld_edge_services(edge: Edge) -> Iterable[EdgeService]:
    """Return long-running edge services (public listeners, gateways).

    Each is started with ``await nursery.start(service.run)`` before the edge reports ready;
    ``run`` must call ``task_status.started()`` once its listeners are bound.
    """


# ---- command line ----------------------------------------------------------------------------


@hookspec
def tunneld_add_commands(cli: click.Group) -> None:
    """Attach extra click commands to the ``tunneld`` command group."""
