"""The plugin API's contexts (``tunneld.plugin``) over today's Edge, AgentSession and AgentTunnel.

:class:`EdgeAdapter`, :class:`SessionAdapter` and :class:`AgentTunnelAdapter` implement
:class:`~tunneld.core._tunnel.EdgeContext`, :class:`~tunneld.core._tunnel.SessionContext` and
:class:`~tunneld.core._tunnel.AgentTunnelContext` by delegating to the implementation, which
they do not change.  Each call is one direct call into it: ``SessionAdapter.open_stream`` runs
once per public connection.

Transport-keyed addresses: TCP ports are the edge's own port table (``RouteTable.ports``,
names of kind ``port`` in :class:`~tunneld.core._names.NameClaims`, as resume tokens already
in agents' hands say); every other transport's ports are kept here, per edge, with names of
the transport's own kind (``udp``), so ``tcp:N`` and ``udp:N`` never collide.

Transitional (issue 12): the edge and agent still pass their own objects to plugins; the tls
plugin wraps them with :func:`as_edge_context` and friends, which are idempotent.  Once the
edge and agent hand out contexts themselves, the ``as_*`` helpers go.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from ._access import log_connection
from ._errors import Code, TunnelRejected
from ._hostnames import choose_host

if TYPE_CHECKING:
    from OpenSSL import SSL

    from ._agent import AgentTunnel
    from ._config import TunnelConfig
    from ._edge import AgentSession, Edge
    from ._forward import ByteCounts
    from ._store import Store
    from ._tunnel import AgentTunnelContext, EdgeContext, SessionContext, TunnelTypeRegistry
    from .proto import Bind, ProxyHeader

access_log = logging.getLogger("tunneld.access")

#: The transport whose ports are the edge's own port table (and names of kind ``port``).
TCP = "tcp"


def address_kind(transport: str) -> str:
    """The :class:`NameClaims` kind of ``transport``'s ports: ``port`` for TCP, else the transport."""
    if transport == TCP:
        return "port"
    if not transport or transport in ("host", "port"):
        # Those kinds are hostnames' and TCP's: a transport named so would share their claims.
        raise ValueError(f"{transport!r} cannot name a transport")
    return transport


@attrs.define(eq=False)
class _EdgeState:
    """What the adapters of one edge share: deliberately no reference to the edge itself."""

    #: (transport, port) → holder, for every transport but TCP.
    addresses: dict[tuple[str, int], object] = attrs.field(factory=dict)
    #: (metric, sorted labels) → total.
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = attrs.field(factory=dict)


# Per edge, without keeping it alive: Edge is a slotted attrs class (no attribute to cache on),
# and a cached adapter, which refers to its edge, would keep a WeakKeyDictionary's key alive.
_STATES: weakref.WeakKeyDictionary[Edge, _EdgeState] = weakref.WeakKeyDictionary()


