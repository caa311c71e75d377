"""The edge: agent ingress, sessions, and public services from plugins.

Plugins see the edge as :class:`EdgeAdapter` (``Edge.context``, the plugin API's
``EdgeContext``) and each agent's :class:`AgentSession` as its ``SessionContext``; the names
they claim are in the :class:`~tunneld.core._routes.RouteTable`.

Theory of operation
-------------------
The nursery tree (../shared/STYLE.md §2.6)::

    Edge.serve(*, task_status)                    root nursery
    ├── edge services from plugins                (http ingress: :80/:443 listeners)
    │     └── per public connection: route → session.open_stream() → relay
    └── agent ingress (serve_public)              accept loop + handler nursery
          └── AgentSession.run()                  session nursery, one per agent
                ├── MuxSession.run()              reader + writer
                ├── per incoming stream: heartbeat echo / Auth / Bind / Unbind RPC
                └── per tunnel: EdgeTunnel.run()  claims a route or a TCP port
                      └── per public connection (tcp): forward(public, proxy stream)

An agent that leaves ends its session nursery: its tunnels are cancelled, their routes and
ports released at once.  Public connections owned by an ingress service learn it through
their proxy stream breaking (``BrokenResourceError``) and are closed.

Shutdown (SIGTERM): listeners stop accepting, every session is sent a GOAWAY, and in-flight
connections get ``grace_period`` seconds before they are cancelled.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import attrs
import pluggy
import trio

from . import _gcpace, proto
from . import proto as _proto  # where a parameter is named ``proto`` (SessionContext.open_stream)
from ._access import log_connection, log_request
from ._acl import LABELS, allows_bind
from ._bindpolicy import reservation_maps
from ._certs import certificate_names, ensure_dev_host_cert, name_matches
from ._errors import Code, ConfigError, PluginError, RemoteProtocolError, TunnelRejected, wire_error
from ._forward import ByteCounts
from ._giveback import CROWD
from ._hostnames import AllowedHostname, HostChooser, HostPolicy
from ._idlewatch import IdleWatcher
from ._lean import lean
from ._metrics import EdgeMetrics
from ._mux import MAX_REMOTE_STREAMS, MuxSession, MuxStream
from ._names import NameClaims, Signer, load_secret
from ._plugins import build_registry, get_plugin_manager
from ._ratelimit import FailureLimiter
from ._routes import RouteTable, address_name
from ._rpc import read_message, reply
from ._store import Store, is_token_format
from ._tls import CARRIER_SEND_CHUNK, accept_tls, server_context
from ._tunnel import (
    ClaimTunnel,
    EdgeContext,
    EdgeTunnel,
    ListedSession,
    SessionContext,
    TlsFront,
    TunnelInfo,
    TunnelTypeRegistry,
)
from ._util import (
    ThrottledLog,
    accept_loop,
    fd_limit,
    format_host_port,
    open_listeners,
    peer_addr,
    release_free_memory,
    reset_connection,
)
from ._websocket import HandshakeError, accept_websocket, looks_like_websocket

if TYPE_CHECKING:
    from OpenSSL import SSL

log = logging.getLogger("tunneld.edge")

#: An agent must authenticate within this many seconds of connecting.
AUTH_TIMEOUT = 10.0
#: TLS handshake budget for agent connections.
HANDSHAKE_TIMEOUT = 10.0
#: Largest window a tunneld agent may ask for through ``Auth.Extra.TunneldWindow``.
MAX_WINDOW = 16 * 1024 * 1024
#: Proxy streams open at once towards an ngrok SDK.  ngrok-rust accepts 512 per session and
#: frees a stream only once its task is done, so it counts more than we see open: at 400 a
#: burst still broke its session (it reconnected), at 250 600 held-open requests all pass.
SDK_MAX_STREAMS = 250
#: Proxy streams open at once towards any other agent: below what it accepts (``MAX_REMOTE_STREAMS``)
#: by a margin, as it may count a stream a moment longer than we do (its FIN still in flight).
#: Public connections beyond wait for a stream to close instead of failing (502).
AGENT_MAX_STREAMS = MAX_REMOTE_STREAMS * 7 // 8
#: Seconds between checks for authtokens revoked while their agents are connected.
REVOCATION_CHECK = 2.0
#: Tunnels one session may hold.
MAX_TUNNELS_PER_SESSION = 64
#: Tunnels one authtoken may hold over all its sessions (``--max-tunnels-per-token``).
MAX_TUNNELS_PER_TOKEN = 256
#: Sessions one authtoken may hold at once (``--max-sessions-per-token``).
MAX_SESSIONS_PER_TOKEN = 64
#: Longest delay the failure limiter puts on the answer to a failed Auth; well inside
#: AUTH_TIMEOUT, so the limiter can never turn into a lockout.
MAX_AUTH_DELAY = AUTH_TIMEOUT / 2

# Before Auth succeeds an agent is a stranger: what it may cost us is small and bounded.
#: Streams it may hold open (Auth and heartbeat, and room for a retry); more are refused.
PREAUTH_MAX_STREAMS = 4
#: Receive window of each of those streams.  An Auth message is well under 2 KB (ngrok's
#: clients and ours); control messages are capped at 64 KiB anyway (``_rpc.MAX_MESSAGE``).
PREAUTH_WINDOW = 64 * 1024
#: Bytes (after TLS) it may send in all before it is authenticated.
PREAUTH_BUDGET = 256 * 1024
#: Unauthenticated sessions from one address at once (each may cost up to ~1 MB: TLS, the
#: PREAUTH_* allowance, parsing).  A new one evicts the oldest: a genuine agent authenticates
#: within milliseconds, so it is never the oldest and a neighbour cannot lock it out.
MAX_PREAUTH_PER_ADDRESS = 32
# After Auth: agents open only control streams (heartbeat, Auth, Bind/Unbind RPCs).
#: Control streams an agent may hold open at once: a Bind for each of its tunnels at once and
#: room to spare.  Each may hold a partial message of up to 64 KiB (``_rpc.MAX_MESSAGE``).
MAX_CONTROL_STREAMS = 96
#: Unread bytes an agent's control streams may hold together (without it: streams × window,
#: up to 8192 × 16 MiB).
MAX_CONTROL_BUFFERED = 1024 * 1024

# File descriptors: agents and public traffic share the process's pool.
#: Descriptors kept back from every budget: listeners, the store, logs, the event loop.
FD_RESERVE = 64
#: Agent connections beyond ``max_sessions`` that are still answered (TLS, then a GOAWAY
#: naming the limit) so their agents print why; beyond these, connections are reset at once.
AGENT_REFUSE_SLOTS = 16
#: Default ``max_sessions``: this share of the descriptor limit.
SESSIONS_FD_SHARE = 3
#: Seconds between returns of freed heap memory to the OS, when agent sessions ended meanwhile.
TRIM_INTERVAL = 10.0
#: Seconds between looks for agents that stopped heartbeating (one task for all sessions: the
#: heartbeat streams are answered by their mux readers, no task waits on them).
HEARTBEAT_SWEEP = 5.0
#: Silence allowed on a heartbeat stream beyond the agent's interval + tolerance (from its Auth).
HEARTBEAT_SLACK = 5.0
#: Silence allowed when the agent declared no heartbeat settings (yet).
HEARTBEAT_DEFAULT_LIMIT = 120.0

# Admission control: 10,000 agents connecting at once must not all handshake at once (each
# handshake then takes seconds of CPU time slices, past every client's patience, and the
# retries make it worse).  New connections queue in arrival order for a few handshake slots.
#: TLS handshakes in progress at once (agent port).
HANDSHAKE_SLOTS = 16
#: Longest a handshake holds its slot.  The costly part (our answer to the ClientHello, which
#: is there before the slot is taken) takes milliseconds; past this the handshake goes on
#: without a slot, so a client that stalls (or is slow to answer) cannot hold up the queue.
HANDSHAKE_SLOT_TIME = 1.0
#: Longest a handshake may take once it has begun.  Generous: a crowd of agents connecting at
#: once may be slow to answer, and a handshake that waits costs one descriptor.
HANDSHAKE_FINISH_TIME = 30.0
#: Longest a connection waits for a slot.  tunneld agents wait 60 s for their handshake; one
#: queued longer has given up, and would cost a handshake for nothing.
HANDSHAKE_QUEUE_TIME = 55.0


DEFAULT_RESERVED = frozenset({"www", "api", "admin", "edge", "mail", "ftp", "ns1", "ns2", "smtp", "imap",
                              "pop", "autodiscover", "autoconfig", "status", "dashboard"})


@attrs.define
class EdgeConfig:
    """Settings of one edge process (see ``tunneld edge --help``)."""

    data_dir: Path
    domain: str
    tls_cert: Path
    tls_key: Path
    agent_addr: tuple[str, int] = ("0.0.0.0", 4443)
    http_addr: tuple[str, int] | None = ("0.0.0.0", 80)
    https_addr: tuple[str, int] | None = ("0.0.0.0", 443)
    tcp_host: str = "0.0.0.0"
    tcp_ports: tuple[int, int] = (10000, 10999)
    grace_period: float = 10.0
    #: Seconds a name (hostname, TCP port) stays reserved for its owner after its tunnel goes.
    hold_period: float = 60.0
    #: Subdomain labels agents may not claim.
    reserved_names: frozenset[str] = DEFAULT_RESERVED
    #: Custom hostnames (outside ``domain``) agents may bind, and for which accounts.
    allowed_hostnames: tuple[AllowedHostname, ...] = ()
    #: What custom hostnames should be CNAMEd to ("" = ``domain``).
    cname_target: str = ""
    #: Development mode: the dev CA in ``data_dir`` signs certificates for custom hostnames.
    dev: bool = False
    #: Agent connections at once (0: a third of the descriptor limit, SESSIONS_FD_SHARE).
    max_sessions: int = 0
    #: Sessions one authtoken may hold at once.
    max_sessions_per_token: int = MAX_SESSIONS_PER_TOKEN
    #: Tunnels one authtoken may hold at once, over all its sessions.
    max_tunnels_per_token: int = MAX_TUNNELS_PER_TOKEN
    #: SSH gateway listener (``--ssh-addr``; None: off), served by the ssh plugin.
    ssh_addr: tuple[str, int] | None = None
    #: Admin REST API and /metrics listener (``--api-addr``; None: off), see ``core/_admin.py``.
    api_addr: tuple[str, int] | None = None

    @property
    def cname(self) -> str:
        return self.cname_target or self.domain


@attrs.frozen
class EdgeInfo:
    """What :meth:`Edge.serve` reports once every listener is bound."""

    #: Listener name → bound ``host:port`` (``agent``, ``http``, ``https``).
    listeners: dict[str, str]
    #: Bound port of each listener.
    ports: dict[str, int]


@attrs.define(eq=False)
class Edge:
    """One edge process.  Build it, then ``await nursery.start(edge.serve)``."""

    config: EdgeConfig
    store: Store
    pm: pluggy.PluginManager = attrs.field(factory=get_plugin_manager)
    #: Builders of core services the caller wants beside the plugins' (the admin API, which
    #: reads the edge's internals, so it is handed in rather than imported: no import cycle).
    service_factories: tuple[Callable[[Edge], list[Any]], ...] = ()
    registry: TunnelTypeRegistry = attrs.field(init=False)
    routes: RouteTable = attrs.field(factory=RouteTable, init=False)
    limiter: FailureLimiter = attrs.field(factory=lambda: FailureLimiter(max_delay=MAX_AUTH_DELAY),
                                          init=False)
    sessions: set[AgentSession] = attrs.field(factory=set, init=False)
    #: Answers the heartbeats of idle sessions while their readers are parked (``_idlewatch``).
    idle_watcher: IdleWatcher = attrs.field(factory=IdleWatcher, init=False)
    #: Sessions plugins run (the ssh gateway's), listed by the admin API beside agent sessions.
    plugin_sessions: set[ListedSession] = attrs.field(factory=set, init=False)
    #: Authtoken id → its authenticated sessions, and its tunnels (bound or being bound).
    sessions_by_token: dict[str, int] = attrs.field(factory=dict, init=False)
    tunnels_by_token: dict[str, int] = attrs.field(factory=dict, init=False)
    #: Client address → its sessions not yet authenticated, oldest first.
    preauth_by_host: dict[str, dict[AgentSession, None]] = attrs.field(factory=dict, init=False)
    #: The soft descriptor limit the budgets below are cut from (read when the edge is built).
    fd_limit: int = attrs.field(factory=fd_limit, init=False)
    #: Accepted connections open now, per pool ("agent", "public").
    open_connections: dict[str, int] = attrs.field(factory=lambda: {"agent": 0, "public": 0}, init=False)
    #: Descriptors held by tunnel listeners (TCP tunnels' ports).
    listener_fds: int = attrs.field(default=0, init=False)
    #: Agent sessions ended since memory was last trimmed.
    _ended_since_trim: int = attrs.field(default=0, init=False)
    #: Queue and slots for agent TLS handshakes (see HANDSHAKE_SLOTS).
    #: (A trio Semaphore serves waiters in arrival order: nobody jumps the queue.)
    admission: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(HANDSHAKE_SLOTS), init=False)
    _accept_errors: ThrottledLog = attrs.field(factory=lambda: ThrottledLog(log), init=False)
    _refusals: ThrottledLog = attrs.field(factory=lambda: ThrottledLog(log), init=False)
    ports: dict[str, int] = attrs.field(factory=dict, init=False)
    #: Set when shutdown begins: services stop accepting.
    stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: Set when :meth:`serve` has returned.
    stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    _ssl_context: Any = attrs.field(default=None, init=False)
    #: Custom hostname → its server context (chosen by SNI).
    _host_contexts: dict[str, Any] = attrs.field(factory=dict, init=False)
    _cert_names: list[str] = attrs.field(factory=list, init=False)
    #: Sees public HTTPS connections before TLS termination (from ``tunneld_edge_tls_front``).
    tls_front: TlsFront | None = attrs.field(default=None, init=False)
    #: Signs session cookies and tunnel resume tokens (key kept in the data dir).
    signer: Signer = attrs.field(init=False)
    #: The edge as plugins see it (``tunneld.plugin.EdgeContext``): one per edge.
    context: EdgeAdapter = attrs.field(init=False, repr=False)
    #: The naming rules of ``SessionContext.choose_host``.
    host_policy: HostPolicy = attrs.field(init=False, repr=False)
    #: Traffic, login and bind counters (``/metrics``).
    metrics: EdgeMetrics = attrs.field(factory=EdgeMetrics, init=False)

    def __attrs_post_init__(self) -> None:
        self.registry = build_registry(self.pm)
        self.routes.names = NameClaims(self.store, self.config.hold_period, on_swept=self._holds_swept)
        self.routes.tcp_host = self.config.domain
        self.signer = Signer(load_secret(self.config.data_dir))
        self.context = EdgeAdapter(self)
        self.host_policy = HostPolicy(self.config.domain, self.config.reserved_names,
                                      self.config.allowed_hostnames)

    # ---- budgets -----------------------------------------------------------------------------

    @property
    def max_sessions(self) -> int:
        """Agent connections (authenticated or not) served at once."""
        return self.config.max_sessions or max(1, self.fd_limit // SESSIONS_FD_SHARE)

    def pool_limit(self, pool: str) -> int:
        """Connections ``pool`` may hold open; beyond, new ones are reset as they are accepted.

        Public traffic (all pools but "agent" together) gets what the descriptor limit leaves
        once the agent port's share, the tunnels' listeners and FD_RESERVE are set aside: a
        crowd of agents cannot take the descriptors their tunnels' visitors need.
        """
        agents = self.max_sessions + AGENT_REFUSE_SLOTS
        if pool == "agent":
            return agents
        public = max(16, self.fd_limit - FD_RESERVE - agents - self.listener_fds)
        # Every other pool (public HTTP/TCP, a plugin's own such as "ssh") shares that budget.
        others = sum(n for name, n in self.open_connections.items() if name not in ("agent", pool))
        return public - others

    def _count(self, table: dict[str, int], key: str, delta: int) -> None:
        n = table.get(key, 0) + delta
        if n > 0:
            table[key] = n
        else:
            table.pop(key, None)

    # ---- public helpers for plugins ----------------------------------------------------

    @property
    def ssl_context(self) -> Any:
        """The pyOpenSSL server context with the edge's certificate.

        Clients naming a custom hostname (SNI) are switched to that name's own certificate.
        """
        if self._ssl_context is None:
            ctx = server_context(self.config.tls_cert, self.config.tls_key)
            contexts = self._host_contexts

            def pick(conn: Any) -> None:
                name = conn.get_servername()
                if name:
                    other = contexts.get(name.decode("ascii", "replace").lower())
                    if other is not None:
                        conn.set_context(other)

            ctx.set_tlsext_servername_callback(pick)
            self._cert_names = certificate_names(self.config.tls_cert)
            self._ssl_context = ctx
        return self._ssl_context

    def ensure_certificate(self, host: str) -> None:
        """Make sure HTTPS for ``host`` shows a certificate valid for it (blocking: file I/O).

        The edge's own certificate may cover it; else ``DATA_DIR/certs/HOST.pem`` and
        ``HOST-key.pem``; in dev mode the dev CA makes them.  TunnelRejected if none.
        """
        self.ssl_context  # noqa: B018 - reads the main certificate's names
        if host in self._host_contexts or any(name_matches(n, host) for n in self._cert_names):
            return
        certs = self.config.data_dir / "certs"
        cert, key = certs / f"{host}.pem", certs / f"{host}-key.pem"
        try:
            if self.config.dev:
                cert, key = ensure_dev_host_cert(self.config.data_dir, host)
            if not cert.exists() or not key.exists():
                raise TunnelRejected(f"this edge has no certificate for {host}: its operator must put the "
                                     f"chain in {cert} and the key in {key}", Code.ADDRESS_NOT_ALLOWED)
            self._host_contexts[host] = server_context(cert, key)
        except (ConfigError, OSError, ValueError) as exc:
            raise TunnelRejected(f"the certificate for {host} cannot be used: {exc}",
                                 Code.ADDRESS_NOT_ALLOWED) from exc

    def public_url(self, scheme: str, host: str) -> str:
        """URL for ``host`` on the public listener of ``scheme`` (port shown when not default)."""
        port = self.ports.get(scheme)
        default = {"http": 80, "https": 443}.get(scheme)
        if port is None or port == default:
            return f"{scheme}://{host}"
        return f"{scheme}://{host}:{port}"

    async def open_public_listeners(self, name: str, flag: str,
                                    addr: tuple[str, int]) -> list[trio.SocketListener]:
        """Bind a public listener, turning OSError into a one-line error naming ``flag``."""
        try:
            listeners = await open_listeners(*addr)
        except OSError as exc:
            raise ConfigError(
                f"{flag} {format_host_port(*addr)}: cannot listen: {exc.strerror or exc}") from exc
        self.ports[name] = int(listeners[0].socket.getsockname()[1])
        return listeners

    async def serve_public(self, handler: Callable[[trio.SocketStream], Awaitable[None]],
                           listeners: list[trio.SocketListener], *, pool: str = "public",
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listeners`` until shutdown, then give handlers the grace period.

        Every handler runs behind a boundary that logs and swallows its errors: one bad
        connection never takes a listener down.  Connections beyond :meth:`pool_limit` are
        reset at once: refused quickly rather than left to starve the others of descriptors.
        """
        open_now = self.open_connections
        open_now.setdefault(pool, 0)
        # Public connections count towards the crowd whose going gives memory back; agents'
        # sessions have their own count (``_gcpace.sessions_ended``).
        crowd = CROWD if pool != "agent" else None

        async def guarded(stream: trio.SocketStream) -> None:
            try:
                await handler(stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                pass
            except* Exception as group:  # noqa: BLE001 - the per-connection boundary
                log.exception("connection handler failed", exc_info=group)
            finally:
                open_now[pool] -= 1
                if crowd is not None:
                    crowd.closed()
                # A listener's socket stream: closing it never waits (its aclose adds only a
                # checkpoint, which would have to be shielded here).
                stream.socket.close()

        async with trio.open_nursery() as handlers:
            def on_accept(stream: trio.SocketStream) -> None:
                limit = self.pool_limit(pool)
                if open_now[pool] >= limit:
                    self._refusals.note("%s connections at their limit (%d): refusing new ones", pool, limit)
                    reset_connection(stream)
                    return
                open_now[pool] += 1
                if crowd is not None:
                    crowd.opened()
                handlers.start_soon(guarded, stream)

            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(accept_loop, listener, on_accept, self._accept_errors)
                task_status.started()
                await self.stopping.wait()
                accepting.cancel_scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + self.config.grace_period

    # ---- the root ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[EdgeInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every listener, report :class:`EdgeInfo`, and serve until :meth:`shutdown`."""
        try:
            await self._serve(task_status)
        finally:
            self.stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[EdgeInfo]) -> None:
        self.ssl_context  # noqa: B018 - load the certificate now: errors before binding
        self.tls_front = self._tls_front()
        agent_listeners = await self.open_public_listeners("agent", "--agent-addr", self.config.agent_addr)
        await trio.to_thread.run_sync(self.routes.names.load)
        async with trio.open_nursery() as outer:
            # The store writer outlives every tunnel: it records their last releases.
            outer.start_soon(self.routes.names.run)
            outer.start_soon(self._end_revoked_sessions)
            outer.start_soon(self._trim_memory)
            outer.start_soon(self._watch_heartbeats)
            await outer.start(self.idle_watcher.run)
            async with trio.open_nursery() as root:
                for service in self._services():
                    await root.start(service.run)
                agent_port = partial(self.serve_public, pool="agent")
                await root.start(agent_port, self._handle_agent, agent_listeners)
                listeners = {name: self._listener_text(name) for name in self.ports}
                log.info("edge ready: %s", ", ".join(f"{k}={v}" for k, v in listeners.items()))
                log.info("descriptor limit %d: up to %d agent sessions, %d public connections",
                         self.fd_limit, self.max_sessions, self.pool_limit("public"))
                if self.max_sessions + AGENT_REFUSE_SLOTS + FD_RESERVE >= self.fd_limit:
                    log.warning("--max-sessions %d leaves public traffic almost no file descriptors (limit "
                                "%d): raise the limit (ulimit -n) or lower --max-sessions",
                                self.max_sessions, self.fd_limit)
                task_status.started(EdgeInfo(listeners=listeners, ports=dict(self.ports)))
                await self.stopping.wait()
                deadline = trio.current_time() + self.config.grace_period
                for session in list(self.sessions):
                    root.start_soon(session.drain, deadline)
            outer.cancel_scope.cancel()

    async def _end_revoked_sessions(self) -> None:
        """Close the sessions of authtokens revoked while they were connected.

        ``tunneld edge token revoke`` runs in another process and writes only the store: the
        edge looks there every REVOCATION_CHECK seconds.  The agent's reconnect is then
        refused, and it stops.
        """
        while True:
            await trio.sleep(REVOCATION_CHECK)
            # The tokens of the authenticated sessions, counted as they come and go: no walk
            # over every session (thousands, every REVOCATION_CHECK seconds) to find them.
            ids = sorted(self.sessions_by_token)
            if not ids:
                continue
            try:
                revoked = await trio.to_thread.run_sync(self.store.revoked_among, ids)
            except sqlite3.Error as exc:
                log.error("cannot check for revoked authtokens: %s", exc)
                continue
            if not revoked:
                continue
            for session in [s for s in self.sessions if s.token_id in revoked]:
                log.warning("agent %s: authtoken %s was revoked; closing its session", session.remote_addr,
                            session.token_id)
                session.mux.close_reason = "authtoken revoked"
                await session.mux.aclose()

    async def refresh_bind_policy(self, owner: str, account_id: str | None, acl: tuple[str, ...]) -> None:
        """Read every account's reservations from the store and record ``owner``'s rights.

        Called before a session binds, so reservations and ACLs changed through the admin API
        apply to the next bind; the claims of ``owner``'s tunnels are checked against them.
        """
        domains, addrs = await trio.to_thread.run_sync(self.store.reservations)
        self.apply_bind_policy(owner, account_id, acl, domains, addrs)

    def apply_bind_policy(self, owner: str, account_id: str | None, acl: tuple[str, ...],
                          domains: list[tuple[str, str]], addrs: list[tuple[str, str]]) -> None:
        """:meth:`refresh_bind_policy` with the reservations already read (``Store.reservations``)."""
        self.routes.set_reservations(*reservation_maps(domains, addrs))
        self.routes.grant(owner, account_id, acl)

    def live_tunnel_ids(self) -> set[str]:
        """Ids of the tunnels that exist now (agents' and those routed by any plugin)."""
        live = {tid for s in self.sessions for tid in s.tunnels}
        live.update(tid for s in self.plugin_sessions for tid in s.tunnel_ids)
        routes = self.routes
        tables: list[dict[Any, Any]] = [routes.hosts, *routes.addresses.values()]
        for table in tables:
            for holder in list(table.values()):
                tid = getattr(holder, "tunnel_id", None)
                if tid:
                    live.add(tid)
        return live

    def _holds_swept(self, count: int) -> None:
        # The names a crowd of departed agents held are the last of what they allocated: once
        # they go, reclaim and trim as for the sessions themselves (``_gcpace``, see README).
        _gcpace.sessions_ended(count)
        self._ended_since_trim += count

    async def _trim_memory(self) -> None:
        """Now and then, give the memory of ended sessions back to the OS (``malloc_trim``), and
        forget the metrics of tunnels that are gone."""
        trim = True  # until we learn there is no glibc
        while True:
            await trio.sleep(TRIM_INTERVAL)
            # Tunnels that never carried traffic have no series: an idle edge walks nothing.
            if self.metrics.has_tunnel_series:
                self.metrics.prune(self.live_tunnel_ids())
            # Ended sessions' cycles may be frozen (``_gcpace``): collected first when due; and
            # everything once a crowd of public connections has gone (``_giveback``).
            if CROWD.gone():
                _gcpace.reclaim_now()
                reclaimed = True
            else:
                reclaimed = _gcpace.maybe_reclaim(len(self.sessions))
            if self._ended_since_trim or reclaimed:
                self._ended_since_trim = 0
                trim = await trio.to_thread.run_sync(self._release_memory, trim)

    def _release_memory(self, trim: bool) -> bool:
        """In a worker thread: the store's cache first, so that ``malloc_trim`` (when ``trim``)
        gets its pages.  Returns whether to trim next time (False where there is no glibc)."""
        try:
            self.store.release_memory()
        except sqlite3.Error as exc:
            log.debug("could not shrink the store's cache: %s", exc)
        return trim and release_free_memory()

    async def _watch_heartbeats(self) -> None:
        """Close the sessions whose agents stopped heartbeating (see :meth:`AgentSession.silent`)."""
        while True:
            await trio.sleep(HEARTBEAT_SWEEP)
            now = trio.current_time()
            for session in [s for s in self.sessions if s.silent(now)]:
                log.info("agent %s stopped heartbeating; closing its session", session.remote_addr)
                session.mux.close_reason = "heartbeat timeout"
                await session.mux.aclose()

    def _listener_text(self, name: str) -> str:
        addr = {"agent": self.config.agent_addr, "http": self.config.http_addr,
                "https": self.config.https_addr, "ssh": self.config.ssh_addr,
                "api": self.config.api_addr}.get(name)
        host = addr[0] if addr else "0.0.0.0"
        return format_host_port(host, self.ports[name])

    async def route_tls(self, stream: trio.SocketStream, client_addr: str) -> trio.abc.Stream | None:
        """Offer a new public HTTPS connection to the TLS front (see :class:`TlsFront`).

        Returns the stream to terminate TLS on, or None when the front took the connection.
        """
        if self.tls_front is None:
            return stream
        return await self.tls_front.route(stream, client_addr)

    def _tls_front(self) -> TlsFront | None:
        fronts = [f for f in self.pm.hook.tunneld_edge_tls_front(edge=self.context) if f is not None]
        if len(fronts) > 1:
            names = ", ".join(type(f).__qualname__ for f in fronts)
            raise PluginError(f"more than one plugin wants to front HTTPS: {names}")
        return fronts[0] if fronts else None

    def _services(self) -> list[Any]:
        services: list[Any] = [s for make in self.service_factories for s in make(self)]
        for result in self.pm.hook.tunneld_edge_services(edge=self.context):
            services.extend(result or ())
        return services

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self.stopping.set()

    async def _handle_agent(self, stream: trio.SocketStream) -> None:
        addr = peer_addr(stream)
        try:
            # Nothing sent yet (a port scan, a stalled client): it takes no slot while silent.
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await trio.lowlevel.wait_readable(stream.socket)
            with trio.fail_after(HANDSHAKE_QUEUE_TIME):
                await self.admission.acquire()
        except trio.TooSlowError:
            log.info("agent connection from %s: no TLS handshake in time", addr)
            return
        try:
            tls = await self._handshake(stream)
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("agent TLS handshake from %s failed: %s", addr, exc)
            return
        try:
            head = await self._first_bytes(tls)
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("agent %s: no usable carrier: %s", addr, exc or type(exc).__name__)
            await trio.aclose_forcefully(tls)
            return
        if not looks_like_websocket(head):
            # The mux decodes ``head`` first: no wrapper on every read of the session's life.
            # (Made before it runs, so this frame does not keep ``head`` for the session's life.)
            serving = self._run_session(tls, addr, head)
            del head
            await serving
            return
        log.debug("agent %s uses the WebSocket carrier", addr)
        try:
            transport = await accept_websocket(tls, head, timeout=HANDSHAKE_TIMEOUT)
        except (trio.TooSlowError, trio.BrokenResourceError, HandshakeError) as exc:
            log.info("agent %s: no usable carrier: %s", addr, exc or type(exc).__name__)
            await trio.aclose_forcefully(tls)
            return
        del head
        await self._run_session(transport, addr, b"")

    async def _run_session(self, transport: trio.abc.Stream, addr: str, head: bytes) -> None:
        """Serve one agent's session on ``transport`` (``head``: carrier bytes already read)."""
        # Connections still in their handshakes are not counted: they may fail yet, and
        # the accept loop's limit (max_sessions + AGENT_REFUSE_SLOTS) bounds them anyway.
        if len(self.sessions) >= self.max_sessions:
            await self._refuse_agent(transport, head, addr, "this edge is at its limit of "
                                     f"{self.max_sessions} agent sessions; try again later")
            return
        session = AgentSession(self, transport, addr)
        session.mux.initial_data = head
        del head
        pending = self.preauth_by_host.get(session.remote_host, {})
        if len(pending) >= MAX_PREAUTH_PER_ADDRESS:
            oldest = next(iter(pending))
            oldest.end_preauth()
            log.info("agent %s: too many unauthenticated sessions from its address; closing the "
                     "oldest, from %s", addr, oldest.remote_addr)
            oldest.mux.close_reason = "evicted: too many unauthenticated sessions from its address"
            await oldest.mux.aclose()
        self.preauth_by_host.setdefault(session.remote_host, {})[session] = None
        self.sessions.add(session)
        try:
            await session.run()
        except* RemoteProtocolError as group:
            log.warning("agent %s broke the protocol: %s", addr, "; ".join(map(str, group.exceptions)))
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            log.info("agent %s connection failed: %s", addr, "; ".join(map(str, group.exceptions)))
        finally:
            self.sessions.discard(session)
            session.end_preauth()
            self._ended_since_trim += 1
            _gcpace.sessions_ended()
            if session.counted:
                self._count(self.sessions_by_token, session.token_id, -1)
            session.ended.set()
            log.info("agent session %s from %s ended (%s)", session.client_id or "-", addr,
                     session.mux.close_reason or "closed")

    async def _handshake(self, stream: trio.SocketStream) -> trio.abc.Stream:
        """The TLS handshake of an agent connection holding an admission slot (taken by the
        caller), which is given back when it is done or after HANDSHAKE_SLOT_TIME."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release()

        async def release_later() -> None:
            await trio.sleep(HANDSHAKE_SLOT_TIME)
            release()

        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(release_later)
                try:
                    # Lean socket I/O (``_lean``): the mux carrier's reads and writes that need
                    # no wait skip the scheduler; an idle session's heartbeat is one of each.
                    tls = await accept_tls(lean(stream), self.ssl_context, timeout=HANDSHAKE_FINISH_TIME,
                                           send_chunk=CARRIER_SEND_CHUNK)
                except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                    error = exc  # raised below, not wrapped in the nursery's ExceptionGroup
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            release()
        if error is not None:
            raise error
        return tls

    async def _refuse_agent(self, transport: trio.abc.Stream, head: bytes, addr: str, reason: str) -> None:
        """Tell an agent why it cannot have a session (GOAWAY with ``reason``; it retries later)."""
        self._refusals.note("agent %s refused: %s", addr, reason)
        mux = MuxSession(transport, client=False, initial_data=head)
        # Its Auth stream is left unanswered (not reset): the GOAWAY is what the agent reports.
        mux.max_remote_streams = PREAUTH_MAX_STREAMS
        mux.remote_window = PREAUTH_WINDOW
        mux.receive_budget = PREAUTH_BUDGET
        with trio.move_on_after(2):
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(mux.run)
                    await mux.go_away(proto.ErrorCode.ENHANCE_YOUR_CALM, reason)
                    # Let the GOAWAY arrive before the connection closes.
                    with trio.move_on_after(1):
                        await mux.closed.wait()
                    nursery.cancel_scope.cancel()
            except* (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await mux.aclose()

    async def _first_bytes(self, tls: trio.abc.Stream) -> bytes:
        """The carrier's first bytes (4 at least): a muxado frame, or a WebSocket upgrade."""
        head = b""
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            while len(head) < 4:
                data = await tls.receive_some(4096)
                if not data:
                    raise trio.BrokenResourceError("closed before the first frame")
                head += data
        return head


