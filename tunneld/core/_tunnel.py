"""What a tunnel type is, and the registry plugins add theirs to.

A :class:`TunnelType` knows both ends of one kind of tunnel:

* on the edge, :meth:`TunnelType.edge_tunnel` turns a Bind into an :class:`EdgeTunnel` whose
  ``run(*, task_status)`` claims the public address (a hostname route, a TCP port), reports
  it with ``started(TunnelInfo)`` and serves until cancelled, releasing the address on exit;
* on the agent, :meth:`TunnelType.agent_binds` says which Binds to send for a configured
  tunnel, and :meth:`TunnelType.agent_handle` serves one proxied stream.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
import trio

from ._errors import Code, PluginError, TunnelRejected

if TYPE_CHECKING:
    from ._agent import AgentTunnel
    from ._config import TunnelConfig
    from ._edge import AgentSession, Edge
    from .proto import Bind, ProxyHeader


@attrs.frozen
class TunnelInfo:
    """What an edge tunnel reports once its public address is claimed."""

    #: Public URL, e.g. ``https://ab12cd34.tunneld.localhost:8443`` or ``tcp://edge:20001``.
    url: str
    #: Public protocol (``http``, ``https``, ``tcp``, ...).
    proto: str
    #: The public name claimed, as ``(kind, name)`` of :class:`~tunneld.core.RouteTable`
    #: (``("host", "ab12.example.com")``, ``("port", "20001")``): the edge signs it into the
    #: Bind's resume token so a reconnecting agent gets the same address back.
    name: tuple[str, str] | None = None


class EdgeTunnel(Protocol):
    """An edge-side tunnel; started with ``await nursery.start(tunnel.run)``."""

    async def run(self, *, task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim the public address, report it, serve until cancelled, then release it.

        Raises :class:`~tunneld.core.TunnelRejected` before ``started()`` when the address
        cannot be had.
        """
        ...


class EdgeService(Protocol):
    """A long-running edge service contributed by a plugin (public listeners, gateways)."""

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        ...


class TlsFront(Protocol):
    """Sees every connection on the public HTTPS port before the edge terminates TLS.

    Contributed by a plugin through ``tunneld_edge_tls_front`` (the tls plugin routes by SNI).
    """

    async def route(self, stream: trio.SocketStream, client_addr: str) -> trio.abc.Stream | None:
        """Take the connection, or hand it back for the edge to terminate.

        Returns None once the front has dealt with the connection itself (forwarded it,
        refused it); the caller then closes ``stream``.  Otherwise returns the stream to run
        the edge's TLS handshake on: ``stream`` itself, or a wrapper replaying the bytes the
        front already read from it.
        """
        ...


class UpstreamHandler(Protocol):
    """Answers an HTTP tunnel's requests in the agent itself (e.g. the file server).

    Returned by a plugin's ``tunneld_agent_upstream`` hook for an address it claims.
    """

    #: Normalised address, shown as the tunnel's upstream (``file:///srv/share``).
    url: str

    async def serve(self, stream: trio.abc.HalfCloseableStream, header: ProxyHeader,
                    request_done: Callable[[float], None] | None = None) -> None:
        """Answer the HTTP/1.x requests of one public connection; the caller closes ``stream``.

        ``request_done`` is called with each request's duration in seconds (tunnel metrics).
        """
        ...


@attrs.frozen
class BindRequest:
    """One Bind the agent sends for a configured tunnel."""

    #: Name shown in the agent's API: ``command_line`` or ``command_line (http)``.
    name: str
    bind: Bind


class TunnelType(abc.ABC):
    """A kind of tunnel, registered by a plugin through ``tunneld_register_tunnel_types``."""

    #: Name used on the command line and in config files (``tunneld http``, ``proto: http``).
    name: ClassVar[str]
    #: ``Bind.Proto`` values the edge serves with this type.
    bind_protos: ClassVar[tuple[str, ...]]

    # ---- edge ----

    @abc.abstractmethod
    def edge_tunnel(self, edge: Edge, session: AgentSession, bind: Bind, tunnel_id: str) -> EdgeTunnel:
        """Validate ``bind`` and return the tunnel to start; raise TunnelRejected to refuse."""

    # ---- agent ----

    @abc.abstractmethod
    def parse_addr(self, addr: str) -> str:
        """Normalise the forwarding address (``8080`` → ``http://localhost:8080``); ValueError if bad."""

    @abc.abstractmethod
    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        """The Binds to send for ``config``."""

    @abc.abstractmethod
    async def agent_handle(self, tunnel: AgentTunnel, stream: trio.abc.HalfCloseableStream,
                           header: ProxyHeader) -> None:
        """Serve one proxied stream; the caller closes ``stream`` afterwards."""


