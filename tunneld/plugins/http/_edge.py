"""Edge side of HTTP tunnels: the public HTTP/HTTPS listeners and Host routing."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import attrs
import trio

from tunneld.http1 import (
    HEAD_READ,
    BadMessage,
    HeadBudget,
    Outcome,
    Progress,
    Reader,
    RequestHead,
    UpstreamFailed,
    abort,
    error_response,
    exchange,
    parse_request_head,
    rewrite_head,
    set_header,
    wants_json,
)
from tunneld.plugin import (
    ClaimTunnel,
    Code,
    EdgeContext,
    PrefixedStream,
    SessionContext,
    TunnelInfo,
    TunnelRejected,
    aclose_at_once,
    lean,
    peer_addr,
)
from tunneld.tlsutil import accept_tls

from ._auth import BasicAuth, challenge_headers
from ._timers import CoarseTimers

log = logging.getLogger("tunneld.http")

#: A request head must be complete this many seconds after its first byte (slowloris).
HEAD_TIMEOUT = 10.0
#: Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 300.0
#: An upgraded connection (WebSocket) is closed after this many seconds without a byte either
#: way.  Long on purpose: apps keep sockets open for minutes between messages; the limit only
#: reaps connections whose peer vanished without a FIN.
UPGRADED_IDLE_TIMEOUT = 3600.0
#: TLS handshake budget for public HTTPS clients.
TLS_TIMEOUT = 10.0
#: Bytes of unfinished request heads all public connections of this process may hold at once
#: (besides MAX_HEAD, 1 MiB, per connection); a partial head that would take the total past
#: it is answered 503 and its connection closed.  Set ``HEADS.limit`` to change it.
MAX_HEADS_TOTAL = 64 * 1024 * 1024
HEADS = HeadBudget(MAX_HEADS_TOTAL)

# serve_connection's phases: what its timer is bounding.
_IDLE, _HEAD, _EXCHANGE = range(3)

#: Bind options whose meaning is carried out by the agent, or by the naming code below.
#: ``Auth``/``BasicAuth`` are enforced by :class:`HttpIngress` (see ``_auth``).
HANDLED_OPTS = {"hostname", "subdomain", "domain", "url", "hostheaderrewrite", "localurlscheme", "auth",
                "basicauth"}
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def refuse_sdk_host_rewrite(session: SessionContext, opts: dict[str, Any]) -> None:
    """Refuse ``HostHeaderRewrite`` from an SDK client: the edge cannot carry it out.

    ngrok's v2 agent (and ours) rewrites Host itself and sends the option for information only;
    the SDKs (``ClientType: ngrok-*``) forward bytes unchanged and expect the edge to do it,
    which needs the upstream address only the client knows.
    """
    if not session.client_type.startswith("ngrok-"):
        return
    if any(key.lower() == "hostheaderrewrite" and value for key, value in opts.items()):
        raise TunnelRejected("HostHeaderRewrite is not supported by this edge for SDK clients; "
                             "refusing rather than ignoring it", Code.OPTION_UNSUPPORTED)


@attrs.define(eq=False)
class HttpEdgeTunnel(ClaimTunnel):
    """A hostname route on the public HTTP or HTTPS listener."""

    edge: EdgeContext
    session: SessionContext
    tunnel_id: str
    scheme: str
    host: str
    #: Credentials every request must carry (None: the tunnel is public).
    auth: BasicAuth | None = None

    async def claim(self) -> TunnelInfo:
        if self.scheme not in self.edge.ports:
            raise TunnelRejected(f"this edge has no public {self.scheme} listener", Code.PROTO_UNSUPPORTED)
        domain = self.edge.domain
        label = self.host[: -len(domain) - 1] if self.host.endswith("." + domain) else "."
        if self.scheme == "https" and "." in label:
            # A custom hostname, or one nested below the edge's domain (a reserved
            # ``*.team.DOMAIN``), is not covered by the edge's ``*.DOMAIN`` certificate.
            await trio.to_thread.run_sync(self.edge.ensure_certificate, self.host)
        self.edge.claim_host(self.scheme, self.host, self, self.session.owner)
        return TunnelInfo(self.edge.public_url(self.scheme, self.host), self.scheme, ("host", self.host))

    def release(self) -> None:
        self.edge.release_host(self.scheme, self.host, self)

    async def open_stream(self, client_addr: str, first: bytes = b"") -> trio.abc.HalfCloseableStream:
        return await self.session.open_stream(self.tunnel_id, client_addr, self.scheme, first=first)


def forwarded_head(raw: bytes, req: RequestHead, client_ip: str, scheme: str) -> bytes:
    """The request head with X-Forwarded-For/-Proto/-Host set by the edge.

    An absolute-form target's authority is what the edge routed by (RFC 9112 §3.2.2), so the
    upstream gets it as Host too, whatever Host line the client sent beside it.
    """
    if req.target[:1] != b"/" and req.target[:4].lower() == b"http":
        raw = set_header(raw, b"Host", req.host.encode("latin-1"))
    # The common case: the client sent none of them, so the lines go in before the blank line.
    if b"\r\nx-forwarded-" not in req.lower:
        return b"%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n" % (
            raw[:-2], client_ip.encode("latin-1"), scheme.encode(), req.host.encode("latin-1"))
    prior = [v.decode("latin-1") for v in req.values(b"x-forwarded-for")]
    xff = ", ".join([*prior, client_ip])
    return rewrite_head(raw, drop=_FORWARDED, add=[
        (b"X-Forwarded-For", xff.encode("latin-1")),
        (b"X-Forwarded-Proto", scheme.encode()),
        (b"X-Forwarded-Host", req.host.encode("latin-1")),
    ])


def normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


@attrs.define(eq=False)
class HttpIngress:
    """The edge's public HTTP and HTTPS listeners."""

    edge: EdgeContext
    #: The idle and head timeouts of every public connection (see ``_timers``).
    timers: CoarseTimers = attrs.field(factory=CoarseTimers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        edge = self.edge
        http_addr, https_addr = edge.listen_addr("http"), edge.listen_addr("https")
        async with trio.open_nursery() as timing:
            await timing.start(self.timers.run)
            async with trio.open_nursery() as nursery:
                if http_addr is not None:
                    listeners = await self.edge.open_public_listeners("http", "--http-addr", http_addr)
                    await nursery.start(self.edge.serve_public, self._serve_http, listeners)
                if https_addr is not None:
                    listeners = await self.edge.open_public_listeners("https", "--https-addr", https_addr)
                    await nursery.start(self.edge.serve_public, self._serve_https, listeners)
                task_status.started()
            # The listeners have stopped and their connections are done: so are the timers.
            timing.cancel_scope.cancel()

    async def _serve_http(self, stream: trio.SocketStream) -> None:
        await self.serve_connection(lean(stream), "http", peer_addr(stream))

    async def _serve_https(self, stream: trio.SocketStream) -> None:
        addr = peer_addr(stream)
        # A TLS front (the tls plugin) may take the connection first: SNI-routed passthrough.
        transport = await self.edge.route_tls(stream, addr)
        if transport is None:
            return
        # The front peeked at the ClientHello: those bytes go to the engine directly, and TLS
        # runs on the lean socket (reads decrypted in place, fewer scheduler trips).
        peeked = b""
        if type(transport) is PrefixedStream and transport.transport_stream is stream:
            peeked, transport = transport.prefix, stream
        try:
            tls = await accept_tls(lean(transport), self.edge.ssl_context, timeout=TLS_TIMEOUT,
                                   initial_data=peeked)
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.debug("TLS handshake with %s failed: %s", addr, exc)
            return
        try:
            await self.serve_connection(tls, "https", addr)
        finally:
            await trio.aclose_forcefully(tls)

    async def serve_connection(self, stream: trio.abc.Stream, scheme: str, client_addr: str) -> None:
        """Serve one public connection: each request is routed by its own Host."""
        client = Reader(stream, HEADS)
        client_ip = client_addr.rsplit(":", 1)[0].strip("[]")
        current: HttpEdgeTunnel | None = None
        upstream: Reader | None = None
        # One timer for the connection's life, its deadline moved as it goes: the idle wait
        # between requests, then the head's budget, then the request body's (moved by every
        # read, see _relay.copy_body), then none while the response is relayed.
        # (A cancel scope per request and phase cost about a tenth of the edge's CPU.)
        timer = trio.CancelScope()
        # The idle and head deadlines are kept by the ingress's coarse timers (when running:
        # always, but in tests that drive this method alone); the request body's by ``timer``.
        timers = self.timers if self.timers.running else None
        phase = _HEAD
        idle_armed = False
        progress = Progress()
        aborted = False
        try:
            with timer:
                while True:
                    # Stray CRLFs between requests leave the connection idle: they neither
                    # start the head timeout nor put off the idle one (a trickle of CRLFs
                    # would otherwise hold the connection forever).
                    client.skip_blank_lines()
                    if not client.buf:
                        if not idle_armed:
                            idle_armed = True
                            phase = _IDLE
                            if timers is not None:
                                timers.arm(timer, trio.current_time() + IDLE_TIMEOUT)
                            else:
                                timer.deadline = trio.current_time() + IDLE_TIMEOUT
                        data = await client.stream.receive_some(HEAD_READ)
                        if not data:
                            return
                        client.buf += data
                        if client.buf.startswith(b"\r\n"):
                            continue
                    started = time.monotonic()
                    idle_armed = False
                    if not client.head_buffered():
                        if timers is not None:
                            timers.arm(timer, trio.current_time() + HEAD_TIMEOUT)
                        else:
                            timer.deadline = trio.current_time() + HEAD_TIMEOUT
                        phase = _HEAD
                    try:
                        raw = await client.read_head()
                        phase = _EXCHANGE
                        if timers is not None:
                            timers.disarm(timer)
                        else:
                            timer.deadline = math.inf
                        if raw is None:
                            return
                        req = parse_request_head(raw)
                    except BadMessage as exc:
                        if timers is not None:
                            timers.disarm(timer)
                        timer.deadline = math.inf
                        await _send_bad_message(client, exc)
                        return
                    if req.method == b"CONNECT":
                        await _send_error(client, 405, Code.METHOD_NOT_ALLOWED,
                                          "CONNECT is not allowed: this is not an open proxy", req=req)
                        return
                    host = normalise_host(req.host)
                    tunnel = self.edge.lookup_host(scheme, host)
                    if tunnel is None:
                        await _send_error(client, 404, Code.TUNNEL_NOT_FOUND,
                                          f"Tunnel {host or '(no Host header)'} not found", req=req)
                        self._access(client_addr, host, req, 404, started)
                        return
                    # Every request is checked, not only a connection's first: keep-alive
                    # connections are routed (and may change tunnel) request by request.
                    auth: BasicAuth | None = getattr(tunnel, "auth", None)
                    if auth is not None and not auth.check(req.headers):
                        await _send_error(client, 401, Code.UNAUTHORIZED, "this tunnel requires a user name "
                                          "and password", req=req, extra_headers=challenge_headers())
                        self._access(client_addr, host, req, 401, started, tunnel)
                        return
                    head = forwarded_head(raw, req, client_ip, scheme)
                    # A holder with ``per_request`` (a labeled edge's tunnel group) picks an agent for
                    # every request: a stream per request, not one per connection.
                    if (upstream is None or tunnel is not current or _ended(upstream)
                            or getattr(tunnel, "per_request", False)):
                        if upstream is not None:
                            await upstream.aclose()
                            upstream = None
                        try:
                            # The request head rides in the stream's SYN frame.
                            upstream = Reader(await tunnel.open_stream(client_addr, head))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            await _send_error(client, 502, Code.AGENT_UNREACHABLE,
                                              f"the agent serving {host} is not reachable", req=req)
                            return
                        current = tunnel
                        head = b""
                    try:
                        outcome, resp = await exchange(client, upstream, req, head,
                                                       upgraded_idle_timeout=UPGRADED_IDLE_TIMEOUT,
                                                       body_timer=timer, progress=progress)
                    except UpstreamFailed as exc:
                        if exc.bad_response:
                            await _send_error(client, 502, Code.BAD_UPSTREAM_RESPONSE,
                                              f"the upstream sent a malformed response: {exc}", req=req)
                        else:
                            await _send_error(client, 502, Code.AGENT_UNREACHABLE,
                                              f"the tunnel for {host} failed: {exc}", req=req)
                        self._access(client_addr, host, req, 502, started, tunnel)
                        return
                    except BadMessage as exc:
                        # The client's own request body was malformed or cut short: its fault,
                        # not the agent's.  The agent's half-sent request is reset.
                        abort(upstream)
                        await _send_bad_message(client, exc, req)
                        self._access(client_addr, host, req, exc.status, started, tunnel)
                        return
                    self._access(client_addr, host, req, resp.status if resp else 0, started, tunnel)
                    if outcome is Outcome.ABORT:
                        aborted = True
                        return
                    if outcome is not Outcome.KEEP:
                        return
        except BaseException:
            # Cancelled from outside (edge shutdown past its grace period; often wrapped in an
            # exception group by the relay's nursery) or failed in mid-exchange: whatever
            # response was under way must not end as if it were complete.  (The timer's own
            # cancellation never gets here: ``with timer`` absorbs it.)
            aborted = phase == _EXCHANGE
            raise
        finally:
            if timers is not None:
                timers.forget(timer)
            # Nothing awaits before the aborts: in a cancelled scope the first await raises.
            if aborted:
                abort(client)
            client.release()
            if upstream is not None:
                if aborted or (timer.cancelled_caught and phase == _EXCHANGE):
                    # Nor may a request cut short reach the upstream as if it were whole.
                    abort(upstream)
                await aclose_at_once(upstream.stream)  # at once: the mux's streams never wait
        if timer.cancelled_caught:
            if phase == _HEAD:
                await _send_error(client, 408, Code.REQUEST_TIMEOUT, "the request head took too long")
            elif phase == _EXCHANGE:
                # Only the request body runs on the timer during an exchange.
                if progress.sent_any:
                    abort(client)
                else:
                    await _send_error(client, 408, Code.REQUEST_TIMEOUT, "the request body was too slow")

    def _access(self, client_addr: str, host: str, req: RequestHead, status: int, started: float,
                tunnel: HttpEdgeTunnel | None = None) -> None:
        # Always: the request counts in the edge's metrics, whether or not its line is written.
        self.edge.log_request(client=client_addr, host=host, tunnel_id=tunnel.tunnel_id if tunnel else "",
                              method=req.method.decode("latin-1"), path=req.target.decode("latin-1"),
                              status=status, started=started)


def _ended(upstream: Reader) -> bool:
    eof = getattr(upstream.stream, "eof_received", False)
    return bool(eof) and not upstream.buf


async def _send_bad_message(client: Reader, exc: BadMessage, req: RequestHead | None = None) -> None:
    if exc.status == 503:
        # The edge's head budget is spent (a flood of unfinished heads): not this client's fault.
        await _send_error(client, 503, Code.HEADERS_TOO_LARGE, str(exc), extra_headers=[("Retry-After", "5")])
        return
    code = Code.HEADERS_TOO_LARGE if exc.status == 431 else Code.BAD_REQUEST
    await _send_error(client, exc.status, code, str(exc), req=req)


async def _send_error(client: Reader, status: int, code: Code, message: str, *,
                      req: RequestHead | None = None,
                      extra_headers: list[tuple[str, str]] | None = None) -> None:
    data = error_response(status, code, message, json_body=req is not None and wants_json(req.headers),
                          head_only=req is not None and req.method == b"HEAD", extra_headers=extra_headers)
    try:
        with trio.move_on_after(5):
            await client.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
