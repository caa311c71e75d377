"""Agent side of labeled tunnels: the edge's kind of edge decides what a proxied stream carries.

An https edge sends HTTP requests (``ProxyHeader.Proto`` ``https`` or ``http``): they are relayed
as an HTTP tunnel's are (the http plugin's handler, through the registry).  A tcp or tls edge
sends raw bytes (the client's TLS unterminated for tls): they go to the upstream byte for byte.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import trio

from tunneld.plugin import (
    AgentTunnelContext,
    TunnelTypeRegistry,
    close_forcefully,
    connect_tcp,
    forward,
    lean,
    proto,
)

log = logging.getLogger("tunneld.labeled")

#: Seconds the agent gives its upstream to accept a raw (tcp/tls) connection.
CONNECT_TIMEOUT = 10.0
#: Public protocols whose streams carry HTTP/1.x requests.
HTTP_PROTOS = frozenset({"http", "https"})


def parse_labeled_addr(addr: str) -> str:
    """``8080`` → ``http://localhost:8080``; ``host:port`` → ``http://host:port``; URLs kept."""
    addr = addr.strip()
    if not addr:
        raise ValueError("empty forwarding address")
    if "://" in addr:
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported forwarding address {addr!r} "
                             "(use PORT, HOST:PORT or an http(s):// URL)")
        return addr.rstrip("/")
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "localhost", addr
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {addr!r}")
    return f"{'https' if port == '443' else 'http'}://{host or 'localhost'}:{port}"


async def serve_labeled_stream(registry: TunnelTypeRegistry | None, tunnel: AgentTunnelContext,
                               stream: trio.abc.HalfCloseableStream, header: proto.ProxyHeader) -> None:
    """Serve one proxied stream of a labeled tunnel; the caller closes ``stream``."""
    if header.proto in HTTP_PROTOS:
        if registry is None or "http" not in registry:
            log.warning("tunnel %s: an HTTP stream, but no http tunnel type to relay it", tunnel.name)
            _reset(stream)
            return
        await registry["http"].agent_handle(tunnel, stream, header)
        return
    await _forward_raw(tunnel, stream, header)


async def _forward_raw(tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                       header: proto.ProxyHeader) -> None:
    parts = urlsplit(tunnel.upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        log.warning("tunnel %s: cannot relay %s connections to %s", tunnel.name, header.proto,
                    tunnel.upstream)
        _reset(stream)
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    log.info("tunnel %s: connection from %s", tunnel.name, header.client_addr,
             extra={"event": "join connections", "fields": {"obj": "join", "name": tunnel.name,
                                                            "l": tunnel.upstream, "r": header.client_addr}})
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            upstream = await connect_tcp(parts.hostname, port)
    except (OSError, trio.TooSlowError) as exc:
        log.warning("tunnel %s: cannot reach %s: %s", tunnel.name, tunnel.upstream, exc)
        _reset(stream)
        return
    try:
        await forward(stream, lean(upstream))
    finally:
        await close_forcefully(upstream)


def _reset(stream: trio.abc.HalfCloseableStream) -> None:
    reset = getattr(stream, "reset", None)
    if reset is not None:
        reset()
