"""What a tunnel type is, the registry plugins add theirs to, and what the core hands them.

A :class:`TunnelType` knows both ends of one kind of tunnel:

* on the edge, :meth:`TunnelType.edge_tunnel` turns a Bind into an :class:`EdgeTunnel` whose
  ``run(*, task_status)`` claims the public address (a hostname route, a TCP port), reports
  it with ``started(TunnelInfo)`` and serves until cancelled, releasing the address on exit;
* on the agent, :meth:`TunnelType.agent_binds` says which Binds to send for a configured
  tunnel, and :meth:`TunnelType.agent_handle` serves one proxied stream.

Plugins see the core only through three protocols, the way pytest hands its plugins ``config``
and ``session`` rather than its internals: :class:`EdgeContext` (the edge process),
:class:`SessionContext` (one connected agent, on the edge) and :class:`AgentTunnelContext`
(one configured tunnel, on the agent).  They live here, below the implementation
(``_edge``/``_agent`` import this module, never the reverse), and are published by
:mod:`tunneld.plugin`; the edge (``_edge.EdgeAdapter``, ``AgentSession``) and the agent
(``_agent.AgentTunnelAdapter``) implement them.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
import trio

from ._errors import Code, PluginError, TunnelRejected

if TYPE_CHECKING:
    from pathlib import Path

    from OpenSSL import SSL

    from ._forward import ByteCounts
    from ._ratelimit import FailureLimiter
    from ._store import Store
    from .proto import Bind, ProxyHeader, StartTunnelWithLabel


@attrs.frozen
class TunnelInfo:
    """What an edge tunnel reports once its public address is claimed."""

    #: Public URL, e.g. ``https://ab12cd34.tunneld.localhost:8443`` or ``tcp://edge:20001``.
    url: str
    #: Public protocol (``http``, ``https``, ``tcp``, ...).
    proto: str
    #: The public name claimed: ``("host", "ab12.example.com")``, or an address as
    #: :meth:`EdgeContext.address_name` spells it (``("port", "20001")``).  The edge signs it
    #: into the Bind's resume token so a reconnecting agent gets the same name back.
    name: tuple[str, str] | None = None


class EdgeTunnel(Protocol):
    """An edge-side tunnel; started with ``await nursery.start(tunnel.run)``."""

    async def run(self, *, task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim the public address, report it, serve until cancelled, then release it.

        Raises :class:`~tunneld.core.TunnelRejected` before ``started()`` when the address
        cannot be had.
        """
        ...


