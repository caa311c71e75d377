"""Edge side of labeled tunnels: tunnel groups, and the edges (from the store) that route to them.

Theory of operation
-------------------
A labeled tunnel (``StartTunnelWithLabel``) claims no public name: it joins the
:class:`LabeledRouter` of its edge as a :class:`Member` (its session, tunnel id, labels and
account) for as long as it runs.  The router's service (:class:`LabeledService`) reads the
store's edges at start and every :data:`REFRESH_INTERVAL` seconds, and keeps one
:class:`TunnelGroup` per edge: the members of the edge's account whose labels include all of
its selector labels.  Each edge claims its public name with holders the ingresses already know
how to use:

* https: :class:`GroupRoute` on the ``https`` and ``http`` routes of its hostname.  The HTTP
  ingress looks it up per request and calls ``open_stream``; ``per_request`` makes it open a
  stream for every request, so requests (not connections) are balanced;
* tls: :class:`GroupTlsRoute` on the ``tls`` route (the tls plugin's SNI front calls ``serve``);
* tcp: a listener of its own on the edge's TCP host, one member per connection.

Members are picked round-robin over the live ones; a member whose session is gone is skipped
(the next is tried), and one whose tunnel ends leaves every group at once.  An empty group
answers as an unreachable agent does (HTTP 502 ``ERR_TUNNELD_3210``; TCP/TLS: closed).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Mapping

import attrs
import trio

from tunneld.plugin import (
    ByteCounts,
    ClaimTunnel,
    Code,
    EdgeContext,
    SessionContext,
    TunnelInfo,
    TunnelRejected,
    aclose_at_once,
    close_forcefully,
    forward,
    lean,
    open_listeners,
    peer_addr,
    proto,
)

log = logging.getLogger("tunneld.labeled")

#: Seconds between two reads of the store's edges (cheap: one small SELECT).
REFRESH_INTERVAL = 2.0
#: A label's key and value (the ACL matcher's rule, ``tunneld.core._acl``).
_LABEL_PART = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")
#: Labels one tunnel may carry.
MAX_LABELS = 32
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels of a StartTunnelWithLabel, checked; TunnelRejected if none or malformed."""
    if not isinstance(labels, Mapping) or not labels:
        raise TunnelRejected("a labeled tunnel needs at least one label", Code.BIND_MALFORMED)
    if len(labels) > MAX_LABELS:
        raise TunnelRejected(f"a labeled tunnel may have at most {MAX_LABELS} labels", Code.BIND_MALFORMED)
    for key, value in labels.items():
        if not (isinstance(key, str) and isinstance(value, str)
                and _LABEL_PART.fullmatch(key) and _LABEL_PART.fullmatch(value)):
            raise TunnelRejected(f"label {key!r}={value!r}: keys and values are 1-128 letters, digits "
                                 "or _ . - /", Code.BIND_MALFORMED)
    return dict(labels)


@attrs.define(eq=False)
class Member:
    """One running labeled tunnel."""

    session: SessionContext
    tunnel_id: str
    labels: dict[str, str]
    #: The account of the session's authtoken: edges route only to their own account's tunnels.
    account: str


@attrs.define(eq=False)
class TunnelGroup:
    """An edge's tunnel-group backend: the members selected by its labels, picked round-robin."""

    edge_id: str
    account: str
    labels: dict[str, str]
    members: list[Member] = attrs.field(factory=list)
    _turn: int = 0
    _left: trio.Event = attrs.field(factory=trio.Event)

    def remove(self, member: Member) -> None:
        if member in self.members:
            self.members.remove(member)
            self._left.set()

    async def wait_empty(self) -> None:
        while self.members:
            self._left = trio.Event()
            await self._left.wait()

    def selects(self, member: Member) -> bool:
        return member.account == self.account and all(
            member.labels.get(k) == v for k, v in self.labels.items())

    async def open(self, client_addr: str, proto_name: str, *, passthrough_tls: bool = False,
                   first: bytes = b"") -> trio.abc.HalfCloseableStream:
        """A proxy stream to the next live member; BrokenResourceError when none is online."""
        for _ in range(len(self.members)):
            if not self.members:
                break
            self._turn = (self._turn + 1) % len(self.members)
            member = self.members[self._turn]
            try:
                return await member.session.open_stream(member.tunnel_id, client_addr, proto_name,
                                                        passthrough_tls=passthrough_tls, first=first)
            except _STREAM_ERRORS:
                # Its session is ending (its tunnel leaves the group as it does): try the next.
                continue
        raise trio.BrokenResourceError(f"no tunnel of edge {self.edge_id} is online")