@final
class EdgeAdapter:
    """:class:`EdgeContext` over an :class:`~tunneld.core.Edge`."""

    __slots__ = ("_edge", "_state")

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        state = _STATES.get(edge)
        if state is None:
            state = _STATES[edge] = _EdgeState()
        self._state = state

    def __repr__(self) -> str:
        return f"<EdgeAdapter {self._edge.config.domain}>"

    @property
    def domain(self) -> str:
        return self._edge.config.domain

    @property
    def data_dir(self) -> Path:
        return Path(self._edge.config.data_dir)

    @property
    def store(self) -> Store:
        return self._edge.store

    @property
    def registry(self) -> TunnelTypeRegistry:
        return self._edge.registry

    @property
    def ports(self) -> Mapping[str, int]:
        return self._edge.ports

    @property
    def stopping(self) -> trio.Event:
        return self._edge.stopping

    @property
    def ssl_context(self) -> SSL.Context:
        ctx: SSL.Context = self._edge.ssl_context
        return ctx

    def ensure_certificate(self, host: str) -> None:
        self._edge.ensure_certificate(host)

    def listen_addr(self, name: str) -> tuple[str, int] | None:
        cfg = self._edge.config
        return {"agent": cfg.agent_addr, "http": cfg.http_addr, "https": cfg.https_addr}.get(name)

    def port_range(self, transport: str) -> tuple[str, int, int] | None:
        if transport != TCP:
            return None  # the edge has no port range for other transports yet
        cfg = self._edge.config
        low, high = cfg.tcp_ports
        return cfg.tcp_host, low, high

    def public_url(self, scheme: str, host: str) -> str:
        return self._edge.public_url(scheme, host)

    async def open_public_listeners(self, name: str, flag: str,
                                    addr: tuple[str, int]) -> list[trio.SocketListener]:
        return await self._edge.open_public_listeners(name, flag, addr)

    async def serve_public(self, handler: Callable[[trio.SocketStream], Awaitable[None]],
                           listeners: list[trio.SocketListener], *, pool: str = "public",
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._edge.serve_public(handler, listeners, pool=pool, task_status=task_status)

    def count_listener_fds(self, delta: int) -> None:
        self._edge.listener_fds += delta

    async def route_tls(self, stream: trio.SocketStream, client_addr: str) -> trio.abc.Stream | None:
        return await self._edge.route_tls(stream, client_addr)

    # ---- hostnames ---------------------------------------------------------------------------

    def claim_host(self, route: str, host: str, holder: object, owner: str) -> None:
        self._edge.routes.claim_host(route, host, holder, owner)

    def release_host(self, route: str, host: str, holder: object) -> None:
        self._edge.routes.release_host(route, host, holder)

    def lookup_host(self, route: str, host: str) -> Any:
        return self._edge.routes.lookup(route, host)

    def host_available(self, host: str, owner: str) -> bool:
        return self._edge.routes.host_available(host, owner)

    # ---- transport addresses -----------------------------------------------------------------

    def claim_address(self, transport: str, port: int, holder: object, owner: str) -> None:
        routes = self._edge.routes
        if transport == TCP:
            routes.claim_port(port, holder, owner)
            return
        kind = address_kind(transport)
        key = (transport, port)
        current = self._state.addresses.get(key)
        if current is not None and current is not holder:
            raise TunnelRejected(f"{transport} port {port} is already in use by another tunnel",
                                 Code.ADDRESS_IN_USE)
        if owner:
            # Checked here rather than left to NameClaims.acquire, whose message knows only
            # hostnames and TCP ports.  Not live here, yet someone else's: a hold.
            held_for = routes.names.owner_of(kind, str(port))
            if held_for not in (None, owner):
                raise TunnelRejected(f"{transport} port {port} is held for its previous owner",
                                     Code.ADDRESS_IN_USE)
            routes.names.acquire(kind, str(port), owner, holder)
        self._state.addresses[key] = holder

    def release_address(self, transport: str, port: int, holder: object) -> None:
        routes = self._edge.routes
        if transport == TCP:
            routes.release_port(port, holder)
            return
        key = (transport, port)
        if self._state.addresses.get(key) is holder:
            del self._state.addresses[key]
        routes.names.release(address_kind(transport), str(port), holder)

    def lookup_address(self, transport: str, port: int) -> Any:
        if transport == TCP:
            return self._edge.routes.ports.get(port)
        return self._state.addresses.get((transport, port))

    def address_available(self, transport: str, port: int, owner: str) -> bool:
        if transport == TCP:
            return self._edge.routes.port_available(port, owner)
        return ((transport, port) not in self._state.addresses
                and self._edge.routes.names.available(address_kind(transport), str(port), owner))

    def address_owner(self, transport: str, port: int) -> str | None:
        return self._edge.routes.names.owner_of(address_kind(transport), str(port))

    def address_name(self, transport: str, port: int) -> tuple[str, str]:
        return address_kind(transport), str(port)

    # ---- observability -----------------------------------------------------------------------

    def log_connection(self, *, client: str, proto: str, result: str, started: float, host: str = "",
                       tunnel_id: str = "", url: str = "", counts: ByteCounts | None = None) -> None:
        log_connection(client=client, proto=proto, result=result, started=started, host=host,
                       tunnel_id=tunnel_id, url=url, counts=counts)

    def log_request(self, *, client: str, host: str, tunnel_id: str, method: str, path: str, status: int,
                    started: float) -> None:
        # The http plugin's request line (plugins/http/_edge.py, HttpIngress._access), verbatim.
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                'client=%s host=%s tunnel=%s method=%s path="%s" status=%d duration_ms=%.1f',
                client, host or "-", tunnel_id or "-", method, path.replace('"', "%22")[:512], status,
                (time.monotonic() - started) * 1000,
            )

    def count(self, metric: str, value: float = 1, **labels: str) -> None:
        key = (metric, tuple(sorted(labels.items())))
        counters = self._state.counters
        counters[key] = counters.get(key, 0) + value

    def counted(self, metric: str, **labels: str) -> float:
        """The total :meth:`count` has added to ``metric`` with exactly ``labels`` (for tests)."""
        return self._state.counters.get((metric, tuple(sorted(labels.items()))), 0)


