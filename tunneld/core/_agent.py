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
"""

from __future__ import annotations

import collections
import logging
import os
import platform
import random
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, final

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from .. import __version__
from . import proto
from ._config import AgentConfig, TunnelConfig
from ._errors import AuthFailed, Code, RemoteProtocolError, TunnelRejected, parse_wire_error
from ._forward import forward
from ._lean import lean
from ._mux import MuxSession, MuxStream
from ._plugins import build_registry, get_plugin_manager
from ._rpc import call, read_message, reply
from ._streams import PrefixedStream
from ._tls import client_context, open_tls_client
from ._tunnel import AgentTunnelContext, TunnelType, TunnelTypeRegistry
from ._util import connect_tcp, set_nodelay, split_host_port
from ._websocket import connect_websocket, is_websocket_url

log = logging.getLogger("tunneld.agent")

#: Per-stream window our agent asks a tunneld edge for (official edges ignore the request).
WANT_WINDOW = 4 * 1024 * 1024
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
#: A session online this long resets the backoff to BACKOFF_MIN.
ONLINE_RESET = 2.0


@attrs.define(eq=False)
class ConnectionRecord:
    """One proxied connection, as the agent API lists it."""

    #: The public client's ``host:port`` (``ProxyHeader.ClientAddr``).
    client_addr: str
    opened: float = attrs.field(factory=time.time)
    closed: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"client_addr": self.client_addr, "opened": _iso(self.opened),
                "closed": _iso(self.closed) if self.closed is not None else None}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@attrs.define
class Metrics:
    """Connection and request counters of one tunnel (ngrok's ``metrics`` shape)."""

    conns_count: int = 0
    conns_gauge: int = 0
    http_count: int = 0
    #: The latest connections, oldest first (open ones and recently closed ones).
    recent: collections.deque[ConnectionRecord] = attrs.field(factory=lambda: collections.deque(maxlen=100))
    _conn_times: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=4096))
    _req_times: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=4096))
    _durations: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=1024))

    def conn_opened(self, client_addr: str = "") -> ConnectionRecord:
        self.conns_count += 1
        self.conns_gauge += 1
        self._conn_times.append(time.monotonic())
        record = ConnectionRecord(client_addr)
        self.recent.append(record)
        return record

    def conn_closed(self, record: ConnectionRecord | None = None) -> None:
        self.conns_gauge -= 1
        if record is not None:
            record.closed = time.time()

    def request_done(self, seconds: float) -> None:
        self.http_count += 1
        self._req_times.append(time.monotonic())
        self._durations.append(seconds)

    @staticmethod
    def _rate(times: collections.deque[float], window: float) -> float:
        now = time.monotonic()
        return round(sum(1 for t in times if now - t <= window) / window, 4)

    def _percentiles(self) -> dict[str, float]:
        data = sorted(self._durations)
        out = {}
        for p in (50, 90, 95, 99):
            # Nanoseconds, as ngrok (Go time.Duration) reports them.
            out[f"p{p}"] = float(int(data[min(len(data) - 1, len(data) * p // 100)] * 1e9)) if data else 0.0
        return out

    def as_json(self) -> dict[str, Any]:
        rates_c = {f"rate{m}": self._rate(self._conn_times, m * 60.0) for m in (1, 5, 15)}
        rates_h = {f"rate{m}": self._rate(self._req_times, m * 60.0) for m in (1, 5, 15)}
        pct = self._percentiles()
        return {
            "conns": {"count": self.conns_count, "gauge": self.conns_gauge, **rates_c, **pct},
            "http": {"count": self.http_count, **rates_h, **pct},
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

    def __attrs_post_init__(self) -> None:
        for tc in self.tunnel_configs:
            tunnel_type = self.registry[tc.proto]
            upstream = tunnel_type.parse_addr(tc.addr)
            for req in tunnel_type.agent_binds(tc):
                self.tunnels.append(AgentTunnel(req.name, tc, tunnel_type, req.bind, upstream,
                                                proto=req.bind.proto))

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
            except* TunnelRejected as group:
                # Fatal when starting: the user asked for something this edge refuses.  Later
                # (e.g. a held name given away after a long outage) keep trying: it may free up.
                if first:
                    raise
                reason = "; ".join(str(e) for e in group.exceptions)
                log.error("%s", reason)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                     RemoteProtocolError, trio.EndOfChannel, HandshakeError, ConnectionClosed) as group:
                if first and not self.online.is_set() and not _transient(group):
                    raise
                reason = "; ".join(str(e) or type(e).__name__ for e in group.exceptions)
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
            log.warning("session with %s ended (%s); reconnecting in %.1fs", self.config.server_addr,
                        reason, delay)
            await trio.sleep(delay)

    async def _connection(self, *,
                          task_status: trio.TaskStatus[AgentInfo] = trio.TASK_STATUS_IGNORED) -> None:
        root = self.config.root_cas
        ctx = client_context(None if root in ("", "host", "trusted") else _path(root))
        async with trio.open_nursery() as nursery:
            if is_websocket_url(self.config.server_addr):
                carrier: trio.abc.Stream = await connect_websocket(nursery, self.config.server_addr, ctx)
            else:
                host, port = split_host_port(self.config.server_addr, default_port=443)
                carrier = await open_tls_client(host.strip("[]"), port, ctx)
            mux = self._mux = MuxSession(carrier, client=True)
            await nursery.start(mux.run)
            nursery.start_soon(self._heartbeat, mux)
            await self._auth(mux)
            for tunnel in self.tunnels:
                await self._bind(mux, tunnel)
            self.status = "online"
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
            update_unsupported_error="tunneld agents do not update themselves",
            stop_unsupported_error="remote stop is not enabled",
            restart_unsupported_error="remote restart is not enabled",
            tunneld_window=WANT_WINDOW,
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
            elif stype in (proto.StreamType.STOP, proto.StreamType.RESTART, proto.StreamType.UPDATE):
                await read_message(stream, proto.CommandResp)
                await reply(stream, proto.CommandResp(error="not supported by this agent"))
            else:
                stream.reset(proto.ErrorCode.PROTOCOL)
        except (RemoteProtocolError, trio.TooSlowError) as exc:
            log.warning("bad stream from the edge: %s", exc)
            stream.reset(proto.ErrorCode.PROTOCOL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            stream.reset()
        finally:
            await stream.aclose()

    async def _proxy(self, stream: MuxStream, header: proto.ProxyHeader, leftover: bytes) -> None:
        tunnel = self._by_id.get(header.id)
        if tunnel is None:
            log.warning("proxy stream for unknown tunnel %s", header.id)
            stream.reset(proto.ErrorCode.STREAM_REFUSED)
            return
        record = tunnel.metrics.conn_opened(header.client_addr)
        log.debug("tunnel %s: connection from %s", tunnel.name, header.client_addr)
        try:
            await tunnel.type.agent_handle(tunnel.context, PrefixedStream(stream, leftover), header)
        finally:
            tunnel.metrics.conn_closed(record)


def _transient(group: BaseExceptionGroup[Any]) -> bool:
    """Connection refused and friends on the very first attempt are worth retrying."""
    return all(isinstance(e, (OSError, trio.BrokenResourceError, trio.TooSlowError, HandshakeError))
               for e in group.exceptions)


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
    set_nodelay(upstream)
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
        await trio.aclose_forcefully(upstream)