class ClaimTunnel:
    """Base for an edge tunnel that is a claim on a public address and nothing more (a hostname
    route, a label group's membership): no task of its own while it exists.

    Subclasses implement :meth:`claim` and :meth:`release`.  An agent session calls them
    directly (an idle tunnel then costs the edge no task, nursery or cancel scope: about 3 KB
    each, issue 17); :meth:`run`, the :class:`EdgeTunnel` protocol, is made of them for
    everyone else (the SSH gateway, third-party sessions).
    """

    __slots__ = ()

    async def claim(self) -> TunnelInfo:
        """Claim the public address and say what it is; TunnelRejected if it cannot be had.

        Nothing may stay claimed if this raises (it may be cancelled at any await).
        """
        raise NotImplementedError

    def release(self) -> None:
        """Let go of what :meth:`claim` took (called once, only after it succeeded)."""
        raise NotImplementedError

    async def run(self, *, task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        info = await self.claim()
        try:
            task_status.started(info)
            await trio.sleep_forever()
        finally:
            self.release()


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


# ---- tunnel options and configuration ----------------------------------------------------------


@attrs.frozen
class TunnelOption:
    """One setting of a tunnel type: a config-file key and (optionally) an agent command flag.

    Declared in :attr:`TunnelType.options`.  The config loader checks each tunnel's keys against
    its type's options, and :func:`tunneld.plugin.tunnel_command` makes a flag of each ``flag``.
    The value lands in :attr:`TunnelConfig.options` under ``key``; read it with
    :meth:`TunnelConfig.option`, which gives ``default`` when it was not set.

    ``parse`` validates and normalises the value (the whole list when ``multiple``) and raises
    ``ValueError(message)``: the loader reports ``FILE line N: tunnels.NAME.KEY: message``
    (for a list, at the first item that fails on its own), the command a usage error naming the
    flag.  It receives a ``str`` for ``kind=str``; for other kinds, the value as YAML typed it or
    the flag's text, so it can accept both (``proxy_proto: 2``, ``--proxy-proto 2``).  Without
    ``parse`` the loader and click check the ``kind``.
    """

    #: Config-file key (snake_case); also the key in :attr:`TunnelConfig.options`.
    key: str
    #: Agent command flag (``--basic-auth``); None: config file only.
    flag: str | None
    help: str
    #: ``str``, ``int``, ``float`` or ``bool`` (a ``--flag/--no-flag`` pair on the command).
    kind: type = str
    #: A list in the file, a repeatable flag.
    multiple: bool = False
    #: What :meth:`TunnelConfig.option` gives when the option is not set (a list copy if ``multiple``).
    default: Any = None
    parse: Callable[[Any], Any] | None = None
    #: Other config keys with the same meaning and shape (ngrok v3's ``domain`` for ``hostname``).
    aliases: tuple[str, ...] = ()
    # -- additions --
    #: Other spellings of the flag (``--domain``, ``--url`` for ``--hostname``).
    flag_aliases: tuple[str, ...] = ()
    #: For a spelling that needs converting (ngrok v2's ``bind_tls: false`` is ``schemes: [http]``):
    #: declare it as its own option whose ``parse`` converts, with ``into`` the key it fills.
    #: A ``multiple`` target collects the values of both spellings.
    into: str | None = None
    #: Keys of options that must be set (truthy) whenever this one is (``crt`` needs ``key``).
    requires: tuple[str, ...] = ()
    #: Never shown in reprs (passwords).
    secret: bool = False
    metavar: str | None = None

    @property
    def target(self) -> str:
        """The key in :attr:`TunnelConfig.options` this option fills."""
        return self.into or self.key


def declared_option(type_name: str, key: str) -> TunnelOption | None:
    """The option ``key`` (its own key, not an alias) declared by a tunnel type named ``type_name``.

    Found on the :class:`TunnelType` classes themselves, so configs built in code (tests, the
    demo) get defaults without a registry.
    """
    todo = list(TunnelType.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if getattr(cls, "name", None) == type_name:
            for option in cls.options:
                if option.key == key:
                    return option
    return None


def _any_declared(key: str) -> TunnelOption | None:
    todo = list(TunnelType.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        for option in cls.options:
            if option.key == key:
                return option
    return None


@attrs.define(init=False, repr=False)
class TunnelConfig:
    """One tunnel definition (the ``tunnels:`` map of the config file, or the command line).

    Only what every tunnel type shares is an attribute; the type's own settings are in
    :attr:`options`, read with :meth:`option`.  Keyword arguments the constructor does not
    know are options too (``TunnelConfig("w", "http", "8080", schemes=["http"])``), taken as
    given: the loader and the commands validate, code is trusted.
    """

    name: str
    proto: str
    addr: str
    #: Record requests for the local inspector (types that inspect, see :attr:`TunnelType.inspects`).
    inspect: bool
    #: Free text for the API (ngrok's ``metadata``).
    metadata: str
    #: The type's options that were set, by :attr:`TunnelOption.key`.
    options: dict[str, Any]

    def __init__(self, name: str, proto: str, addr: str, inspect: bool = True, metadata: str = "",
                 options: dict[str, Any] | None = None, **more: Any) -> None:
        self.__attrs_init__(name, proto, addr, inspect, metadata, {**(options or {}), **more})

    def option(self, key: str) -> Any:
        """The value of option ``key``, or its default; KeyError if the type declares no such option."""
        if key in self.options:
            return self.options[key]
        declared = declared_option(self.proto, key)
        if declared is None:
            raise KeyError(f"tunnel type {self.proto!r} has no option {key!r}")
        return _default(declared)

    def __repr__(self) -> str:
        def shown(key: str, value: Any) -> str:
            declared = declared_option(self.proto, key) or _any_declared(key)
            return "'***'" if declared is None or declared.secret else repr(value)

        options = ", ".join(f"{k!r}: {shown(k, v)}" for k, v in self.options.items())
        return (f"TunnelConfig(name={self.name!r}, proto={self.proto!r}, addr={self.addr!r}, "
                f"inspect={self.inspect!r}, metadata={self.metadata!r}, options={{{options}}})")


def _default(option: TunnelOption) -> Any:
    if option.multiple:
        return list(option.default or ())
    return option.default


# ---- what the core hands plugins ---------------------------------------------------------------


class EdgeContext(Protocol):
    """The edge, as a tunnel type and an edge service see it.

    Handed to :meth:`TunnelType.edge_tunnel` and to the edge hooks.  Two kinds of public
    names can be claimed:

    * a *hostname* is routed per ``route``, the public listener serving it (``http``,
      ``https``, or ``tls`` for SNI-routed passthrough on the HTTPS port), but owned as one
      name: all routes of a host belong to one owner, and ``tls`` excludes ``http``/``https``
      (the HTTPS port cannot tell them apart);
    * an *address* is a port of a transport: ``("tcp", 20001)`` and ``("udp", 20001)`` are two
      addresses.

    Claims are owned by an authtoken (:attr:`SessionContext.owner`; ``""`` skips ownership) and
    held for it for the edge's hold period after release, so a reconnecting agent gets its
    names back.  Claiming and releasing never block: claim in ``run``, release in its
    ``finally`` (also when cancelled).  ``holder`` is the claiming object, usually the edge
    tunnel; lookups return it.
    """

    @property
    def domain(self) -> str:
        """The edge's base domain (``--domain``): random names are ``xxxxxxxx.DOMAIN``."""
        ...

    @property
    def data_dir(self) -> Path:
        """The edge's data directory (``--data-dir``), for a plugin's own files."""
        ...

    @property
    def store(self) -> Store:
        """The edge's SQLite store (authtokens, name holds); its methods block: call them in a thread."""
        ...

    @property
    def registry(self) -> TunnelTypeRegistry:
        """Every registered tunnel type."""
        ...

    @property
    def ports(self) -> Mapping[str, int]:
        """Bound port of each public listener by name (``agent``, ``http``, ``https``); absent: off."""
        ...

    @property
    def stopping(self) -> trio.Event:
        """Set when a graceful shutdown begins: stop accepting (``serve_public`` does)."""
        ...

    @property
    def ssl_context(self) -> SSL.Context:
        """The pyOpenSSL server context for public HTTPS; it picks custom hostnames' certificates by SNI."""
        ...

    @property
    def limiter(self) -> FailureLimiter:
        """The edge's failure limiter for logins by address (agents' Auth, the ssh gateway):
        ``attempt(addr, time.monotonic())`` before checking credentials gives the delay to put on a
        failure's answer; ``refund(addr)`` after a success."""
        ...

    def ensure_certificate(self, host: str) -> None:
        """Make HTTPS for ``host`` show a valid certificate; TunnelRejected if none (blocking: file I/O)."""
        ...

    def listen_addr(self, name: str) -> tuple[str, int] | None:
        """The configured address of public listener ``name`` (``http``, ``https``, ``ssh``); None: off."""
        ...

    def port_range(self, transport: str) -> tuple[str, int, int] | None:
        """``(bind host, low, high)``: the ports tunnels of ``transport`` may claim; None: none."""
        ...

    def public_url(self, scheme: str, host: str) -> str:
        """URL of ``host`` on the public listener of ``scheme`` (port shown when not the default)."""
        ...

    async def open_public_listeners(self, name: str, flag: str,
                                    addr: tuple[str, int]) -> list[trio.SocketListener]:
        """Bind public listener ``name`` (recorded in :attr:`ports`); ConfigError naming ``flag`` if not."""
        ...

    async def serve_public(self, handler: Callable[[trio.SocketStream], Awaitable[None]],
                           listeners: list[trio.SocketListener], *, pool: str = "public",
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listeners`` until shutdown, each connection in ``handler``, then give the grace period.

        Handlers run behind the edge's per-connection boundary (errors logged, stream closed
        afterwards).  ``pool`` names the budget of open connections they count against:
        beyond it new ones are reset as accepted (``public``, or a service's own, e.g. ``ssh``,
        the same size).  The listeners are closed on return.
        """
        ...

    def count_listener_fds(self, delta: int) -> None:
        """Note ``delta`` more (or fewer) descriptors held by a tunnel's own listeners.

        They come out of the public connections' budget; undo it when the listeners close.
        """
        ...

    async def route_tls(self, stream: trio.SocketStream, client_addr: str) -> trio.abc.Stream | None:
        """Offer a public HTTPS connection to the TLS front (:class:`TlsFront`).

        Returns the stream to terminate TLS on, or None when the front took the connection.
        """
        ...

    # -- hostnames --

    async def refresh_bind_policy(self, owner: str, account_id: str | None, acl: Sequence[str]) -> None:
        """Record the rights of ``owner`` (the ``SessionContext.owner`` of a session a plugin runs,
        such as the ssh gateway's): its account and its credential's ``bind:`` ACL, and read the
        reservations anew.  Every later claim by ``owner`` is checked against them; call it before
        each bind.  An owner never recorded belongs to no account."""
        ...

    def add_session(self, session: ListedSession) -> None:
        """List ``session`` in the admin API's ``/tunnel_sessions`` until :meth:`remove_session`."""
        ...

    def remove_session(self, session: ListedSession) -> None:
        """Stop listing ``session`` (a no-op if it is not listed)."""
        ...

    def host_chooser(self, session: SessionContext) -> Callable[[Bind, str], str]:
        """A fresh :meth:`SessionContext.choose_host` for ``session``: the edge's naming rules.

        A session implemented by a plugin (the ssh gateway's) answers ``choose_host`` with it; it
        remembers the names it gave (twins of one tunnel get one name): take a new one to forget.
        """
        ...

    def claim_host(self, route: str, host: str, holder: object, owner: str) -> None:
        """Route ``host`` on ``route`` to ``holder``; TunnelRejected if taken, held for another owner,
        reserved by another account, or not allowed by ``owner``'s credential ACL."""
        ...

    def release_host(self, route: str, host: str, holder: object) -> None:
        """Undo :meth:`claim_host` (a no-op unless ``holder`` has the claim); the hold period starts."""
        ...

    def lookup_host(self, route: str, host: str) -> Any:
        """The holder routed at ``host`` on ``route``, or None."""
        ...

    def host_available(self, host: str, owner: str) -> bool:
        """Whether ``owner`` could claim ``host`` now: routed nowhere, and not held for someone else."""
        ...

    # -- transport addresses --

    def claim_address(self, transport: str, port: int, holder: object, owner: str, *,
                      requested: bool = False) -> None:
        """Route ``port`` of ``transport`` to ``holder`` (the caller has bound it); TunnelRejected if taken,
        held for another owner, or not ``owner``'s to have: its credential's ACL, and for TCP the
        reservations (a ``requested`` port, as ``--remote-addr`` asks for one, must be reserved by
        the owner's account; a random one must be allowed by its ACL)."""
        ...

    def release_address(self, transport: str, port: int, holder: object) -> None:
        """Undo :meth:`claim_address` (a no-op unless ``holder`` has the claim); the hold period starts."""
        ...

    def lookup_address(self, transport: str, port: int) -> Any:
        """The holder of ``port`` of ``transport``, or None."""
        ...

    def address_available(self, transport: str, port: int, owner: str) -> bool:
        """Whether a random pick by ``owner`` may take the address now: unclaimed, not held for someone
        else, and (TCP) not reserved by any account."""
        ...

    def address_owner(self, transport: str, port: int) -> str | None:
        """Who the address is claimed or held for right now (None: nobody)."""
        ...

    def address_name(self, transport: str, port: int) -> tuple[str, str]:
        """The address as :attr:`TunnelInfo.name` and :meth:`SessionContext.resumed_name` spell it.

        (``("port", "20001")`` for TCP, as resume tokens already in agents' hands say;
        ``(transport, "20001")`` for any other transport.)
        """
        ...

    # -- observability --

    def log_connection(self, *, client: str, proto: str, result: str, started: float, host: str = "",
                       tunnel_id: str = "", url: str = "", counts: ByteCounts | None = None) -> None:
        """Count one public connection in the tunnel's metrics and write its access line
        (``started``: its ``time.monotonic()``).

        ``counts``: the :func:`forward` tally with the public client as ``a``; ``result`` is ``ok``
        or why the connection did not reach its agent (see ``tunneld.core._access``).
        """
        ...

    def log_request(self, *, client: str, host: str, tunnel_id: str, method: str, path: str, status: int,
                    started: float) -> None:
        """Count one HTTP request (status class, duration, tunnel) and write its access line
        (``tunnel_id`` "" when none was found).  Call it for every request, logging on or off."""
        ...

    def count(self, metric: str, value: float = 1, **labels: str) -> None:
        """Add ``value`` to the counter ``metric`` with ``labels`` (``tunneld_<plugin>_<what>_total``).

        Two names add to the core's own series instead: ``auth_failures`` (label ``kind``, e.g.
        ``ssh``) and ``refused_binds`` (label ``code``, an ``ERR_TUNNELD_…`` label), once each.
        """
        ...


class ListedSession(Protocol):
    """A session a plugin runs (the ssh gateway's), as the admin API's ``/tunnel_sessions`` lists it.

    Register it with :meth:`EdgeContext.add_session` while it lives.
    """

    @property
    def session_id(self) -> str:
        """Unique, stable id (the API's ``id``)."""
        ...

    @property
    def account_id(self) -> str:
        """The account whose API keys see it."""
        ...

    @property
    def credential_id(self) -> str:
        """Its credential's API id (``sshc_…``), or "" when it logged in otherwise."""
        ...

    @property
    def remote_addr(self) -> str:
        """``host:port`` of the client."""
        ...

    @property
    def started_at(self) -> float:
        """Wall-clock start."""
        ...

    @property
    def agent_version(self) -> str:
        """What the API's ``agent_version`` shows (``SSH-2.0-OpenSSH_9.2p1 …``)."""
        ...

    @property
    def client_type(self) -> str:
        """What the API's ``client_type`` shows (``ssh``)."""
        ...

    @property
    def tunnel_ids(self) -> list[str]:
        """Ids of the session's tunnels now."""
        ...

    def stop(self, reason: str) -> None:
        """End the session now (the admin API's stop), saying ``reason`` to the client."""
        ...


class SessionContext(Protocol):
    """One connected agent, as the edge side of a tunnel type sees it."""

    @property
    def owner(self) -> str:
        """Who the session's names belong to: its authtoken's id."""
        ...

    @property
    def remote_addr(self) -> str:
        """The agent's ``host:port``."""
        ...

    @property
    def client_type(self) -> str:
        """The Auth message's ClientType: ``tunneld``, ``ngrok-rust``, ... (SDKs start with ``ngrok-``)."""
        ...

    def resumed_name(self, bind: Bind, kind: str) -> str | None:
        """The name of ``kind`` a rebinding tunnel had (from its Bind's resume token), if this owner's."""
        ...

    def choose_host(self, bind: Bind, pair: str) -> str:
        """The public hostname for a name-routed Bind: asked for, resumed, or random.

        ``pair`` groups Binds that share one name when none is asked for (ngrok's v2 agent
        binds ``https`` and ``http`` separately for one tunnel).  TunnelRejected if the name
        asked for is not this owner's to take.  The name is not claimed yet.
        """
        ...

    async def open_stream(self, tunnel_id: str, client_addr: str, proto: str, *,
                          passthrough_tls: bool = False, first: bytes = b"") -> trio.abc.HalfCloseableStream:
        """Open a proxy stream to the agent for one public connection of tunnel ``tunnel_id``.

        ``proto`` is the public protocol (``http``, ``tcp``, ``tls``...); ``passthrough_tls``:
        the stream carries the client's TLS unterminated; ``first``: the connection's first
        bytes, sent with the header in the SYN frame.  Raises BrokenResourceError or
        ClosedResourceError when the session is gone.  The caller closes the stream.
        """
        ...


class ExchangeRecorder(Protocol):
    """Records one HTTP exchange for the local inspector (from :meth:`AgentTunnelContext.record_http`).

    Pass it as ``tap`` to :func:`tunneld.http1.exchange` (it is a
    :class:`tunneld.http1.ExchangeTap`), hand it an error page the relay answers itself with
    :meth:`response_head`, and call :meth:`finish` once the exchange is over, whatever its end.
    Bodies are kept up to a per-message cap (the rest is only counted), so feeding it costs
    little past the first MiB.
    """

    def request_body(self, data: bytes) -> None:
        """A piece of the request body as framed on the wire."""
        ...

    def response_head(self, head: bytes) -> None:
        """The final response head as sent; bytes after the head count as body.  Replaces any earlier one."""
        ...

    def response_body(self, data: bytes) -> None:
        """A piece of the response body as framed on the wire."""
        ...

    def finish(self) -> object:
        """File the exchange (shown by the inspector and the local API); later calls do nothing."""
        ...


class AgentTunnelContext(Protocol):
    """One configured tunnel, as the agent side of a tunnel type sees it."""

    @property
    def name(self) -> str:
        """``command_line`` or ``command_line (http)``: the name in the agent's API."""
        ...

    @property
    def config(self) -> TunnelConfig:
        """The tunnel's configuration (flags or config file)."""
        ...

    @property
    def upstream(self) -> str:
        """Normalised forwarding address (``http://localhost:8080``, ``localhost:22``)."""
        ...

    @property
    def public_url(self) -> str:
        """The URL the edge gave the tunnel."""
        ...

    def request_done(self, seconds: float) -> None:
        """Count one HTTP request that took ``seconds`` in the tunnel's metrics."""
        ...

    def record_http(self, header: ProxyHeader, head: bytes) -> ExchangeRecorder | None:
        """A recorder for one HTTP request with head ``head`` (as received from the edge).

        None when the tunnel is not inspected (``inspect: false``, a type that does not
        inspect, capture disabled): then record nothing, at no cost.
        """
        ...

    async def open_upstream(self, stream: trio.abc.HalfCloseableStream,
                            header: ProxyHeader) -> trio.abc.HalfCloseableStream | None:
        """Connect to :attr:`upstream` for one proxied connection; the caller closes the result.

        When it cannot be reached, ``stream`` is reset and None returned (already logged).
        """
        ...

    async def forward_to_upstream(self, stream: trio.abc.HalfCloseableStream, header: ProxyHeader) -> None:
        """Relay one proxied connection to :attr:`upstream` byte for byte."""
        ...


class LabeledTunnels(Protocol):
    """Serves labeled tunnels (``StartTunnelWithLabel``: routed by labels, not by a public name).

    Registered with :meth:`TunnelTypeRegistry.add_labeled`; the built-in ``labeled`` plugin's
    refuses them until this edge has a control plane to route them.
    """

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, request: StartTunnelWithLabel,
                    tunnel_id: str) -> EdgeTunnel:
        """Validate ``request`` and return the tunnel to start; raise TunnelRejected to refuse."""
        ...


class TunnelType(abc.ABC):
    """A kind of tunnel, registered by a plugin through ``tunneld_register_tunnel_types``."""

    #: Name used on the command line and in config files (``tunneld http``, ``proto: http``).
    name: ClassVar[str]
    #: ``Bind.Proto`` values the edge serves with this type.
    bind_protos: ClassVar[tuple[str, ...]]
    #: The type's own settings: config keys and command flags (:func:`tunneld.plugin.tunnel_command`).
    options: ClassVar[tuple[TunnelOption, ...]] = ()
    #: Help of the type's agent command (``tunneld NAME --help``), with an example.
    help: ClassVar[str] = ""
    #: Whether the type records requests for the local inspector: its command gets
    #: ``--inspect/--no-inspect`` and :meth:`api_config` shows :attr:`TunnelConfig.inspect`.
    inspects: ClassVar[bool] = False

    # ---- edge ----

    @abc.abstractmethod
    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, bind: Bind,
                    tunnel_id: str) -> EdgeTunnel:
        """Validate ``bind`` and return the tunnel to start; raise TunnelRejected to refuse.

        ``session`` is the agent asking; ``tunnel_id`` names the tunnel in the proxy streams
        opened for it (:meth:`SessionContext.open_stream`).
        """

    # ---- agent ----

    @abc.abstractmethod
    def parse_addr(self, addr: str) -> str:
        """Normalise the forwarding address (``8080`` → ``http://localhost:8080``); ValueError if bad."""

    @abc.abstractmethod
    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        """The Binds to send for ``config``."""

    @abc.abstractmethod
    async def agent_handle(self, tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: ProxyHeader) -> None:
        """Serve one proxied stream; the caller closes ``stream`` afterwards."""

    def api_config(self, config: TunnelConfig, upstream: str) -> dict[str, Any]:
        """The tunnel's ``config`` object in the agent's local API (``/api/tunnels``, ngrok's shape).

        ``upstream`` is the normalised forwarding address.  Override to add the type's own keys.
        """
        return {"addr": upstream, "inspect": config.inspect if self.inspects else False}


@attrs.define
class TunnelTypeRegistry:
    """Tunnel types by name and by the Bind protocols they serve."""

    _types: dict[str, TunnelType] = attrs.field(factory=dict)
    _by_proto: dict[str, TunnelType] = attrs.field(factory=dict)
    #: What serves labeled tunnels (:meth:`add_labeled`).
    _labeled: LabeledTunnels | None = attrs.field(default=None, kw_only=True)
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
            known = ", ".join(sorted(self._types))
            raise PluginError(f"unknown tunnel type {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        return sorted(self._types)

    def for_bind_proto(self, proto: str) -> TunnelType | None:
        return self._by_proto.get(proto)

    def add_labeled(self, labeled: LabeledTunnels) -> None:
        """Register what serves labeled tunnels; a second one is a PluginError."""
        if self._labeled is not None:
            raise PluginError(f"labeled tunnels are served by {type(self._labeled).__qualname__!r} "
                              f"and {type(labeled).__qualname__!r}")
        self._labeled = labeled

    def for_labels(self) -> LabeledTunnels | None:
        """What serves labeled tunnels, or None."""
        return self._labeled


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
