"""The agent: one session to the edge, many tunnels on it, reconnecting when the link breaks.

Theory of operation
-------------------
The nursery tree (../shared/STYLE.md §2.6)::

    Agent.run(*, task_status)                 reconnect loop: backoff with jitter
    └── Agent._connection()                   one nursery per connection
          ├── MuxSession.run()                reader + writer
          ├── heartbeat: 4 random bytes every interval, echo expected within tolerance
          ├── Auth, then one Bind per public endpoint
          └── per proxy stream the edge opens: the tunnel type's agent_handle()
                e.g. forward(stream, upstream) for tcp, the HTTP relay for http

``started()`` is reported once, when the first connection has every tunnel bound.  A refused
authtoken or a refused first Bind is fatal (:class:`AuthFailed` / :class:`TunnelRejected`):
retrying would not help.  Any later failure just ends the connection nursery — its tunnels
and forwarders with it — and the loop reconnects, re-binding with the same tunnel ids.

An edge certificate that cannot be verified is :class:`CertificateFailed` (fatal on the first
connection unless :attr:`Agent.retry`).  The edge's Stop/Restart/Update (``_remote.py``) are
answered in ``_remote_command`` and, once accepted, raised out of :meth:`Agent.run` as
``RemoteCommandReceived`` for the program running the agent to act on (exit, re-execute).
"""

from __future__ import annotations

import array
import collections
import logging
import math
import os
import platform
import random
import secrets
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, final

import attrs
import trio

from .. import __version__
from . import proto
from ._capture import CaptureStore, HttpRecorder, db_size
from ._config import AgentConfig, TunnelConfig
from ._errors import (
    AuthFailed,
    Code,
    ConfigError,
    RemoteProtocolError,
    TunneldError,
    TunnelRejected,
    parse_wire_error,
)
from ._forward import forward
from ._giveback import CROWD
from ._lean import close_forcefully, lean
from ._mux import MuxSession, MuxStream
from ._plugins import build_registry, get_plugin_manager
from ._remote import Op, RemoteCommandReceived, remote_error
from ._rpc import call, read_message, reply
from ._streams import PrefixedStream
from ._tls import CARRIER_SEND_CHUNK, BulkTLSStream, client_context, start_tls_client
from ._tunnel import AgentTunnelContext, TunnelType, TunnelTypeRegistry
from ._util import connect_tcp, split_host_port
from ._websocket import HandshakeError, connect_websocket, is_websocket_url

log = logging.getLogger("tunneld.agent")

#: Per-stream window our agent asks a tunneld edge for (official edges ignore the request).
WANT_WINDOW = 4 * 1024 * 1024
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
#: Seconds to reach the edge (TCP connect).
CONNECT_TIMEOUT = 10.0
#: Seconds the TLS handshake may take once connected.  An edge that many agents reach at once
#: queues their handshakes (admission control) and answers each in turn: waiting beats giving
#: up and coming back at the end of the queue (10,000 agents at once: 35,000 retries at 10 s).
TLS_TIMEOUT = 60.0
#: A session online this long resets the backoff to BACKOFF_MIN.
ONLINE_RESET = 2.0