class _StartedOnce:
    """A task status that passes ``started()`` on once and then lets go of trio's.

    A tunnel's ``run`` holds its ``task_status`` argument for life, and trio's keeps the
    nursery of ``Nursery.start`` alive, with the finished Bind handler that called it: about
    2.5 KB per tunnel, for as long as the tunnel lives.
    """

    __slots__ = ("_status",)

    def __init__(self, status: trio.TaskStatus[Any]) -> None:
        self._status: trio.TaskStatus[Any] | None = status

    def started(self, value: Any = None) -> None:
        status, self._status = self._status, None
        if status is None:
            raise RuntimeError("called 'started' twice on the same task status")
        status.started(value)


@attrs.define(eq=False)
class AgentSession:
    """One connected agent: its mux, its control RPCs and its tunnels."""

    edge: Edge
    transport: Any
    remote_addr: str
    mux: MuxSession = attrs.field(init=False)
    client_id: str = ""
    authed: bool = False
    auth: proto.Auth | None = None
    token_id: str = ""
    #: The authtoken's account (set by Auth).
    account_id: str = ""
    #: When the agent connected (wall clock, for the tunnel-sessions API).
    started_at: float = attrs.field(factory=time.time)
    #: Tunnel id → the tunnel, if it is only a claim (:class:`ClaimTunnel`: released by the
    #: session), else its task's (cancel scope, event set once it has released its address).
    tunnels: dict[str, ClaimTunnel | tuple[trio.CancelScope, trio.Event]] = attrs.field(factory=dict)
    #: Tunnel id → the public name it claimed (for Unbind to let go of the hold).
    tunnel_names: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    #: Set once the session is over and every tunnel has released its address.
    ended: trio.Event = attrs.field(factory=trio.Event)
    #: Picks the names of the session's name-routed Binds (:meth:`choose_host`).
    _hosts: HostChooser = attrs.field(init=False, repr=False)
    #: Counted in ``Edge.sessions_by_token`` (to be uncounted when the session ends).
    counted: bool = False
    _nursery: trio.Nursery | None = None
    #: Set once an Auth message has arrived: the auth deadline is met, whatever its answer.
    _auth_received: trio.Event = attrs.field(factory=trio.Event)
    _auth_busy: bool = False
    #: Binds past the session and token checks whose tunnel is not yet registered.
    _pending_binds: int = 0
    #: The agent's heartbeat stream, echoed by the mux reader (None until it opens one).
    _heartbeat: MuxStream | None = None
    #: Seconds of heartbeat silence allowed (from the agent's Auth; see :meth:`silent`).
    _silence_limit: float = HEARTBEAT_DEFAULT_LIMIT

    def __attrs_post_init__(self) -> None:
        self._hosts = HostChooser(self.edge.host_policy, self.edge.routes, self)
        self.mux = MuxSession(self.transport, client=False)
        # Until Auth succeeds: few streams, small windows, a byte budget (PREAUTH_*).
        self.mux.max_remote_streams = PREAUTH_MAX_STREAMS
        self.mux.remote_window = PREAUTH_WINDOW
        self.mux.receive_budget = PREAUTH_BUDGET
        self.mux.max_remote_buffered = MAX_CONTROL_BUFFERED

    def end_preauth(self) -> None:
        """No longer an unauthenticated session of its address (authenticated, or gone)."""
        table = self.edge.preauth_by_host
        pending = table.get(self.remote_host)
        if pending is None:
            return
        pending.pop(self, None)
        if not pending:
            del table[self.remote_host]

    @property
    def remote_host(self) -> str:
        return self.remote_addr.rsplit(":", 1)[0].strip("[]")

    # ---- SessionContext (what tunnel types see of the session) ------------------------------

    @property
    def owner(self) -> str:
        """Who this session's names belong to: its authtoken's id."""
        return self.token_id

    @property
    def client_type(self) -> str:
        """The Auth message's ClientType (``tunneld``, ``ngrok-rust``...); "" before Auth."""
        return self.auth.extra.client_type if self.auth is not None else ""

    def choose_host(self, bind: proto.Bind, pair: str) -> str:
        """The public hostname for a name-routed Bind (see ``SessionContext.choose_host``)."""
        return self._hosts(bind, pair)

    def resumed_name(self, bind: proto.Bind, kind: str) -> str | None:
        """The name a rebinding tunnel had, from its resume token, if it is this owner's."""
        fields = self.edge.signer.verify("bind", bind.extra.token) if bind.extra.token else None
        if fields is None or len(fields) != 3:
            return None
        token_kind, name, owner = fields
        if token_kind != kind or owner != self.token_id:
            return None
        return name

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._auth_deadline)

                # The mux's reader runs in this task and starts a handler for each stream the
                # agent opens: no accept loop, no task in between (an idle session keeps few
                # objects).
                def on_stream(stream: MuxStream) -> None:
                    nursery.start_soon(self._handle_stream, stream)

                await self.mux.run(on_stream=on_stream, nursery=nursery)
                nursery.cancel_scope.cancel()
        finally:
            # Only now: every Bind handler has ended, so no claim is still being made.
            self._release_claims()

    def _release_claims(self) -> None:
        for tunnel_id, entry in list(self.tunnels.items()):
            if isinstance(entry, ClaimTunnel):
                del self.tunnels[tunnel_id]
                self._release(entry)

    def _release(self, tunnel: ClaimTunnel) -> None:
        try:
            tunnel.release()
        finally:
            self.edge._count(self.edge.tunnels_by_token, self.token_id, -1)

    async def _auth_deadline(self) -> None:
        # The agent must *send* its Auth in time; the answer (token check, and the limiter's
        # delay on failures, at most MAX_AUTH_DELAY) is ours and does not count.
        with trio.move_on_after(AUTH_TIMEOUT):
            await self._auth_received.wait()
            return
        log.info("agent %s did not authenticate within %ss", self.remote_addr, AUTH_TIMEOUT)
        await self.mux.aclose()

    async def drain(self, deadline: float) -> None:
        """Shutdown: let this agent's proxied connections finish (until ``deadline``), then close.

        No GOAWAY is sent first: muxado peers treat it as the end of the session and would
        drop their in-flight streams at once.
        """
        with trio.move_on_at(deadline):
            # The mux has no "streams drained" event to wait on; poll its count.
            while self.mux.local_stream_count:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await self.mux.aclose()

    # ---- stream dispatch ---------------------------------------------------------------

    async def _handle_stream(self, stream: MuxStream) -> None:
        try:
            with trio.fail_after(AUTH_TIMEOUT):
                stype = proto.decode_stream_type(await stream.receive_exactly(4))
            if stype == proto.StreamType.HEARTBEAT:
                # Echoed by the mux reader from now on; Edge._watch_heartbeats watches for silence.
                stream.echo(4)
                self._heartbeat = stream
                return
            elif stype == proto.StreamType.AUTH:
                await self._rpc_auth(stream)
            elif not self.authed:
                raise RemoteProtocolError(f"stream type {stype} before authentication")
            elif stype == proto.StreamType.BIND:
                await self._rpc_bind(stream)
            elif stype == proto.StreamType.UNBIND:
                await self._rpc_unbind(stream)
            elif stype == proto.StreamType.SRV_INFO:
                await read_message(stream, proto.SrvInfo)
                await reply(stream, proto.SrvInfoResp(region="local"))
            elif stype == proto.StreamType.START_TUNNEL_WITH_LABEL:
                await self._rpc_start_labeled(stream)
            else:
                stream.reset(proto.ErrorCode.PROTOCOL)
        except RemoteProtocolError as exc:
            log.warning("agent %s: %s; closing its session", self.remote_addr, exc)
            stream.reset(proto.ErrorCode.PROTOCOL)
            await self.mux.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            stream.reset()
        finally:
            if stream is not self._heartbeat:
                await stream.aclose()

    def silent(self, now: float) -> bool:
        """True once the agent's heartbeat stream has been quiet for longer than it may be.

        The agent declares its heartbeat settings in Auth (which may come after the stream
        opens); without them a generous HEARTBEAT_DEFAULT_LIMIT of silence is allowed.
        """
        stream = self._heartbeat
        last = stream.last_echo if stream is not None else None
        return last is not None and now - last > self._silence_limit

    # ---- RPCs ----------------------------------------------------------------------------

    async def _rpc_auth(self, stream: MuxStream) -> None:
        msg = await read_message(stream, proto.Auth)
        self._auth_received.set()
        if self.authed or self._auth_busy:
            error = wire_error("already authenticated", Code.AUTH_MALFORMED)
            await reply(stream, proto.AuthResp(error=error))
            return
        self._auth_busy = True
        try:
            await self._authenticate(stream, msg)
        finally:
            self._auth_busy = False

    async def _authenticate(self, stream: MuxStream, msg: proto.Auth) -> None:
        edge = self.edge
        host = self.remote_host
        # Counted before the check: parallel guesses see the delay grow too.  The token is
        # checked at once (in constant time) and only the answer to a failure is delayed: a
        # valid token gets in without delay, however many guesses share its address.
        delay = min(edge.limiter.attempt(host, time.monotonic()), MAX_AUTH_DELAY)
        token = msg.extra.authtoken
        record = None
        if is_token_format(token):
            record = await trio.to_thread.run_sync(edge.store.verify_token, token)
        if record is None:
            if not token:
                error = wire_error("no authtoken was given; get one with `tunneld edge token create`",
                                   Code.AUTHTOKEN_MALFORMED)
            elif not is_token_format(token):
                error = wire_error("the authtoken is malformed", Code.AUTHTOKEN_MALFORMED)
            else:
                error = wire_error("the authtoken is invalid or has been revoked", Code.AUTHTOKEN_INVALID)
            edge.metrics.auth_failure("agent")
            log.warning("agent %s: authentication failed%s", self.remote_addr,
                        f" (answer delayed {delay:g}s: repeated failures from {host})" if delay else "")
            await trio.sleep(delay)
            await reply(stream, proto.AuthResp(version=_pick_version(msg.version), error=error))
            # Give the client a moment to read the answer, then drop the session.
            with trio.move_on_after(1):
                await self.mux.go_away(proto.ErrorCode.NONE, "authentication failed")
            await self.mux.aclose()
            return
        edge.limiter.refund(host)
        self.auth = _kept(msg)
        if msg.extra.heartbeat_interval > 0:
            self._silence_limit = ((msg.extra.heartbeat_interval + msg.extra.heartbeat_tolerance) / 1e9
                                   + HEARTBEAT_SLACK)
        self.token_id = record.id
        self.account_id = record.account_id
        self.client_id = await self._resume_or_new(msg)
        # After a resume replaced this token's old session, which no longer counts.
        limit = edge.config.max_sessions_per_token
        if edge.sessions_by_token.get(record.id, 0) >= limit:
            reason = f"authtoken {record.id} already has {limit} sessions on this edge (the limit)"
            log.warning("agent %s refused: %s", self.remote_addr, reason)
            self.mux.close_reason = reason
            with trio.move_on_after(1):
                await self.mux.go_away(proto.ErrorCode.ENHANCE_YOUR_CALM, reason)
            await self.mux.aclose()
            return
        edge._count(edge.sessions_by_token, record.id, +1)
        self.counted = True
        extra = proto.AuthRespExtra(version="tunneld", region="local",
                                    cookie=edge.signer.sign("session", self.client_id, self.token_id),
                                    agent_session_id=self.client_id)
        if msg.extra.client_type.startswith("ngrok-"):
            # The SDKs (ngrok-rust) break down past 512 streams per session: queue public
            # connections beyond a safe number rather than have them fail.
            self.mux.max_local_streams = SDK_MAX_STREAMS
        else:
            self.mux.max_local_streams = AGENT_MAX_STREAMS
        if msg.extra.tunneld_window:
            window = max(proto.DEFAULT_WINDOW, min(MAX_WINDOW, msg.extra.tunneld_window))
            # Before the reply leaves: the agent opens streams only after reading it.
            self.mux.set_window(window)
            extra.tunneld_window = window
        # Authenticated: the normal limits for control streams apply from now on.
        self.mux.max_remote_streams = MAX_CONTROL_STREAMS
        self.mux.remote_window = None
        self.mux.receive_budget = None
        self.mux.idle_watcher = self.edge.idle_watcher
        self.authed = True
        self.end_preauth()
        log.info("agent %s authenticated with token %s (session %s, client %s)", self.remote_addr,
                 record.id, self.client_id, msg.extra.user_agent or msg.extra.client_type or "?")
        await reply(stream, proto.AuthResp(version=_pick_version(msg.version), client_id=self.client_id,
                                           extra=extra))

    async def _resume_or_new(self, msg: proto.Auth) -> str:
        """The session id: the previous one when the client proves it (ClientId + Cookie).

        An agent that reconnects before this edge noticed its old link die (no FIN, heartbeat
        not yet overdue) replaces that old session, which is closed here so its names are free
        for the rebinds that follow.  A ClientId without a matching cookie gets a new id: ids
        are not the client's to choose.
        """
        fields = self.edge.signer.verify("session", msg.extra.cookie) if msg.client_id else None
        if fields != [msg.client_id, self.token_id]:
            return secrets.token_hex(16)
        for old in [s for s in self.edge.sessions if s is not self and s.client_id == msg.client_id]:
            log.info("agent %s resumes session %s; closing the old link from %s", self.remote_addr,
                     msg.client_id, old.remote_addr)
            old.client_id = ""
            await old.mux.aclose()
            with trio.move_on_after(5):
                await old.ended.wait()
        return msg.client_id

    async def _rpc_bind(self, stream: MuxStream) -> None:
        bind = await read_message(stream, proto.Bind)
        resp = await self.bind(bind)
        await reply(stream, resp)

    async def bind(self, bind: proto.Bind) -> proto.BindResp:
        """Start the tunnel a Bind asks for and answer with its URL (or an error)."""
        tunnel_type = self.edge.registry.for_bind_proto(bind.proto)
        try:
            if tunnel_type is None:
                raise TunnelRejected(f"protocol {bind.proto!r} is not served by this edge",
                                     Code.PROTO_UNSUPPORTED)
            await self._refresh_rights()
            edge = self.edge.context
            tunnel_id, info = await self._start_tunnel(
                bind.id, lambda tunnel_id: tunnel_type.edge_tunnel(edge, self, bind, tunnel_id))
        except TunnelRejected as exc:
            self.edge.metrics.refused_bind(exc.code.label)
            log.info("agent %s: bind %s refused: %s", self.remote_addr, bind.proto, exc)
            return proto.BindResp(id=bind.id, proto=bind.proto, opts=bind.opts,
                                  error=wire_error(exc.reason, exc.code))
        token = ""
        if info.name is not None:
            token = self.edge.signer.sign("bind", *info.name, self.token_id)
        return proto.BindResp(id=tunnel_id, url=info.url, proto=bind.proto, opts=bind.opts,
                              extra=proto.BindRespExtra(token=token, tunnel_id=tunnel_id))

    async def _rpc_start_labeled(self, stream: MuxStream) -> None:
        msg = await read_message(stream, proto.StartTunnelWithLabel)
        await reply(stream, await self.start_labeled(msg))

    async def start_labeled(self, msg: proto.StartTunnelWithLabel) -> proto.StartTunnelWithLabelResp:
        """Start a labeled tunnel (the registry's ``for_labels`` serves them) and answer with its id."""
        labeled = self.edge.registry.for_labels()
        try:
            if labeled is None:
                raise TunnelRejected("labeled tunnels are not served by this edge", Code.PROTO_UNSUPPORTED)
            acl = await self._refresh_rights()
            if not allows_bind(acl, LABELS, msg.labels):
                text = ",".join(f"{k}={v}" for k, v in msg.labels.items())
                raise TunnelRejected(f"the authtoken's ACL does not allow the labels {text}",
                                     Code.BIND_NAME_FORBIDDEN)
            edge = self.edge.context
            tunnel_id, _ = await self._start_tunnel(
                "", lambda tunnel_id: labeled.edge_tunnel(edge, self, msg, tunnel_id))
        except TunnelRejected as exc:
            self.edge.metrics.refused_bind(exc.code.label)
            log.info("agent %s: labeled tunnel refused: %s", self.remote_addr, exc)
            return proto.StartTunnelWithLabelResp(id="", error=wire_error(exc.reason, exc.code))
        return proto.StartTunnelWithLabelResp(id=tunnel_id)

    async def _refresh_rights(self) -> tuple[str, ...]:
        """Read the authtoken's account and ACL (now, so a change through the admin API applies to
        this bind) and the reservations; return the ACL.  TunnelRejected if the token is gone."""
        store = self.edge.store
        token_id = self.token_id

        def read() -> tuple[tuple[str, tuple[str, ...]] | None, Any]:
            # Both reads in one trip to a worker thread: 10,000 agents binding at once pay for
            # every hop on the event loop.
            rights = store.token_rights(token_id)
            return rights, (store.reservations() if rights is not None else None)

        rights, reservations = await trio.to_thread.run_sync(read)
        if rights is None:
            raise TunnelRejected("the authtoken was revoked or deleted", Code.AUTHTOKEN_INVALID)
        account_id, acl = rights
        self.edge.apply_bind_policy(self.owner, account_id, acl, *reservations)
        return acl

    async def _start_tunnel(self, requested_id: str,
                            make: Callable[[str], EdgeTunnel]) -> tuple[str, TunnelInfo]:
        """Check the session's and the token's limits, make the tunnel and start it; TunnelRejected if not."""
        # Binds still starting count too: the check and the registration are apart by awaits.
        if len(self.tunnels) + self._pending_binds >= MAX_TUNNELS_PER_SESSION:
            raise TunnelRejected(f"a session may hold at most {MAX_TUNNELS_PER_SESSION} tunnels",
                                 Code.OPTION_UNSUPPORTED)
        per_token = self.edge.config.max_tunnels_per_token
        if self.edge.tunnels_by_token.get(self.token_id, 0) >= per_token:
            raise TunnelRejected(f"authtoken {self.token_id} may hold at most {per_token} tunnels "
                                 "on this edge", Code.OPTION_UNSUPPORTED)
        ok = requested_id and requested_id not in self.tunnels
        tunnel_id = requested_id if ok else "tn_" + secrets.token_hex(12)
        tunnel = make(tunnel_id)
        assert self._nursery is not None
        # Reserve a place; _run_tunnel takes it over once the tunnel is registered.
        reservation = [True]
        self._pending_binds += 1
        self.edge._count(self.edge.tunnels_by_token, self.token_id, +1)
        try:
            if isinstance(tunnel, ClaimTunnel):
                # No task: the session holds the claim and releases it (Unbind, or its end).
                info = await tunnel.claim()
                self.tunnels[tunnel_id] = tunnel
                reservation[0] = False
                self._pending_binds -= 1
            else:
                info = await self._nursery.start(self._run_tunnel, tunnel_id, tunnel, reservation)
        finally:
            if reservation[0]:
                self._pending_binds -= 1
                self.edge._count(self.edge.tunnels_by_token, self.token_id, -1)
        log.info("agent %s: tunnel %s online at %s", self.remote_addr, tunnel_id, info.url)
        if info.name is not None:
            self.tunnel_names[tunnel_id] = info.name
        return tunnel_id, info

    async def _run_tunnel(self, tunnel_id: str, tunnel: EdgeTunnel, reservation: list[bool], *,
                          task_status: trio.TaskStatus[TunnelInfo] = trio.TASK_STATUS_IGNORED) -> None:
        status = _StartedOnce(task_status)
        del task_status  # see _StartedOnce
        done = trio.Event()
        with trio.CancelScope() as scope:
            entry = (scope, done)
            self.tunnels[tunnel_id] = entry
            # The bind's reservation becomes this tunnel's place (in the session and the token).
            reservation[0] = False
            self._pending_binds -= 1
            try:
                await tunnel.run(task_status=status)
            finally:
                if self.tunnels.get(tunnel_id) is entry:
                    del self.tunnels[tunnel_id]
                self.edge._count(self.edge.tunnels_by_token, self.token_id, -1)
                done.set()

    async def _rpc_unbind(self, stream: MuxStream) -> None:
        msg = await read_message(stream, proto.Unbind)
        entry = self.tunnels.pop(msg.id, None)
        if entry is None:
            await reply(stream, proto.UnbindResp(
                error=wire_error(f"no tunnel {msg.id!r}", Code.NO_SUCH_TUNNEL)))
            return
        if isinstance(entry, ClaimTunnel):
            self._release(entry)
        else:
            scope, done = entry
            scope.cancel()
            # Answer once the address is really free, so the agent may bind it again at once.
            with trio.move_on_after(5):
                await done.wait()
        name = self.tunnel_names.pop(msg.id, None)
        if name is not None:
            # Let go on purpose: no hold.
            self.edge.routes.names.forget(*name, self.token_id)
        log.info("agent %s: tunnel %s unbound", self.remote_addr, msg.id)
        await reply(stream, proto.UnbindResp())

    # ---- for tunnel plugins (SessionContext) ------------------------------------------------

    async def open_stream(self, tunnel_id: str, client_addr: str, proto: str, *,
                          passthrough_tls: bool = False, first: bytes = b"") -> MuxStream:
        """Open a proxy stream to the agent for one public connection (once per connection: keep it lean).

        ``passthrough_tls``: the stream carries the client's TLS unterminated (TLS tunnels).
        ``first``: the connection's first bytes, sent with the header in the SYN frame (one
        write and one wakeup of the agent fewer per connection).
        """
        header = _proto.ProxyHeader(id=tunnel_id, client_addr=client_addr, proto=proto,
                                    passthrough_tls=passthrough_tls)
        return await self.mux.open_stream(_proto.encode_proxy_stream_prefix(header) + first)