@attrs.define(eq=False)
class GroupRoute:
    """An https edge's hostname on the ``http`` or ``https`` route, as the HTTP ingress uses it."""

    group: TunnelGroup
    scheme: str
    #: For the access log: the edge's id.
    tunnel_id: str
    #: No basic auth on edges (the ingress checks this attribute).
    auth: None = None
    #: Open a stream per request (the ingress then balances requests, not connections).
    per_request: bool = True

    async def open_stream(self, client_addr: str, first: bytes = b"") -> trio.abc.HalfCloseableStream:
        return await self.group.open(client_addr, self.scheme, first=first)


@attrs.define(eq=False)
class GroupTlsRoute:
    """A tls edge's hostname on the ``tls`` route: the tls plugin's SNI front calls :meth:`serve`."""

    edge: EdgeContext
    group: TunnelGroup
    host: str
    url: str

    async def serve(self, public: trio.SocketStream, client_addr: str, peeked: bytes, started: float) -> None:
        counts = ByteCounts()
        result = "agent_unreachable"
        try:
            # The ClientHello rides in the stream's SYN frame, as for TLS tunnels.
            stream = await self.group.open(client_addr, "tls", passthrough_tls=True, first=peeked)
            try:
                counts.a_to_b = len(peeked)
                result = "ok"
                await forward(public, stream, counts)
            finally:
                await aclose_at_once(stream)
        except _STREAM_ERRORS:
            pass
        finally:
            self.edge.log_connection(client=client_addr, proto="tls", host=self.host,
                                     tunnel_id=self.group.edge_id, url=self.url, result=result,
                                     started=started, counts=counts)


