"""UDP tunnels for tunneld, shipped as an outside plugin (``tunneld udp 5353``).

tunneld finds this module through the ``tunneld`` entry-point group (see ``setup.cfg``) and
registers it with its plugin manager: it holds the hook implementations and nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunneld.plugin import TunnelTypeRegistry, hookimpl, tunnel_command

from ._type import UdpTunnelType

if TYPE_CHECKING:
    import click

__all__ = ["UdpTunnelType"]


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    """The ``udp`` tunnel type, on the edge and on the agent."""
    registry.add(UdpTunnelType())


@hookimpl
def tunneld_add_commands(cli: click.Group) -> None:
    """``tunneld udp ADDR [--idle-timeout SECONDS] [--remote-addr [HOST:]PORT]``."""
    cli.add_command(tunnel_command(UdpTunnelType()))