@attrs.define
class TunnelTypeRegistry:
    """Tunnel types by name and by the Bind protocols they serve."""

    _types: dict[str, TunnelType] = attrs.field(factory=dict)
    _by_proto: dict[str, TunnelType] = attrs.field(factory=dict)
    #: The ``tunneld_agent_upstream`` hook, set by ``build_registry``.
    _upstream_hook: Callable[..., UpstreamHandler | None] | None = None

    def agent_upstream(self, url: str) -> UpstreamHandler | None:
        """The handler a plugin offers to serve ``url`` itself (``file://…``), or None.

        Raises ValueError when the claiming plugin finds the address unusable.
        """
        return None if self._upstream_hook is None else self._upstream_hook(url=url)

    def add(self, tunnel_type: TunnelType) -> None:
        """Register ``tunnel_type``; a name or Bind protocol already taken is a PluginError."""
        if tunnel_type.name in self._types:
            raise PluginError(f"tunnel type {tunnel_type.name!r} is registered twice")
        for proto in tunnel_type.bind_protos:
            if proto in self._by_proto:
                raise PluginError(
                    f"bind protocol {proto!r} is claimed by {self._by_proto[proto].name!r} "
                    f"and {tunnel_type.name!r}"
                )
        self._types[tunnel_type.name] = tunnel_type
        for proto in tunnel_type.bind_protos:
            self._by_proto[proto] = tunnel_type

    def __getitem__(self, name: str) -> TunnelType:
        try:
            return self._types[name]
        except KeyError:
            raise PluginError(f"unknown tunnel type {name!r} (known: {', '.join(sorted(self._types))})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        return sorted(self._types)

    def for_bind_proto(self, proto: str) -> TunnelType | None:
        return self._by_proto.get(proto)


def _is_empty(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_empty(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_empty(v) for v in value)
    return not value


def refuse_unenforced(opts: dict[str, Any], handled: set[str]) -> None:
    """Refuse every Bind option outside ``handled`` (lower-case names) that asks for something.

    Clients may ask the edge to enforce basic auth, OAuth, IP restrictions, mutual TLS ...;
    an edge that cannot must say so rather than bind without them.  Empty values are fine,
    except an object: the Rust SDKs switch some modules on with an empty one
    (``"Compression": {}``, ``"WebsocketTCPConverter": {}``).
    """
    for key, value in opts.items():
        lkey = key.lower()
        if lkey in handled or (not isinstance(value, dict) and _is_empty(value)):
            continue
        names = {"auth": "basic authentication", "basicauth": "basic authentication",
                 "proxyproto": "PROXY protocol", "oauth": "OAuth", "oidc": "OIDC",
                 "iprestriction": "IP restrictions", "mutualtlsca": "mutual TLS",
                 "circuitbreaker": "circuit breakers", "trafficpolicy": "traffic policy",
                 "webhookverification": "webhook verification", "compression": "compression"}
        what = names.get(lkey, f"the {key} option")
        raise TunnelRejected(f"{what} is not supported by this edge; refusing rather than ignoring it",
                             Code.OPTION_UNSUPPORTED)


def proxy_proto_option(opts: dict[str, Any]) -> int:
    """The Bind's ``ProxyProto`` option: 0 (none), 1 or 2; TunnelRejected for anything else.

    Tunnel types that honour it (the edge writes the PROXY header, see
    :func:`tunneld.core.proto.encode_proxy_header`) list ``proxyproto`` as handled in
    :func:`refuse_unenforced`; the others keep refusing it.
    """
    for key, value in opts.items():
        if key.lower() != "proxyproto" or value is None:
            continue
        if not isinstance(value, bool):  # True == 1 in Python, but it is no version number
            if value in ("", 0, "0"):
                return 0
            if value in (1, 2, "1", "2"):
                return int(value)
        elif not value:
            return 0
        raise TunnelRejected(f"PROXY protocol version {value!r} does not exist (use 1 or 2)",
                             Code.OPTION_UNSUPPORTED)
    return 0