@attrs.define(eq=False)
class EdgeRoute:
    """One edge of the store while it is routed: claims its name, serves until cancelled."""

    edge: EdgeContext
    group: TunnelGroup
    proto: str
    hostname: str
    addr: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _warned: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.proto, self.hostname, self.addr, self.group.account

    async def run(self) -> None:
        with self.scope:
            # A name taken by a tunnel (or a port in use) may free up: try again now and then.
            while not self.edge.stopping.is_set():
                try:
                    await self._serve()
                except (TunnelRejected, OSError) as exc:
                    if str(exc) != self._warned:
                        self._warned = str(exc)
                        log.warning("edge %s (%s) is not routed: %s", self.group.edge_id,
                                    self.hostname or self.addr, exc)
                    with trio.move_on_after(REFRESH_INTERVAL):
                        await self.edge.stopping.wait()

    async def _serve(self) -> None:
        if self.proto == "tcp":
            await self._serve_tcp()
            return
        host = self.hostname
        # The name must be the account's: under the edge's domain, or reserved by the account.
        if host != self.edge.domain and not host.endswith("." + self.edge.domain):
            reservation = await trio.to_thread.run_sync(self.edge.store.domain_reservation, host)
            if reservation is None or reservation.account_id != self.group.account:
                raise TunnelRejected(f"{host} is neither under {self.edge.domain} nor reserved by the "
                                     "edge's account", Code.DOMAIN_RESERVED)
            if self.proto == "https":
                await trio.to_thread.run_sync(self.edge.ensure_certificate, host)
        claimed: list[tuple[str, object]] = []
        if self.proto == "https":
            for scheme in ("https", "http"):
                if self.edge.listen_addr(scheme) is not None:
                    claimed.append((scheme, GroupRoute(self.group, scheme, self.group.edge_id)))
        else:
            port = self.edge.ports.get("https", 443)
            url = f"tls://{host}" if port == 443 else f"tls://{host}:{port}"
            claimed.append(("tls", GroupTlsRoute(self.edge, self.group, host, url)))
        done: list[tuple[str, object]] = []
        try:
            for route, holder in claimed:
                self.edge.claim_host(route, host, holder, "")
                done.append((route, holder))
            self._routed()
            await self.edge.stopping.wait()
            # Shutting down: keep routing while agents drain (their tunnels leave as they go).
            await self.group.wait_empty()
        finally:
            for route, holder in done:
                self.edge.release_host(route, host, holder)

    async def _serve_tcp(self) -> None:
        span = self.edge.port_range("tcp")
        if span is None:
            raise TunnelRejected("this edge has no TCP ports", Code.PROTO_UNSUPPORTED)
        tcp_host, low, high = span
        port = int(self.addr.rsplit(":", 1)[1])
        if not low <= port <= high:
            raise TunnelRejected(f"port {port} is outside this edge's range {low}-{high}",
                                 Code.ADDRESS_NOT_ALLOWED)
        reservation = await trio.to_thread.run_sync(self.edge.store.addr_reservation, self.addr)
        if reservation is not None and reservation.account_id != self.group.account:
            raise TunnelRejected(f"{self.addr} is reserved by another account", Code.ADDR_RESERVED)
        if self.edge.lookup_address("tcp", port) is not None:
            raise TunnelRejected(f"port {port} is in use by a tunnel", Code.ADDRESS_IN_USE)
        listeners = await open_listeners(tcp_host, port)
        try:
            self.edge.claim_address("tcp", port, self, "")
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        self.edge.count_listener_fds(len(listeners))
        try:
            self._routed()
            await self.edge.serve_public(self._handle_tcp, listeners)
        finally:
            self.edge.count_listener_fds(-len(listeners))
            self.edge.release_address("tcp", port, self)

    def _routed(self) -> None:
        self._warned = ""
        log.info("edge %s routes %s://%s to labels %s", self.group.edge_id, self.proto,
                 self.hostname or self.addr, ",".join(f"{k}={v}" for k, v in self.group.labels.items()))

    async def _handle_tcp(self, public: trio.SocketStream) -> None:
        started = time.monotonic()
        client = peer_addr(public)
        counts = ByteCounts()
        result = "agent_unreachable"
        try:
            try:
                stream = await self.group.open(client, "tcp")
            except _STREAM_ERRORS:
                return  # no member online: the connection is closed
            try:
                result = "ok"
                await forward(lean(public), stream, counts)
            finally:
                await aclose_at_once(stream)
        finally:
            await close_forcefully(public)
            self.edge.log_connection(client=client, proto="tcp", tunnel_id=self.group.edge_id,
                                     url=f"tcp://{self.addr}", result=result, started=started, counts=counts)