@final
class EdgeAdapter:
    """:class:`~tunneld.core._tunnel.EdgeContext` over an :class:`Edge`: what plugins see of it.

    One per edge (:attr:`Edge.context`).  Each method is one direct call into the edge or its
    :class:`~tunneld.core._routes.RouteTable`: ``lookup_host`` runs once per HTTP request.
    """

    __slots__ = ("_counters", "_edge", "_routes")

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        self._routes = edge.routes
        #: (metric, sorted labels) → total.
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

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

    @property
    def limiter(self) -> FailureLimiter:
        return self._edge.limiter

    def ensure_certificate(self, host: str) -> None:
        self._edge.ensure_certificate(host)

    def listen_addr(self, name: str) -> tuple[str, int] | None:
        cfg = self._edge.config
        return {"agent": cfg.agent_addr, "http": cfg.http_addr, "https": cfg.https_addr,
                "ssh": cfg.ssh_addr}.get(name)

    def port_range(self, transport: str) -> tuple[str, int, int] | None:
        if transport != "tcp":
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

    def host_chooser(self, session: SessionContext) -> Callable[[proto.Bind, str], str]:
        return HostChooser(self._edge.host_policy, self._routes, session)

    async def refresh_bind_policy(self, owner: str, account_id: str | None, acl: Sequence[str]) -> None:
        await self._edge.refresh_bind_policy(owner, account_id, tuple(acl))

    def add_session(self, session: ListedSession) -> None:
        self._edge.plugin_sessions.add(session)

    def remove_session(self, session: ListedSession) -> None:
        self._edge.plugin_sessions.discard(session)

    # ---- hostnames ---------------------------------------------------------------------------

    def claim_host(self, route: str, host: str, holder: object, owner: str) -> None:
        self._routes.claim_host(route, host, holder, owner)

    def release_host(self, route: str, host: str, holder: object) -> None:
        self._routes.release_host(route, host, holder)

    def lookup_host(self, route: str, host: str) -> Any:
        return self._routes.hosts.get((route, host))  # inlined: once per HTTP request

    def host_available(self, host: str, owner: str) -> bool:
        return self._routes.host_available(host, owner)

    # ---- transport addresses -----------------------------------------------------------------

    def claim_address(self, transport: str, port: int, holder: object, owner: str, *,
                      requested: bool = False) -> None:
        self._routes.claim_address(transport, port, holder, owner, requested=requested)

    def release_address(self, transport: str, port: int, holder: object) -> None:
        self._routes.release_address(transport, port, holder)

    def lookup_address(self, transport: str, port: int) -> Any:
        return self._routes.lookup_address(transport, port)

    def address_available(self, transport: str, port: int, owner: str) -> bool:
        return self._routes.address_available(transport, port, owner)

    def address_owner(self, transport: str, port: int) -> str | None:
        return self._routes.address_owner(transport, port)

    def address_name(self, transport: str, port: int) -> tuple[str, str]:
        return address_name(transport, port)

    # ---- observability -----------------------------------------------------------------------

    def log_connection(self, *, client: str, proto: str, result: str, started: float, host: str = "",
                       tunnel_id: str = "", url: str = "", counts: ByteCounts | None = None) -> None:
        if counts is not None:
            self._edge.metrics.connection(tunnel_id, proto, counts.a_to_b, counts.b_to_a)
        else:
            self._edge.metrics.connection(tunnel_id, proto, 0, 0)
        log_connection(client=client, proto=proto, result=result, started=started, host=host,
                       tunnel_id=tunnel_id, url=url, counts=counts)

    def log_request(self, *, client: str, host: str, tunnel_id: str, method: str, path: str, status: int,
                    started: float) -> None:
        ended = time.monotonic()
        self._edge.metrics.request(tunnel_id, status, ended - started)
        log_request(client=client, host=host, tunnel_id=tunnel_id, method=method, path=path, status=status,
                    seconds=ended - started, ended=ended)

    def count(self, metric: str, value: float = 1, **labels: str) -> None:
        # The core's own series, which plugins add to (the ssh gateway's logins and binds).
        metrics = self._edge.metrics
        if metric == "auth_failures":
            metrics.auth_failure(labels.get("kind", ""))
            return
        if metric == "refused_binds":
            metrics.refused_bind(labels.get("code", ""))
            return
        key = (metric, tuple(sorted(labels.items())))
        self._counters[key] = self._counters.get(key, 0) + value

    def counted(self, metric: str, **labels: str) -> float:
        """The total :meth:`count` has added to ``metric`` with exactly ``labels`` (for tests)."""
        return self._counters.get((metric, tuple(sorted(labels.items()))), 0)


if TYPE_CHECKING:  # the implementation satisfies the plugin API's protocols (checked by mypy)
    _EDGE: type[EdgeContext] = EdgeAdapter
    _SESSION: type[SessionContext] = AgentSession


def _kept(msg: proto.Auth) -> proto.Auth:
    """The part of an Auth a session keeps for its life: what the admin API, remote commands and
    the heartbeat watch read.  Not the authtoken, cookie or the decoded JSON (``raw``): with
    10,000 sessions those were ~2.5 KB each, held for nothing."""
    e = msg.extra
    extra = proto.AuthExtra(os=e.os, version=e.version, metadata=e.metadata, client_type=e.client_type,
                            heartbeat_interval=e.heartbeat_interval,
                            heartbeat_tolerance=e.heartbeat_tolerance,
                            update_unsupported_error=e.update_unsupported_error,
                            stop_unsupported_error=e.stop_unsupported_error,
                            restart_unsupported_error=e.restart_unsupported_error)
    return proto.Auth(client_id=msg.client_id, extra=extra)


def _pick_version(offered: list[str]) -> str:
    for version in ("3", "2"):
        if version in offered:
            return version
    return offered[0] if offered else "2"

