"""Small socket and stream helpers shared by the edge and the agent."""

from __future__ import annotations

import gc
import socket
import time

import trio

#: A large accept backlog: 1000 simultaneous connects overflowed sshd's queue (perf notes).
LISTEN_BACKLOG = 4096


#: Seconds a name's last working address is reused before the name is resolved again.
RESOLVE_TTL = 30.0
_last_good: dict[tuple[str, int], tuple[str, float]] = {}


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """``trio.open_tcp_stream(host, port)``, reusing the address that last worked for a name.

    Resolving ``localhost`` costs a getaddrinfo call in a worker thread and, when the upstream
    listens on IPv4 only, a refused attempt on ``::1`` first: about 120 µs of every new
    proxied connection.  The address that answered is tried directly for RESOLVE_TTL
    seconds; if it fails the name is resolved again, so moved services are found.
    """
    key = (host, port)
    hit = _last_good.get(key)
    if hit is not None and time.monotonic() - hit[1] < RESOLVE_TTL:
        try:
            return await trio.open_tcp_stream(hit[0], port)
        except OSError:
            _last_good.pop(key, None)
    stream = await trio.open_tcp_stream(host, port)
    try:
        address = stream.socket.getpeername()[0]
    except OSError:
        return stream
    if address != host:
        _last_good[key] = (address, time.monotonic())
    return stream


def set_nodelay(stream: trio.abc.Stream) -> None:
    """TCP_NODELAY on a socket stream: Nagle against delayed ACK costs 40 ms per exchange."""
    sock = getattr(stream, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def peer_addr(stream: trio.abc.Stream) -> str:
    """``host:port`` of the remote end of a socket stream (through TLS wrappers)."""
    return _sock_addr(stream, peer=True)


def local_addr(stream: trio.abc.Stream) -> str:
    """``host:port`` of our end of a socket stream: the address the client connected to."""
    return _sock_addr(stream, peer=False)


def _sock_addr(stream: trio.abc.Stream, *, peer: bool) -> str:
    inner = stream
    for _ in range(4):
        sock = getattr(inner, "socket", None)
        if sock is not None:
            try:
                name = sock.getpeername() if peer else sock.getsockname()
            except OSError:
                return "0.0.0.0:0"
            host, port = name[0], name[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        inner = getattr(inner, "transport_stream", None)
        if inner is None:
            break
    return "0.0.0.0:0"


def split_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or ``:port``; raise ValueError with a reason."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unbalanced brackets in {text!r}")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
    elif text.count(":") == 0 and default_port is not None:
        host, port_s = text, ""
    else:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not port_s:
        if default_port is None:
            raise ValueError(f"missing port in {text!r}")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port {port_s!r} in {text!r}")
    return host, int(port_s)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind TCP listeners with a large backlog; raises OSError (e.g. EADDRINUSE)."""
    return await trio.open_tcp_listeners(port, host=host or None, backlog=LISTEN_BACKLOG)


def listener_port(listeners: list[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])


def freeze_startup_objects() -> None:
    """Exempt everything alive once a process has started (modules, classes, config) from GC.

    Full collections otherwise walk those objects again and again: under load they were the
    edge's and agent's worst latency stalls (wrk p99 at 64 connections: 22-25 ms before,
    11-13 ms after; larger or smaller gen0 thresholds measured no better).
    """
    gc.collect()
    gc.freeze()


def parse_local_addr(addr: str, *schemes: str) -> str:
    """A tcp/tls tunnel's upstream: ``22`` → ``localhost:22``; ``host:port`` kept;
    ``SCHEME://host:port`` accepted for each of ``schemes``.  ValueError if malformed."""
    addr = addr.strip()
    for scheme in schemes:
        if addr.startswith(f"{scheme}://"):
            addr = addr[len(scheme) + 3:]
            break
    if addr.isdigit():
        addr = f"localhost:{addr}"
    host, port = split_host_port(addr)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {addr!r}")
    return f"{host or 'localhost'}:{port}"