@attrs.define(eq=False)
class ConnectionRecord:
    """One proxied connection, as the agent API lists it."""

    #: The public client's ``host:port`` (``ProxyHeader.ClientAddr``).
    client_addr: str
    opened: float = attrs.field(factory=time.time)
    closed: float | None = None
    #: When it opened on the metrics' clock (for its duration).
    started: float = attrs.field(default=0.0, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {"client_addr": self.client_addr, "opened": _iso(self.opened),
                "closed": _iso(self.closed) if self.closed is not None else None}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


#: go-metrics' EWMA tick: rates are updated every 5 seconds.
EWMA_TICK = 5.0


@attrs.define
class EWMA:
    """An exponentially weighted moving rate per second over ``minutes`` (go-metrics' EWMA).

    As in go-metrics (and so ngrok): events are counted, every 5 s tick folds the tick's
    instant rate into the average with ``alpha = 1 - exp(-5 s / minutes)``, the first tick
    setting it outright.  Ticks are applied lazily, on each mark or read, from ``clock``.
    """

    minutes: float
    clock: Callable[[], float] = time.monotonic
    rate: float = 0.0
    _alpha: float = attrs.field(init=False)
    _uncounted: int = attrs.field(default=0, init=False)
    _started: bool = attrs.field(default=False, init=False)
    _last_tick: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._alpha = 1.0 - math.exp(-EWMA_TICK / 60.0 / self.minutes)
        self._last_tick = self.clock()

    def mark(self, n: int = 1) -> None:
        self.mark_at(self.clock(), n)

    def mark_at(self, now: float, n: int = 1) -> None:
        """:meth:`mark` with the clock already read (one read for a tunnel's three rates)."""
        if now - self._last_tick >= EWMA_TICK:
            self._advance()
        self._uncounted += n

    def value(self) -> float:
        """The current rate, events per second."""
        self._advance()
        return self.rate

    def _advance(self) -> None:
        ticks = int((self.clock() - self._last_tick) // EWMA_TICK)
        if ticks <= 0:
            return
        self._last_tick += ticks * EWMA_TICK
        instant = self._uncounted / EWMA_TICK
        self._uncounted = 0
        if self._started:
            self.rate += self._alpha * (instant - self.rate)
        else:
            self.rate, self._started = instant, True
        # The ticks after the first saw no events: each decays the rate by (1 - alpha).
        if ticks > 1:
            self.rate *= (1.0 - self._alpha) ** (ticks - 1)


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p95/p99 of ``values`` (seconds) in nanoseconds, interpolated as go-metrics does."""
    data = sorted(values)
    out = {}
    for p in (50, 90, 95, 99):
        if not data:
            out[f"p{p}"] = 0.0
            continue
        pos = p / 100 * (len(data) + 1)
        if pos < 1.0:
            v = data[0]
        elif pos >= len(data):
            v = data[-1]
        else:
            lower = data[int(pos) - 1]
            v = lower + (pos - int(pos)) * (data[int(pos)] - lower)
        # Nanoseconds, as ngrok (Go time.Duration) reports them.
        out[f"p{p}"] = float(int(v * 1e9))
    return out


#: Durations kept per tunnel for the percentiles (go-metrics samples 1028).
SAMPLE_SIZE = 1028


class Samples:
    """The latest :data:`SAMPLE_SIZE` durations, in seconds, in one array of doubles.

    Not a deque of floats: each of those is an object of its own, allocated when its request
    ended, and the ~2,000 a tunnel kept were spread over the allocator's arenas by a crowd of
    connections, keeping dozens of them from going back to the OS when the crowd had gone.
    """

    __slots__ = ("_values", "_next", "_count")

    def __init__(self) -> None:
        self._values = array.array("d", bytes(8 * SAMPLE_SIZE))
        self._next = 0
        self._count = 0

    def add(self, value: float) -> None:
        i = self._next
        self._values[i] = value
        self._next = i + 1 if i + 1 < SAMPLE_SIZE else 0
        if self._count < SAMPLE_SIZE:
            self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[float]:
        """The samples kept, in no particular order (percentiles sort them)."""
        return iter(self._values[:self._count])


@attrs.define
class Metrics:
    """Connection and request counters of one tunnel (ngrok's ``metrics`` shape).

    ``conns``: connections proxied (count, open now), their rates, and the percentiles of the
    durations of those that ended; ``http``: requests, their rates and request durations.
    Rates are go-metrics EWMAs per second over 1, 5 and 15 minutes.  ``clock`` (monotonic
    seconds) is injectable so that tests can move time on.
    """

    clock: Callable[[], float] = attrs.field(default=time.monotonic, kw_only=True)
    conns_count: int = 0
    conns_gauge: int = 0
    http_count: int = 0
    #: The latest connections, oldest first (open ones and recently closed ones).
    recent: collections.deque[ConnectionRecord] = attrs.field(factory=lambda: collections.deque(maxlen=100))
    _conn_rates: tuple[EWMA, ...] = attrs.field(init=False)
    _req_rates: tuple[EWMA, ...] = attrs.field(init=False)
    _conn_durations: Samples = attrs.field(factory=Samples, init=False)
    _req_durations: Samples = attrs.field(factory=Samples, init=False)

    def __attrs_post_init__(self) -> None:
        self._conn_rates = tuple(EWMA(m, self.clock) for m in (1, 5, 15))
        self._req_rates = tuple(EWMA(m, self.clock) for m in (1, 5, 15))

    def conn_opened(self, client_addr: str = "") -> ConnectionRecord:
        self.conns_count += 1
        self.conns_gauge += 1
        now = self.clock()
        for rate in self._conn_rates:
            rate.mark_at(now)
        record = ConnectionRecord(client_addr, started=now)
        self.recent.append(record)
        return record

    def conn_closed(self, record: ConnectionRecord | None = None) -> None:
        self.conns_gauge -= 1
        if record is not None:
            record.closed = time.time()
            self._conn_durations.add(max(0.0, self.clock() - record.started))

    def request_done(self, seconds: float) -> None:
        self.http_count += 1
        now = self.clock()
        for rate in self._req_rates:
            rate.mark_at(now)
        self._req_durations.add(seconds)

    def as_json(self) -> dict[str, Any]:
        def rates(ewmas: tuple[EWMA, ...]) -> dict[str, float]:
            return {f"rate{e.minutes:g}": e.value() for e in ewmas}

        return {
            "conns": {"count": self.conns_count, "gauge": self.conns_gauge, **rates(self._conn_rates),
                      **percentiles(self._conn_durations)},
            "http": {"count": self.http_count, **rates(self._req_rates), **percentiles(self._req_durations)},
        }


@attrs.define(eq=False)
class AgentTunnel:
    """One public endpoint of a configured tunnel, as the agent's API shows it."""

    #: ``command_line`` or ``command_line (http)``.
    name: str
    config: TunnelConfig
    type: TunnelType
    #: Not in the repr: its options may hold basic-auth passwords.
    bind: proto.Bind = attrs.field(repr=False)
    #: Normalised upstream (``http://localhost:8080``, ``localhost:22``).
    upstream: str
    public_url: str = ""
    proto: str = ""
    tunnel_id: str = ""
    #: The edge's resume token for this tunnel, sent back on rebind to keep the same URL.
    token: str = ""
    metrics: Metrics = attrs.field(factory=Metrics)
    #: The agent's capture store (the local inspector); None: never captured.
    captures: CaptureStore | None = attrs.field(default=None, repr=False)
    #: The tunnel as its type's ``agent_handle`` sees it (``tunneld.plugin.AgentTunnelContext``).
    context: AgentTunnelAdapter = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.context = AgentTunnelAdapter(self)


@final
class AgentTunnelAdapter:
    """:class:`~tunneld.core._tunnel.AgentTunnelContext` over an :class:`AgentTunnel` (one per tunnel)."""

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

    def record_http(self, header: proto.ProxyHeader, head: bytes) -> HttpRecorder | None:
        tunnel = self._tunnel
        if tunnel.captures is None or not tunnel.config.inspect or not tunnel.type.inspects:
            return None
        return tunnel.captures.recorder(tunnel.name, header.client_addr, head)

    async def open_upstream(self, stream: trio.abc.HalfCloseableStream,
                            header: proto.ProxyHeader) -> trio.abc.HalfCloseableStream | None:
        return await open_upstream(self._tunnel, stream, header)

    async def forward_to_upstream(self, stream: trio.abc.HalfCloseableStream,
                                  header: proto.ProxyHeader) -> None:
        await forward_to_upstream(self._tunnel, stream, header)


if TYPE_CHECKING:  # the adapter satisfies the plugin API's protocol (checked by mypy)
    _TUNNEL: type[AgentTunnelContext] = AgentTunnelAdapter


@attrs.frozen
class AgentInfo:
    """What :meth:`Agent.run` reports once every tunnel is bound."""

    tunnels: list[AgentTunnel]


@attrs.define(eq=False)
class Agent:
    """The tunneld agent.  ``await nursery.start(agent.run)`` reports :class:`AgentInfo`."""

    config: AgentConfig
    tunnel_configs: list[TunnelConfig]
    registry: TunnelTypeRegistry = attrs.field(factory=lambda: build_registry(get_plugin_manager()))
    #: ``Auth.Extra.ClientType``: the edge treats ``ngrok-*`` clients (the SDKs) differently.
    client_type: str = "tunneld"
    tunnels: list[AgentTunnel] = attrs.field(factory=list, init=False)
    #: "connecting", "online" or "reconnecting" (shown by the status page and console).
    status: str = attrs.field(default="connecting", init=False)
    client_id: str = attrs.field(default="", init=False)
    latency: float | None = attrs.field(default=None, init=False)
    #: Set on every (re)connection with every tunnel bound; replaced by a new Event after.
    online: trio.Event = attrs.field(factory=trio.Event, init=False)
    _cookie: str = attrs.field(default="", init=False)
    _online_since: float | None = attrs.field(default=None, init=False)
    _by_id: dict[str, AgentTunnel] = attrs.field(factory=dict, init=False)
    #: The current connection's session (for :meth:`stop_tunnels`).
    _mux: MuxSession | None = attrs.field(default=None, init=False)
    # ---- lifecycle (set by the program running the agent; see tunneld/_agent_main.py) ----
    #: Remote commands the program carries out when the edge asks (``RemoteCommandReceived``
    #: is raised out of :meth:`run` for it to act on); the others are declared unsupported.
    remote_ops: frozenset[Op] = attrs.field(factory=frozenset, init=False)
    #: Installs the release an Update asks for (raises with the reason); None: no updates.
    updater: Callable[[proto.Update], Awaitable[None]] | None = attrs.field(default=None, init=False)
    #: Keep retrying when the first connection fails for a reason retrying seldom fixes (an
    #: untrusted certificate); otherwise :class:`CertificateFailed` ends :meth:`run` at once.
    retry: bool = attrs.field(default=False, init=False)
    #: Why the last connection attempt failed or ended ("" before any), for the console.
    last_error: str = attrs.field(default="", init=False)
    #: When (``time.time()``) the next attempt is made while reconnecting, else None.
    retry_at: float | None = attrs.field(default=None, init=False)
    #: Connection attempts that failed or ended so far (the console redraws on a change).
    failed_attempts: int = attrs.field(default=0, init=False)
    _remote_busy: bool = attrs.field(default=False, init=False)
    #: HTTP exchanges captured for the local inspector, within ``inspect_db_size``; none
    #: without a web interface (``web_addr: false``), where nobody could look at them.
    captures: CaptureStore = attrs.field(init=False, default=attrs.Factory(
        lambda self: CaptureStore(0 if self.config.web_addr is None
                                  else db_size(self.config.inspect_db_size)), takes_self=True))

    def __attrs_post_init__(self) -> None:
        for tc in self.tunnel_configs:
            tunnel_type = self.registry[tc.proto]
            upstream = tunnel_type.parse_addr(tc.addr)
            for req in tunnel_type.agent_binds(tc):
                bind = _with_metadata(req.bind, tc)
                self.tunnels.append(AgentTunnel(req.name, tc, tunnel_type, bind, upstream,
                                                proto=req.bind.proto, captures=self.captures))

    async def run(self, *, task_status: trio.TaskStatus[AgentInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, bind, serve; reconnect with backoff (0.5 s doubling to 30 s, with jitter)."""
        first = True
        failures = 0
        while True:
            self._online_since = None
            try:
                if first:
                    await self._connection(task_status=task_status)
                else:
                    await self._connection()
                reason = "connection closed"
            except* AuthFailed:
                # The edge says stop (revoked or unknown token): retrying cannot help.
                raise
            except* CertificateFailed as group:
                # Said loudly every time: retrying will not help until someone fixes the trust.
                reason = str(group.exceptions[0])
                log.error("%s", reason, extra={"event": "session failed", "fields": {"err": reason}})
                if first and not self.online.is_set() and not self.retry:
                    raise
            except* TunnelRejected as group:
                # Fatal when starting: the user asked for something this edge refuses.  Later
                # (e.g. a held name given away after a long outage) keep trying: it may free up.
                if first:
                    raise
                reason = "; ".join(str(e) for e in group.exceptions)
                log.error("%s", reason)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                     RemoteProtocolError, trio.EndOfChannel) as group:
                if first and not self.online.is_set() and not _transient(group):
                    raise
                reason = "; ".join(_reason(e) for e in group.exceptions)
            if self.online.is_set():
                first = False
                self.online = trio.Event()
            # A link that worked for a while starts the backoff afresh: the edge restarting or a
            # network blip should be bridged in about a second, not after the last long delay.
            if self._online_since is not None and time.monotonic() - self._online_since >= ONLINE_RESET:
                failures = 0
            self.status = "reconnecting"
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** failures) * random.uniform(0.5, 1.0)
            failures += 1
            self.last_error = reason
            self.retry_at = time.time() + delay
            self.failed_attempts += 1
            log.warning("session with %s ended (%s); reconnecting in %.1fs", self.config.server_addr,
                        reason, delay)
            await trio.sleep(delay)

    async def _connection(self, *,
                          task_status: trio.TaskStatus[AgentInfo] = trio.TASK_STATUS_IGNORED) -> None:
        root = self.config.root_cas
        ctx = client_context(None if root in ("", "host", "trusted") else _path(root))
        async with trio.open_nursery() as nursery:
            try:
                if is_websocket_url(self.config.server_addr):
                    carrier: trio.abc.Stream = await connect_websocket(self.config.server_addr, ctx)
                else:
                    host, port = split_host_port(self.config.server_addr, default_port=443)
                    carrier = await open_edge_tls(host.strip("[]"), port, ctx)
            except trio.BrokenResourceError as exc:
                problem = _certificate_problem(exc, self.config.server_addr, root)
                if problem is None:
                    raise
                raise CertificateFailed(problem) from exc
            mux = self._mux = MuxSession(carrier, client=True)
            await nursery.start(mux.run)
            nursery.start_soon(self._heartbeat, mux)
            await self._auth(mux)
            for tunnel in self.tunnels:
                await self._bind(mux, tunnel)
            self.status = "online"
            self.retry_at = None
            self._online_since = time.monotonic()
            self.online.set()
            task_status.started(AgentInfo(list(self.tunnels)))
            while True:
                try:
                    stream = await mux.accept_stream()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    break
                nursery.start_soon(self._handle_stream, stream)
            raise trio.BrokenResourceError(mux.close_reason or "session ended")

    async def _auth(self, mux: MuxSession) -> None:
        extra = proto.AuthExtra(
            os=platform.system().lower(), arch=platform.machine(), authtoken=self.config.authtoken,
            version=__version__, hostname=socket.gethostname(), user_agent=f"tunneld/{__version__}",
            cookie=self._cookie, client_type=self.client_type,
            heartbeat_interval=int(self.config.heartbeat_interval * 1e9),
            heartbeat_tolerance=int(self.config.heartbeat_tolerance * 1e9),
            update_unsupported_error=self._remote_refusal(Op.UPDATE) or "",
            stop_unsupported_error=self._remote_refusal(Op.STOP) or "",
            restart_unsupported_error=self._remote_refusal(Op.RESTART) or "",
            tunneld_window=WANT_WINDOW, metadata=self.config.metadata,
        )
        resp = await call(mux, proto.StreamType.AUTH, proto.Auth(version=["3", "2"], client_id=self.client_id,
                                                                 extra=extra), proto.AuthResp)
        if resp.error:
            message, code = parse_wire_error(resp.error)
            raise AuthFailed(message, code)
        if resp.extra.tunneld_window:
            mux.set_window(resp.extra.tunneld_window)
        self.client_id = resp.client_id
        self._cookie = resp.extra.cookie
        log.info("client session established: id=%s", self.client_id,
                 extra={"event": "client session established",
                        "fields": {"obj": "csess", "id": self.client_id}})

    async def _bind(self, mux: MuxSession, tunnel: AgentTunnel) -> None:
        if tunnel not in self.tunnels:  # stopped (stop_tunnel) while this connection was binding
            return
        # A type with ``agent_start_labeled`` (the labeled plugin's) starts its tunnels by labels.
        start_labeled = getattr(tunnel.type, "agent_start_labeled", None)
        if start_labeled is not None:
            await self._start_labeled(mux, tunnel, start_labeled(tunnel.config))
            return
        bind = attrs.evolve(tunnel.bind, id=tunnel.tunnel_id,
                            extra=attrs.evolve(tunnel.bind.extra, token=tunnel.token))
        resp = await call(mux, proto.StreamType.BIND, bind, proto.BindResp)
        if resp.error:
            message, code = parse_wire_error(resp.error)
            try:
                ecode = Code(code) if code is not None else Code.BIND_MALFORMED
            except ValueError:
                ecode = Code.BIND_MALFORMED
            raise TunnelRejected(f"tunnel {tunnel.name}: {message}", ecode)
        if tunnel.tunnel_id and tunnel.tunnel_id != resp.id:
            self._by_id.pop(tunnel.tunnel_id, None)
        tunnel.tunnel_id = resp.id
        if tunnel not in self.tunnels:  # stopped during the Bind: let the edge forget it too
            await self._unbind(mux, [tunnel])
            return
        if tunnel.public_url and tunnel.public_url != resp.url:
            log.warning("tunnel %s moved from %s to %s (its old address was no longer ours)",
                        tunnel.name, tunnel.public_url, resp.url)
        tunnel.token = resp.extra.token
        tunnel.public_url = resp.url
        tunnel.proto = resp.proto or tunnel.bind.proto
        self._by_id[resp.id] = tunnel
        log.info("started tunnel %s: %s -> %s", tunnel.name, resp.url, tunnel.upstream,
                 extra={"event": "started tunnel",
                        "fields": {"obj": "tunnels", "name": tunnel.name, "addr": tunnel.upstream,
                                   "url": resp.url}})

    async def _start_labeled(self, mux: MuxSession, tunnel: AgentTunnel,
                             msg: proto.StartTunnelWithLabel) -> None:
        """StartTunnelWithLabel for ``tunnel``: no public URL, the edges selecting its labels route to it."""
        resp = await call(mux, proto.StreamType.START_TUNNEL_WITH_LABEL, msg, proto.StartTunnelWithLabelResp)
        if resp.error or not resp.id:
            message, code = parse_wire_error(resp.error or "the edge gave the labeled tunnel no id")
            try:
                ecode = Code(code) if code is not None else Code.BIND_MALFORMED
            except ValueError:
                ecode = Code.BIND_MALFORMED
            raise TunnelRejected(f"tunnel {tunnel.name}: {message}", ecode)
        if tunnel.tunnel_id and tunnel.tunnel_id != resp.id:
            self._by_id.pop(tunnel.tunnel_id, None)
        tunnel.tunnel_id = resp.id
        self._by_id[resp.id] = tunnel
        labels = ",".join(f"{k}={v}" for k, v in msg.labels.items())
        log.info("started tunnel %s: labels %s -> %s", tunnel.name, labels, tunnel.upstream,
                 extra={"event": "started tunnel", "fields": {"obj": "tunnels", "name": tunnel.name,
                                                              "addr": tunnel.upstream, "labels": labels}})

    async def stop_tunnels(self, timeout: float = 10.0) -> None:
        """Leave gracefully: unbind every tunnel, then let the proxied connections under way finish.

        The edge sends no new connections once a tunnel is unbound (a labeled tunnel's group
        moves them to its other members), so cancelling :meth:`run` afterwards fails none.
        Gives up waiting after ``timeout`` seconds.
        """
        mux = self._mux
        with trio.move_on_after(timeout):
            if mux is not None and self.online.is_set():
                for tunnel in self.tunnels:
                    if tunnel.tunnel_id:
                        try:
                            await call(mux, proto.StreamType.UNBIND, proto.Unbind(id=tunnel.tunnel_id),
                                       proto.UnbindResp)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
                            return
            # Streams the edge opened just before the unbind may not have been counted yet.
            quiet = 0
            while quiet < 3:
                await trio.sleep(0.05)
                busy = any(t.metrics.conns_gauge for t in self.tunnels)
                quiet = 0 if busy else quiet + 1

    # ---- runtime tunnels (the local API's POST/DELETE /api/tunnels and /api/endpoints) ----------

    async def start_tunnel(self, config: TunnelConfig) -> list[AgentTunnel]:
        """Add a tunnel to the running agent and bind it on the live session.

        Returns its public endpoints in API order (an http tunnel serving both schemes has two,
        https first, as at startup).  Online, they come back bound, with their URLs; offline (or
        if the session breaks during the Bind), they are added unbound (``public_url == ""``)
        and bound with the others on (re)connect.

        Raises:
            ValueError: a tunnel of that name exists, or the definition is bad (unknown type,
                address, options).
            TunnelRejected: the edge refused a Bind (its ``code`` says why); nothing is left
                behind, not even the endpoint bound before the refused one.
        """
        new = self._new_tunnels(config)
        # No checkpoint between the name check in _new_tunnels and here: two concurrent starts
        # of one name cannot both pass.  A connection still binding picks these up in its loop.
        self.tunnels.extend(new)
        mux = self._mux
        if mux is None or not self.online.is_set():
            return new
        bound: list[AgentTunnel] = []
        # Shielded (the RPCs have their own timeout): a client giving up on its HTTP request
        # must not leave a tunnel half bound, listed but unreachable until the next reconnect.
        with trio.CancelScope(shield=True):
            try:
                for tunnel in new:
                    await self._bind(mux, tunnel)
                    bound.append(tunnel)
            except TunnelRejected:
                self._forget(new)
                await self._unbind(mux, bound)
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    RemoteProtocolError) as exc:
                # The session is going: run() reconnects and binds every listed tunnel, these too.
                log.info("tunnel %s: session ended while binding (%s); bound on reconnect",
                         config.name, exc or type(exc).__name__)
        return new

    async def stop_tunnel(self, name: str) -> None:
        """Unbind a tunnel and forget it; connections already proxied are left to finish.

        ``name`` is a tunnel's configured name (all its endpoints go: ``web`` stops both ``web``
        and ``web (http)``) or one endpoint's API name (``web (http)``: that endpoint only).

        Raises:
            KeyError: no tunnel has that name.
        """
        gone = ([t for t in self.tunnels if t.config.name == name]
                or [t for t in self.tunnels if t.name == name])
        if not gone:
            raise KeyError(name)
        # Off the list first: a reconnect from now on does not bind them again.
        self.tunnels = [t for t in self.tunnels if t not in gone]
        mux = self._mux
        with trio.CancelScope(shield=True):
            if mux is not None and self.online.is_set():
                await self._unbind(mux, gone)
        self._forget(gone)

    def _new_tunnels(self, config: TunnelConfig) -> list[AgentTunnel]:
        """The endpoints of ``config``, checked against the type and the tunnels already here."""
        if not config.name or any(ord(c) < 32 or ord(c) == 127 for c in config.name):
            raise ValueError("a tunnel needs a name without control characters")
        taken = {t.config.name for t in self.tunnels} | {t.name for t in self.tunnels}
        if config.name in taken:
            raise ValueError(f"a tunnel named {config.name!r} already exists")
        if config.proto not in self.registry:
            raise ValueError(f"unknown tunnel type {config.proto[:64]!r} "
                             f"(known: {', '.join(self.registry.names())})")
        tunnel_type = self.registry[config.proto]
        try:
            upstream = tunnel_type.parse_addr(config.addr)
        except ValueError as exc:
            raise ValueError(f"addr: {exc}") from exc
        try:
            requests = tunnel_type.agent_binds(config)
        except ConfigError as exc:  # e.g. a labeled tunnel without labels, a tls key pair
            raise ValueError(str(exc)) from exc
        new = [AgentTunnel(req.name, config, tunnel_type, _with_metadata(req.bind, config), upstream,
                           proto=req.bind.proto,
                           captures=self.captures)
               for req in requests]
        for tunnel in new:
            if tunnel.name in taken:  # "web (http)" when a tunnel is named so already
                raise ValueError(f"a tunnel named {tunnel.name!r} already exists")
        return new

    async def _unbind(self, mux: MuxSession, tunnels: list[AgentTunnel]) -> None:
        """Unbind each bound tunnel of ``tunnels`` (a broken session has unbound them all)."""
        for tunnel in tunnels:
            if not tunnel.tunnel_id:
                continue
            try:
                await call(mux, proto.StreamType.UNBIND, proto.Unbind(id=tunnel.tunnel_id), proto.UnbindResp)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    RemoteProtocolError):
                return
            log.info("stopped tunnel %s: %s", tunnel.name, tunnel.public_url,
                     extra={"event": "stopped tunnel",
                            "fields": {"obj": "tunnels", "name": tunnel.name, "url": tunnel.public_url}})

    def _forget(self, tunnels: list[AgentTunnel]) -> None:
        """Take ``tunnels`` off the list and stop routing their proxy streams."""
        self.tunnels = [t for t in self.tunnels if t not in tunnels]
        for tunnel in tunnels:
            if self._by_id.get(tunnel.tunnel_id) is tunnel:
                del self._by_id[tunnel.tunnel_id]

    async def _heartbeat(self, mux: MuxSession) -> None:
        """Send 4 random bytes every interval; silence for interval + tolerance ends the session.

        The deadline runs from the last echo, so a link that dies right after one is noticed
        ``interval + tolerance`` (25 s by default) later, not a whole interval after that.
        """
        stream = await mux.open_stream(proto.encode_stream_type(proto.StreamType.HEARTBEAT))
        interval = self.config.heartbeat_interval
        limit = interval + self.config.heartbeat_tolerance
        last_ok = time.monotonic()
        try:
            while True:
                await trio.sleep_until(trio.current_time() + interval)
                nonce = struct.pack("!I", secrets.randbits(32))
                sent = time.monotonic()
                with trio.move_on_after(max(0.0, last_ok + limit - sent)) as scope:
                    await stream.send_all(nonce)
                    echo = await stream.receive_exactly(4)
                if scope.cancelled_caught:
                    log.warning("no heartbeat answer from the edge in %.0fs; reconnecting", limit)
                    await mux.aclose()
                    return
                if echo != nonce:
                    raise RemoteProtocolError("heartbeat echo does not match")
                last_ok = time.monotonic()
                self.latency = last_ok - sent
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    # ---- remote management (Stop, Restart, Update from the edge) ---------------------------------

    def _remote_refusal(self, op: Op) -> str | None:
        """Why this agent refuses ``op`` (declared in Auth, answered to the edge); None: it obeys."""
        if not getattr(self.config, "remote_management", True):
            return f"remote {op.value} refused: remote management is disabled on this agent " \
                   "(remote_management: false in its configuration)"
        if op not in self.remote_ops:
            return f"remote {op.value} refused: the program running this agent does not implement it"
        if op is not Op.STOP and sys.platform == "win32":
            return f"remote {op.value} refused: an agent cannot re-execute itself on Windows; " \
                   "use remote stop and the service's recovery policy"
        if op is Op.UPDATE and self.updater is None:
            return "remote update refused: this agent cannot update itself"
        return None

    async def _remote_command(self, stream: MuxStream, op: Op) -> None:
        """Answer a Stop/Restart/Update, then (if accepted) raise :class:`RemoteCommandReceived`.

        Stop unbinds every tunnel first (the edge releases the names at once, as on Ctrl+C);
        Restart and Update keep them held, so the re-executed agent resumes them.
        """
        msg = await read_message(stream, proto.Update if op is Op.UPDATE else proto.CommandResp)
        refusal, code = self._remote_refusal(op), op.unsupported
        if refusal is None and self._remote_busy:
            refusal, code = f"remote {op.value} refused: another remote command is under way", op.failed
        if refusal is not None:
            log.warning("%s", refusal, extra={"event": "remote command refused",
                                              "fields": {"op": op.value, "err": refusal}})
            await reply(stream, proto.CommandResp(error=remote_error(refusal, code)))
            return
        self._remote_busy = True
        try:
            if op is Op.UPDATE:
                assert self.updater is not None and isinstance(msg, proto.Update)
                log.info("remote update requested by the edge (version %s)", msg.version or "newest",
                         extra={"event": "remote update", "fields": {"version": msg.version}})
                try:
                    await self.updater(msg)
                except Exception as exc:  # noqa: BLE001 - any failure is the edge's answer
                    text = f"update failed: {exc}"
                    log.error("%s", text, extra={"event": "remote update failed", "fields": {"err": text}})
                    await reply(stream, proto.CommandResp(error=remote_error(text, op.failed)))
                    return
            await reply(stream, proto.CommandResp())
            mux = self._mux
            if op is Op.STOP:
                log.info("remote stop requested by the edge: stopping",
                         extra={"event": "remote stop", "fields": {"obj": "csess", "id": self.client_id}})
                await self.stop_tunnels(timeout=5.0)
            else:
                log.info("remote %s requested by the edge: restarting", op.value,
                         extra={"event": f"remote {op.value}",
                                "fields": {"obj": "csess", "id": self.client_id}})
            if mux is not None:
                # Flushes the answer out before the process goes (GOAWAY waits for the writer).
                await mux.go_away()
        finally:
            self._remote_busy = False
        raise RemoteCommandReceived(op)

    def resume_state(self) -> dict[str, Any]:
        """What a re-executed agent needs to resume this session and its tunnels' names.

        The session id with its cookie, and each tunnel's id and resume token (signed by the
        edge, which keeps the names held for that long after the link goes).
        """
        return {"client_id": self.client_id, "cookie": self._cookie,
                "tunnels": [{"name": t.name, "id": t.tunnel_id, "token": t.token, "url": t.public_url}
                            for t in self.tunnels if t.tunnel_id]}

    def apply_resume_state(self, state: dict[str, Any]) -> None:
        """Take over :meth:`resume_state` of the agent this process replaced (tunnels matched by name)."""
        self.client_id = str(state.get("client_id", ""))
        self._cookie = str(state.get("cookie", ""))
        saved = {str(t.get("name")): t for t in state.get("tunnels", []) if isinstance(t, dict)}
        for tunnel in self.tunnels:
            entry = saved.get(tunnel.name)
            if entry is not None:
                tunnel.tunnel_id = str(entry.get("id", ""))
                tunnel.token = str(entry.get("token", ""))
                tunnel.public_url = str(entry.get("url", ""))

    async def _handle_stream(self, stream: MuxStream) -> None:
        try:
            with trio.fail_after(30):
                stype = proto.decode_stream_type(await stream.receive_exactly(4))
                if stype == proto.StreamType.PROXY:
                    reader = proto.ProxyHeaderReader()
                    header = None
                    while header is None:
                        data = await stream.receive_some()
                        if not data:
                            raise RemoteProtocolError("proxy stream ended inside its header")
                        header = reader.feed(data)
            if stype == proto.StreamType.PROXY:
                assert header is not None  # the loop above ends with one
                await self._proxy(stream, header, reader.leftover)
            elif stype == proto.StreamType.HEARTBEAT:
                while data := await stream.receive_some(64):
                    await stream.send_all(data)
            elif (op := Op.for_stream_type(stype)) is not None:
                await self._remote_command(stream, op)
            else:
                stream.reset(proto.ErrorCode.PROTOCOL)
        except (RemoteProtocolError, trio.TooSlowError) as exc:
            log.warning("bad stream from the edge: %s", exc)
            stream.reset(proto.ErrorCode.PROTOCOL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            stream.reset()
        finally:
            # No checkpoint (the close itself never waits): when the session ends just as a
            # remote command is accepted, a cancelled one here would replace the
            # RemoteCommandReceived on its way out with Cancelled, and the agent would reconnect
            # instead of restarting.
            stream.close_now()

    async def _proxy(self, stream: MuxStream, header: proto.ProxyHeader, leftover: bytes) -> None:
        tunnel = self._by_id.get(header.id)
        if tunnel is None:
            log.warning("proxy stream for unknown tunnel %s", header.id)
            stream.reset(proto.ErrorCode.STREAM_REFUSED)
            return
        record = tunnel.metrics.conn_opened(header.client_addr)
        log.debug("tunnel %s: connection from %s", tunnel.name, header.client_addr)
        CROWD.opened()
        try:
            await tunnel.type.agent_handle(tunnel.context, PrefixedStream(stream, leftover), header)
        finally:
            CROWD.closed()
            tunnel.metrics.conn_closed(record)


async def open_edge_tcp(host: str, port: int) -> trio.SocketStream:
    """The TCP connection to the edge (``bench/many_agents.py`` replaces it to spread sources)."""
    with trio.fail_after(CONNECT_TIMEOUT):
        return await trio.open_tcp_stream(host, port)


async def open_edge_tls(host: str, port: int, context: Any) -> BulkTLSStream:
    """Connect to the edge within CONNECT_TIMEOUT, then handshake within TLS_TIMEOUT.

    The socket is lean (``_lean``): the mux's carrier reads and writes that need no wait skip
    the scheduler (one each per batch of frames; an idle session's heartbeat is one batch).
    """
    return await start_tls_client(await open_edge_tcp(host, port), context, server_hostname=host,
                                  timeout=TLS_TIMEOUT, lean_io=True, send_chunk=CARRIER_SEND_CHUNK)


def _transient(group: BaseExceptionGroup[Any]) -> bool:
    """Connection refused and friends on the very first attempt are worth retrying."""
    return all(isinstance(e, (OSError, trio.BrokenResourceError, trio.TooSlowError, HandshakeError))
               for e in group.exceptions)


def _reason(exc: BaseException) -> str:
    """A one-line reason for a failed connection, with the cause trio's "all attempts" hides."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if text.startswith("all attempts to connect") and cause is not None:
        detail = getattr(cause, "strerror", None) or str(cause)
        if detail:
            text = f"{text}: {detail}"
    return text


class CertificateFailed(TunneldError):
    """The edge's certificate could not be verified (untrusted CA, or made out for other names)."""


def _certificate_problem(exc: BaseException, server_addr: str, root_cas: str) -> str | None:
    """A message with a hint when ``exc`` (a failed TLS connect) is a certificate problem, else None."""
    from OpenSSL import SSL
    from service_identity import CertificateError, VerificationError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, SSL.Error) and "certificate verify failed" in str(cause):
            where = f"the CAs in {root_cas}" if root_cas not in ("", "host", "trusted") \
                else "the system's trusted CAs"
            return (f"certificate not trusted: the certificate of {server_addr} is not signed by "
                    f"{where}; set root_cas (--root-cas FILE) to the PEM of the CA that signed it")
        if isinstance(cause, (VerificationError, CertificateError)):
            return (f"certificate not trusted: the certificate of {server_addr} is not made out for "
                    f"that name ({cause}); check server_addr (--server-addr)")
        cause = cause.__cause__
    return None


def _path(value: str) -> Path:
    return Path(os.path.expanduser(value))


#: Seconds a tcp/tls tunnel's agent gives its upstream to accept a connection.
UPSTREAM_CONNECT_TIMEOUT = 10.0


async def open_upstream(tunnel: AgentTunnel, stream: trio.abc.HalfCloseableStream,
                        header: proto.ProxyHeader) -> trio.abc.HalfCloseableStream | None:
    """Connect a proxied tcp/tls connection to ``tunnel.upstream``, logging ngrok's join line.

    When the upstream cannot be reached, ``stream`` is reset (the public client sees the
    connection end at once) and None is returned.
    """
    log.info("tunnel %s: connection from %s", tunnel.name, header.client_addr,
             extra={"event": "join connections",
                    "fields": {"obj": "join", "name": tunnel.name, "l": tunnel.upstream,
                               "r": header.client_addr}})
    host, port = split_host_port(tunnel.upstream)
    try:
        with trio.fail_after(UPSTREAM_CONNECT_TIMEOUT):
            upstream = await connect_tcp(host.strip("[]"), port)
    except (OSError, trio.TooSlowError) as exc:
        log.warning("tunnel %s: cannot reach %s: %s", tunnel.name, tunnel.upstream, exc)
        reset = getattr(stream, "reset", None)
        if reset is not None:
            reset()
        return None
    # A SocketStream, or its lean twin: both half-closeable (``lean`` is typed for any stream).
    return cast("trio.abc.HalfCloseableStream", lean(upstream))


async def forward_to_upstream(tunnel: AgentTunnel, stream: trio.abc.HalfCloseableStream,
                              header: proto.ProxyHeader) -> None:
    """Relay a proxied tcp/tls connection to ``tunnel.upstream`` byte for byte."""
    upstream = await open_upstream(tunnel, stream, header)
    if upstream is None:
        return
    try:
        await forward(stream, upstream)
    finally:
        await close_forcefully(upstream)


def _with_metadata(bind: proto.Bind, config: TunnelConfig) -> proto.Bind:
    """``bind`` carrying the tunnel's ``metadata`` (Bind ``Extra.Metadata``) unless its type set one."""
    if bind.extra.metadata or not config.metadata:
        return bind
    return attrs.evolve(bind, extra=attrs.evolve(bind.extra, metadata=config.metadata))