@attrs.define(eq=False)
class LabeledRouter:
    """The labeled tunnels of one edge and the groups of its edges."""

    edge: EdgeContext
    members: list[Member] = attrs.field(factory=list)
    routes: dict[str, EdgeRoute] = attrs.field(factory=dict)
    _accounts: dict[str, str] = attrs.field(factory=dict)

    def join(self, member: Member) -> None:
        self.members.append(member)
        for route in self.routes.values():
            if route.group.selects(member):
                route.group.members.append(member)

    def leave(self, member: Member) -> None:
        if member in self.members:
            self.members.remove(member)
        for route in self.routes.values():
            route.group.remove(member)

    async def account_of(self, owner: str) -> str:
        """The account of authtoken ``owner`` (cached: a token never changes account)."""
        account = self._accounts.get(owner)
        if account is None:
            tokens = await trio.to_thread.run_sync(self.edge.store.list_tokens)
            account = next((t.account_id for t in tokens if t.id == owner), "")
            self._accounts[owner] = account
        return account

    def group(self, edge_id: str) -> TunnelGroup | None:
        """The group of edge ``edge_id`` while it is routed (for tests and the admin API)."""
        route = self.routes.get(edge_id)
        return None if route is None else route.group

    async def refresh(self, nursery: trio.Nursery) -> None:
        """Bring the routed edges in line with the store's."""
        records = {r.id: r for r in await trio.to_thread.run_sync(self.edge.store.all_edges)}
        for edge_id, old in list(self.routes.items()):
            record = records.get(edge_id)
            if record is None or (record.proto, record.hostname, record.addr, record.account_id) != old.key:
                old.scope.cancel()
                del self.routes[edge_id]
        for edge_id, record in records.items():
            route = self.routes.get(edge_id)
            labels = dict(record.labels)
            if route is None:
                group = TunnelGroup(edge_id, record.account_id, labels)
                route = EdgeRoute(self.edge, group, record.proto, record.hostname, record.addr)
                self.routes[edge_id] = route
                nursery.start_soon(route.run)
            elif route.group.labels == labels:
                continue
            route.group.labels = labels
            route.group.members = [m for m in self.members if route.group.selects(m)]


#: The router of each running edge (EdgeContext objects have no weak references).
_ROUTERS: dict[int, LabeledRouter] = {}


def router_for(edge: EdgeContext) -> LabeledRouter:
    router = _ROUTERS.get(id(edge))
    if router is None or router.edge is not edge:
        router = _ROUTERS[id(edge)] = LabeledRouter(edge)
    return router


@attrs.define(eq=False)
class LabeledService:
    """Keeps the edge's routed edges in line with the store (``tunneld_edge_services``)."""

    edge: EdgeContext

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        router = router_for(self.edge)
        try:
            async with trio.open_nursery() as nursery:
                await router.refresh(nursery)
                task_status.started()
                while not self.edge.stopping.is_set():
                    with trio.move_on_after(REFRESH_INTERVAL):
                        await self.edge.stopping.wait()
                    if not self.edge.stopping.is_set():
                        try:
                            await router.refresh(nursery)
                        except sqlite3.Error as exc:
                            log.error("cannot read the edges from the store: %s", exc)
                # Stopping: each route ends once its listeners (tcp) or its members (https, tls) are gone.
        finally:
            if _ROUTERS.get(id(self.edge)) is router:
                del _ROUTERS[id(self.edge)]


@attrs.define(eq=False)
class LabeledEdgeTunnel(ClaimTunnel):
    """One labeled tunnel: a member of every group whose edge selects its labels, while it runs."""

    router: LabeledRouter
    session: SessionContext
    tunnel_id: str
    labels: dict[str, str]

    _member: Member | None = None

    async def claim(self) -> TunnelInfo:
        account = await self.router.account_of(self.session.owner)
        self._member = Member(self.session, self.tunnel_id, self.labels, account)
        self.router.join(self._member)
        text = ",".join(f"{k}={v}" for k, v in self.labels.items())
        return TunnelInfo(f"labels:{text}", "labeled")

    def release(self) -> None:
        if self._member is not None:
            self.router.leave(self._member)
            self._member = None


class LabeledTunnelsServer:
    """Serves labeled tunnels (the registry's ``add_labeled``): each joins its edge's router."""

    def edge_tunnel(self, edge: EdgeContext, session: SessionContext, request: proto.StartTunnelWithLabel,
                    tunnel_id: str) -> LabeledEdgeTunnel:
        labels = check_labels(request.labels)
        if request.forwards_proto not in ("", "http1"):
            raise TunnelRejected(f"ForwardsProto {request.forwards_proto!r} is not supported by this edge",
                                 Code.OPTION_UNSUPPORTED)
        return LabeledEdgeTunnel(router_for(edge), session, tunnel_id, labels)