@final
class SessionAdapter:
    """:class:`SessionContext` over an :class:`~tunneld.core.AgentSession`."""

    __slots__ = ("_session",)

    def __init__(self, session: AgentSession) -> None:
        self._session = session

    def __repr__(self) -> str:
        return f"<SessionAdapter {self._session.remote_addr}>"

    @property
    def owner(self) -> str:
        return self._session.owner

    @property
    def remote_addr(self) -> str:
        return self._session.remote_addr

    @property
    def client_type(self) -> str:
        auth = self._session.auth
        return auth.extra.client_type if auth is not None else ""

    def resumed_name(self, bind: Bind, kind: str) -> str | None:
        return self._session.resumed_name(bind, kind)

    def choose_host(self, bind: Bind, pair: str) -> str:
        return choose_host(self._session.edge, self._session, bind, pair)

    async def open_stream(self, tunnel_id: str, client_addr: str, proto: str, *,
                          passthrough_tls: bool = False, first: bytes = b"") -> trio.abc.HalfCloseableStream:
        return await self._session.open_proxy_stream(tunnel_id, client_addr, proto,
                                                     passthrough_tls=passthrough_tls, first=first)


@final
class AgentTunnelAdapter:
    """:class:`AgentTunnelContext` over an :class:`~tunneld.core.AgentTunnel`."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: AgentTunnel) -> None:
        self._tunnel = tunnel

    def __repr__(self) -> str:
        return f"<AgentTunnelAdapter {self._tunnel.name}>"

    @property
    def name(self) -> str:
        return self._tunnel.name

    @property
    def config(self) -> TunnelConfig:
        return self._tunnel.config

    @property
    def upstream(self) -> str:
        return self._tunnel.upstream

    @property
    def public_url(self) -> str:
        return self._tunnel.public_url

    def request_done(self, seconds: float) -> None:
        self._tunnel.metrics.request_done(seconds)

    async def open_upstream(self, stream: trio.abc.HalfCloseableStream,
                            header: ProxyHeader) -> trio.abc.HalfCloseableStream | None:
        from ._agent import open_upstream  # at call time: the agent will import this module

        return await open_upstream(self._tunnel, stream, header)

    async def forward_to_upstream(self, stream: trio.abc.HalfCloseableStream, header: ProxyHeader) -> None:
        from ._agent import forward_to_upstream

        await forward_to_upstream(self._tunnel, stream, header)


# ---- transitional: until the edge and the agent pass contexts themselves ------------------------


def as_edge_context(edge: EdgeContext | Edge) -> EdgeContext:
    """``edge`` as an :class:`EdgeContext`: an Edge is wrapped, anything else returned as is."""
    from ._edge import Edge  # at call time: the edge will import this module

    return EdgeAdapter(edge) if isinstance(edge, Edge) else edge


def as_session_context(session: SessionContext | AgentSession) -> SessionContext:
    """``session`` as a :class:`SessionContext`: an AgentSession is wrapped, anything else as is."""
    from ._edge import AgentSession

    return SessionAdapter(session) if isinstance(session, AgentSession) else session


def as_tunnel_context(tunnel: AgentTunnelContext | AgentTunnel) -> AgentTunnelContext:
    """``tunnel`` as an :class:`AgentTunnelContext`: an AgentTunnel is wrapped, anything else as is."""
    from ._agent import AgentTunnel

    return AgentTunnelAdapter(tunnel) if isinstance(tunnel, AgentTunnel) else tunnel
