"""Agent side of HTTP tunnels: relay proxied requests to the upstream service."""

from __future__ import annotations

import logging
import ssl
import time
from urllib.parse import urlsplit

import attrs
import trio

from tunneld.http1 import (
    MAX_FORWARDED_HEAD,
    BadMessage,
    BodyKind,
    Outcome,
    Reader,
    RequestHead,
    ResponseFilter,
    ResponseHead,
    UpstreamFailed,
    abort,
    error_response,
    exchange,
    header_value,
    parse_request_head,
    rewrite_head,
    set_header,
    wants_json,
)
from tunneld.plugin import (
    ERROR_HEADER,
    AgentTunnelContext,
    Code,
    ExchangeRecorder,
    close_forcefully,
    connect_tcp,
    lean,
    proto,
)

from ._pool import closed_while_idle, give_idle, take_idle

log = logging.getLogger("tunneld.http")

_ERROR_HEADER = ERROR_HEADER.lower().encode()
#: How long to wait for the upstream's TCP (and TLS) handshake.
CONNECT_TIMEOUT = 10.0


def parse_http_addr(addr: str) -> str:
    """Normalise an HTTP forwarding address to a URL: ``8080`` → ``http://localhost:8080``.

    Port 443 implies HTTPS (as ngrok does); force plain HTTP with ``http://localhost:443``.
    """
    addr = addr.strip()
    if not addr:
        raise ValueError("empty forwarding address")
    if "://" in addr:
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {parts.scheme!r} in {addr!r} (use http:// or https://)")
        if not parts.hostname:
            raise ValueError(f"missing host in {addr!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{parts.scheme}://{host}:{port}"
    if addr.isdigit():
        host, port_s = "localhost", addr
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep or not port_s.isdigit():
            host, port_s = addr, "80"
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {addr!r}")
    scheme = "https" if port == 443 else "http"
    return f"{scheme}://{host}:{port}"


async def connect_upstream(url: str) -> trio.abc.Stream:
    """Open the upstream connection; HTTPS upstreams are not verified (local networks)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with trio.fail_after(CONNECT_TIMEOUT):
        stream: trio.abc.Stream = await connect_tcp(host, port)
        if parts.scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
            await tls.do_handshake()
            return tls
    return lean(stream)


def strip_error_header(resp: ResponseHead, raw: bytes) -> bytes:
    """Remove tunneld's error-code header from upstream responses: upstreams cannot forge it."""
    if resp.has(_ERROR_HEADER):
        return rewrite_head(raw, drop=frozenset({_ERROR_HEADER}))
    return raw


def upstream_authority(url: str) -> str:
    """``host[:port]`` of an upstream URL, the port left out when it is the scheme's default.

    This is the Host that ``--host-header=rewrite`` sends (``site.test:80`` → ``site.test``).
    """
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def host_header_for(tunnel: AgentTunnelContext) -> bytes | None:
    """The Host to send upstream for ``tunnel``'s ``--host-header``, None to pass it unchanged."""
    # Read from the options as set: other types relay HTTP too (labeled tunnels) without the key.
    value = tunnel.config.options.get("host_header", "")
    if not value:
        return None
    return (upstream_authority(tunnel.upstream) if value == "rewrite" else value).encode("ascii")


def location_rewriter(sent_host: bytes, req: RequestHead) -> ResponseFilter:
    """A response filter mapping redirects to the rewritten Host back to the public one.

    An application that saw ``Host: sent_host`` builds absolute redirects to it
    (``Location: http://localhost:8080/login``) which no public client can follow; they are
    pointed at the public scheme and host the edge reported in X-Forwarded-Proto/-Host.
    """
    proto = header_value(req.headers, b"x-forwarded-proto") or b"http"
    public_host = header_value(req.headers, b"x-forwarded-host") or req.host.encode("latin-1")
    public = proto + b"://" + public_host
    prefixes = (b"http://" + sent_host.lower(), b"https://" + sent_host.lower())

    def rewrite(resp: ResponseHead, raw: bytes) -> bytes:
        raw = strip_error_header(resp, raw)
        location = header_value(resp.headers, b"location")
        if location is None:
            return raw
        lower = location.lower()
        for prefix in prefixes:
            if lower.startswith(prefix) and lower[len(prefix):len(prefix) + 1] in (b"", b"/", b"?", b"#"):
                return set_header(raw, b"Location", public + location[len(prefix):])
        return raw

    return rewrite


#: Requests replayed on a new connection when a reused one closes unanswered (as Go's Transport).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


def _replayable(req: RequestHead, exc: UpstreamFailed) -> bool:
    """May a request that failed on a reused connection be sent again on a new one?"""
    return not exc.bad_response and req.body == BodyKind.NONE and req.method in _IDEMPOTENT


#: A kept-alive upstream connection idle for longer than this is probed before reuse.  Within
#: it, a close is rare and caught anyway (idempotent requests are replayed once).
PROBE_AFTER_IDLE = 1.0


class _Upstream:
    """A public connection's kept-alive connection to the upstream: taken from the idle pool or
    opened when first needed, reopened when it has gone stale, and parked in the pool again at
    the end when its last exchange left it clean (:attr:`reusable`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.reader: Reader | None = None
        self.last_used = 0.0
        #: The last exchange ended with the connection ready for another request.
        self.reusable = False
        #: The connection carried a connection-bound login (:func:`binds_connection`): it is
        #: never parked for another public connection.
        self.private = False

    async def get(self) -> tuple[Reader, bool]:
        """The connection to use and whether it is new (OSError & co. when unreachable)."""
        now = trio.current_time()
        idle, self.last_used = now - self.last_used, now
        self.reusable = False
        if self.reader is not None and (self.reader.buf or idle > PROBE_AFTER_IDLE) \
                and closed_while_idle(self.reader):
            # The upstream dropped the kept-alive connection (idle timeout): use a new one.
            await self.drop()
        if self.reader is None:
            self.reader = await take_idle(self.url)  # probed there
            if self.reader is not None:
                return self.reader, False
            self.reader = Reader(await connect_upstream(self.url))
            return self.reader, True
        return self.reader, False

    async def drop(self) -> None:
        self.reusable = self.private = False
        if self.reader is not None:
            await close_forcefully(self.reader.stream)
            self.reader = None

    async def release(self) -> None:
        """The public connection is over: park the connection if it is clean, else close it."""
        reader = self.reader
        if reader is not None and self.reusable and not self.private and give_idle(self.url, reader):
            self.reader = None
        await self.drop()


async def _relay_request(tunnel: AgentTunnelContext, client: Reader, upstream: _Upstream, req: RequestHead,
                         raw: bytes, response_filter: ResponseFilter = strip_error_header,
                         recorder: ExchangeRecorder | None = None, close_stripped: bool = False) -> Outcome:
    """One request/response through the upstream; answers 502 itself when that fails.

    ``recorder`` (the inspector's) sees the exchange, the 502 pages included.
    ``close_stripped``: the client's ``Connection: close`` was kept from the upstream, so the
    upstream connection may outlive this exchange when the response allows it; the exchange is
    then relayed as a keep-alive one (its outcome says whether the upstream connection is
    clean), and this public connection still ends after it.
    """
    upstream_req = attrs.evolve(req, keep_alive=True) if close_stripped else req
    head_only = req.method == b"HEAD"

    async def answer(page: bytes) -> None:
        if recorder is not None:
            recorder.response_head(page)
        await client.send_all(page)

    for attempt in (1, 2):
        try:
            reader, fresh = await upstream.get()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            log.warning("tunnel %s: cannot reach %s: %s", tunnel.name, tunnel.upstream, reason)
            await answer(error_response(
                502, Code.UPSTREAM_UNREACHABLE, f"tunneld agent could not reach {tunnel.upstream}: {reason}",
                json_body=wants_json(req.headers), head_only=head_only))
            return Outcome.CLOSE
        try:
            outcome, resp = await exchange(client, reader, upstream_req, raw, response_filter, tap=recorder)
        except UpstreamFailed as exc:
            await upstream.drop()
            if attempt == 1 and not fresh and _replayable(req, exc):
                continue  # a reused connection closed under us before answering: retry once
            code = Code.BAD_UPSTREAM_RESPONSE if exc.bad_response else Code.UPSTREAM_UNREACHABLE
            await answer(error_response(502, code, f"upstream {tunnel.upstream}: {exc}", head_only=head_only))
            return Outcome.CLOSE
        except BadMessage:
            # The request body from the edge was malformed or cut short: the upstream got part
            # of a request, so its connection is reset, and the caller answers 400.
            abort(reader)
            await upstream.drop()
            raise
        except BaseException:
            # Cancelled (the agent is going away; often inside an exception group) or failed
            # mid-exchange: a half-relayed response must not end cleanly.
            abort(client)
            abort(reader)
            raise
        if outcome is Outcome.ABORT:
            # The response broke after it began (the upstream reset, or the edge went away):
            # pass the failure on both ways rather than ending either stream cleanly.
            abort(client)
            abort(reader)
            await upstream.drop()
            return outcome
        if binds_connection(req, resp):
            upstream.private = True
        if outcome is Outcome.KEEP:
            upstream.reusable = True
            if close_stripped:
                return Outcome.CLOSE
        return outcome
    raise AssertionError("unreachable: the second attempt always returns")


_CONNECTION = frozenset({b"connection"})
#: Authentication schemes that log in a connection rather than a request (RFC 4559, MS-NTHT).
_CONNECTION_LOGINS = (b"ntlm", b"negotiate")


def binds_connection(req: RequestHead, resp: ResponseHead | None) -> bool:
    """Whether the exchange began a login the upstream ties to its connection (NTLM, Kerberos).

    Such a connection stays with its public connection: parked and handed to another client,
    it would hand over the login.  (Go's ``ReverseProxy`` pools it anyway.)
    """
    if req.has(b"authorization") and any(value.lower().startswith(_CONNECTION_LOGINS)
                                         for value in req.values(b"authorization")):
        return True
    return resp is not None and resp.status == 401 and any(
        scheme in value.lower() for value in resp.values(b"www-authenticate")
        for scheme in _CONNECTION_LOGINS)


def _only_close(req: RequestHead) -> bool:
    """An HTTP/1.1 request whose only connection option is ``close``.

    Its ``Connection: close`` concerns the public connection, which the edge closes after the
    response anyway; kept from the upstream, it no longer costs the upstream connection, which
    the next public connection can then reuse (see ``_pool``).  Webhook senders often send it
    (Ruby's Net::HTTP does by default).
    """
    if req.keep_alive or req.version != "1.1":
        return False
    values = req.values(b"connection")
    return len(values) == 1 and values[0].lower() == b"close"


def _closing(response_filter: ResponseFilter) -> ResponseFilter:
    """``response_filter``, then ``Connection: close`` on the final response, as the client asked."""
    def close(resp: ResponseHead, raw: bytes) -> bytes:
        raw = response_filter(resp, raw)
        return raw if resp.interim else set_header(raw, b"Connection", b"close")
    return close


async def serve_http_stream(tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                            header: proto.ProxyHeader) -> None:
    """Relay the requests of one proxied public connection to the upstream."""
    client = Reader(stream)
    upstream = _Upstream(tunnel.upstream)
    # --host-header is the agent's job (as in ngrok's v2 agent): it concerns the upstream only.
    host = host_header_for(tunnel)
    try:
        while True:
            raw = await client.read_head(MAX_FORWARDED_HEAD)
            if raw is None:
                return
            started = time.monotonic()
            try:
                req = parse_request_head(raw)
            except BadMessage as exc:
                await client.send_all(error_response(exc.status, Code.BAD_REQUEST, str(exc)))
                return
            # The inspector records the request as the public client sent it (before --host-header).
            recorder = tunnel.record_http(header, raw)
            response_filter: ResponseFilter = strip_error_header
            if host is not None:
                raw = set_header(raw, b"Host", host)
                response_filter = location_rewriter(host, req)
            close_stripped = _only_close(req)
            if close_stripped:
                raw = rewrite_head(raw, drop=_CONNECTION)
                response_filter = _closing(response_filter)
            try:
                outcome = await _relay_request(tunnel, client, upstream, req, raw, response_filter, recorder,
                                               close_stripped)
            finally:
                tunnel.request_done(time.monotonic() - started)
                if recorder is not None:
                    recorder.finish()
            if outcome is not Outcome.KEEP:
                return
    except BadMessage as exc:
        code = Code.HEADERS_TOO_LARGE if exc.status == 431 else Code.BAD_REQUEST
        await client.send_all(error_response(exc.status, code, str(exc)))
    finally:
        await upstream.release()
