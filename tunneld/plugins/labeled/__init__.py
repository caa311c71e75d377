"""Labeled tunnels (``StartTunnelWithLabel``) and the edges that route to them (built-in plugin).

ngrok's agents and SDKs start them with labels (``edge=edghts_...``) instead of a public name;
an edge of the store (``tunneld api edges create``) routes its hostname (https, tls) or address
(tcp) to the group of its account's labeled tunnels whose labels include all of its selector's
(see ``_edge``).  ``tunneld tunnel --label k=v ADDR`` starts one with our agent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from tunneld.plugin import (
    AgentTunnelContext,
    BindRequest,
    Code,
    ConfigError,
    EdgeContext,
    EdgeService,
    EdgeTunnel,
    SessionContext,
    TunnelConfig,
    TunnelRejected,
    TunnelType,
    TunnelTypeRegistry,
    hookimpl,
    proto,
)

from ._agent import parse_labeled_addr, serve_labeled_stream
from ._edge import LabeledService, LabeledTunnelsServer
from ._options import LABELED_HELP, LABELED_OPTIONS

if TYPE_CHECKING:
    import click


class LabeledTunnelType(TunnelType):
    """The agent's side: ``tunneld tunnel --label k=v ADDR`` (config ``labels: [k=v]``)."""

    name = "tunnel"
    #: None: the edge serves labeled tunnels through ``add_labeled``, not by Bind.
    bind_protos = ()
    options = LABELED_OPTIONS
    help = LABELED_HELP

    def __init__(self, registry: TunnelTypeRegistry | None = None) -> None:
        self._registry = registry

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, bind: proto.Bind,
                    tunnel_id: str) -> EdgeTunnel:  # pragma: no cover - no Bind proto
        raise TunnelRejected("labeled tunnels start with StartTunnelWithLabel", Code.PROTO_UNSUPPORTED)

    def parse_addr(self, addr: str) -> str:
        # The http type's parser, when there is one: the same addresses (file:// too) as `tunneld http`.
        if self._registry is not None and "http" in self._registry:
            return self._registry["http"].parse_addr(addr)
        return parse_labeled_addr(addr)

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        # One entry for the agent's API; the agent sends agent_start_labeled's message instead.
        self.agent_start_labeled(config)
        return [BindRequest(config.name, proto.Bind(proto="", forwards_to=self.parse_addr(config.addr),
                                                    extra=proto.BindExtra(name=config.name)))]

    def agent_start_labeled(self, config: TunnelConfig) -> proto.StartTunnelWithLabel:
        """The StartTunnelWithLabel the agent sends for ``config`` (instead of a Bind)."""
        labels = dict(item.split("=", 1) for item in config.option("labels"))
        if not labels:
            where = "--label" if config.name == "command_line" else f"tunnels.{config.name}.labels"
            raise ConfigError(f"{where}: a labeled tunnel needs at least one label KEY=VALUE")
        return proto.StartTunnelWithLabel(labels=labels, forwards_to=self.parse_addr(config.addr),
                                          metadata=config.metadata)

    async def agent_handle(self, tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader) -> None:
        await serve_labeled_stream(self._registry, tunnel, stream, header)


@hookimpl
def tunneld_register_tunnel_types(registry: TunnelTypeRegistry) -> None:
    registry.add_labeled(LabeledTunnelsServer())
    registry.add(LabeledTunnelType(registry))


@hookimpl
def tunneld_edge_services(edge: EdgeContext) -> Iterable[EdgeService]:
    return [LabeledService(edge)]


@hookimpl
def tunneld_add_commands(cli: click.Group) -> None:
    from tunneld.plugin import tunnel_command

    cli.add_command(tunnel_command(LabeledTunnelType()))
