"""Small socket and stream helpers shared by the edge and the agent."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

#: A large accept backlog: 1000 simultaneous connects overflowed sshd's queue (perf notes).
LISTEN_BACKLOG = 4096


#: Seconds a name's last working address is reused before the name is resolved again.
RESOLVE_TTL = 30.0
#: (name, port) -> (address, when it last answered, address family).
_last_good: dict[tuple[str, int], tuple[str, float, int]] = {}


def ip_family(host: str) -> int | None:
    """``AF_INET``/``AF_INET6`` when ``host`` is an IP address literal, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family
    return None


async def connect_address(address: str, port: int, family: int) -> trio.SocketStream:
    """A TCP connection to an IP address, in the calling task.

    ``trio.open_tcp_stream`` runs each attempt in a task of its own, inside a nursery, even for
    a single address: two scheduler passes and a task spawn more per connection (the agent
    opens one per proxied TCP connection, and one per new public HTTP connection).
    """
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """``trio.open_tcp_stream(host, port)``, reusing the address that last worked for a name.

    Resolving ``localhost`` costs a getaddrinfo call in a worker thread and, when the upstream
    listens on IPv4 only, a refused attempt on ``::1`` first: about 120 µs of every new
    proxied connection.  The address that answered is tried directly for RESOLVE_TTL
    seconds; if it fails the name is resolved again, so moved services are found.  An
    address literal, or a remembered address, is connected to without a resolver or a task
    of its own (:func:`connect_address`).
    """
    family = ip_family(host)
    if family is not None:
        return await connect_address(host, port, family)
    key = (host, port)
    hit = _last_good.get(key)
    if hit is not None and time.monotonic() - hit[1] < RESOLVE_TTL:
        try:
            return await connect_address(hit[0], port, hit[2])
        except OSError:
            _last_good.pop(key, None)
    stream = await trio.open_tcp_stream(host, port)
    try:
        address = stream.socket.getpeername()[0]
    except OSError:
        return stream
    if address != host:
        _last_good[key] = (address, time.monotonic(), stream.socket.family)
    return stream


def set_nodelay(stream: trio.abc.Stream) -> None:
    """TCP_NODELAY on a socket stream: Nagle against delayed ACK costs 40 ms per exchange.

    ``trio.SocketStream`` sets it itself (the edge's accepted connections, ``connect_tcp``'s):
    this is for sockets wrapped some other way.
    """
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
    inner: Any = stream  # then whatever wrapper's transport_stream is next
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


# ---- file descriptors and accept loops ---------------------------------------------------------

#: accept() errors that mean "out of descriptors or memory": back off and retry, never crash.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Pause of an accept loop after such an error, so a freed descriptor is not fought over in a
#: busy loop (trio's own ``serve_listeners`` waits as long).
ACCEPT_BACKOFF = 0.1
#: Seconds between two log lines about the same kind of trouble (the rest are counted).
LOG_INTERVAL = 10.0
#: Descriptor limit assumed where the platform cannot tell (no ``resource`` module).
DEFAULT_FD_LIMIT = 8192


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the (new) soft limit.

    Python processes start with the soft limit (often 1024) although the hard limit allows
    far more; an edge holds a descriptor per agent and per public connection.
    """
    try:
        import resource
    except ImportError:  # Windows
        return DEFAULT_FD_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if sys.platform == "darwin" or hard == resource.RLIM_INFINITY:
        # macOS refuses more than OPEN_MAX (10240) for the soft limit, whatever the hard one says.
        target = min(hard, 10240) if hard != resource.RLIM_INFINITY else 10240
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return fd_limit() if soft != resource.RLIM_INFINITY else DEFAULT_FD_LIMIT


def fd_limit() -> int:
    """The soft RLIMIT_NOFILE of this process."""
    try:
        import resource
    except ImportError:  # Windows
        return DEFAULT_FD_LIMIT
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return DEFAULT_FD_LIMIT if soft == resource.RLIM_INFINITY else int(soft)


class ThrottledLog:
    """Log a recurring condition at most once per ``interval`` seconds, with a count.

    The first occurrence is logged at once; later ones are counted and summed up in the next
    line, so a storm (thousands of EMFILE per minute) costs a line per interval, not a
    traceback per event.
    """

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last = -float("inf")
        self._count = 0

    def note(self, message: str, *args: object) -> None:
        self._count += 1
        now = self.clock()
        if now - self._last < self.interval:
            return
        times = f" ({self._count} times in the last {self.interval:g}s)" if self._last > -float("inf") else ""
        self.logger.warning(message + times, *args)
        self._last = now
        self._count = 0


def reset_connection(stream: trio.SocketStream) -> None:
    """Close an accepted connection at once with a RST (no FIN handshake, no TIME_WAIT)."""
    sock = stream.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


async def accept_loop(listener: trio.SocketListener, on_accept: Callable[[trio.SocketStream], None],
                      errors: ThrottledLog) -> None:
    """Accept on ``listener`` until cancelled (then close it), handing each connection to ``on_accept``.

    Out of descriptors or memory (``ACCEPT_CAPACITY_ERRNOS``), it notes the error in
    ``errors`` and waits ACCEPT_BACKOFF seconds: the loop survives, the log stays short.
    """
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                errors.note("accept failed: %s; backing off", exc.strerror or exc)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            on_accept(stream)


_GLIBC_UNKNOWN: Any = object()
_glibc: Any = _GLIBC_UNKNOWN


def _glibc_handle() -> Any:
    """glibc, loaded once; None where the C library is another one (musl, macOS, Windows)."""
    global _glibc
    if _glibc is _GLIBC_UNKNOWN:
        _glibc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _glibc = libc
            except (OSError, AttributeError):
                pass
    return _glibc


def release_free_memory() -> bool:
    """Hand memory freed inside the C heap back to the OS (glibc's ``malloc_trim(0)``).

    glibc keeps freed chunks in its arenas: after a burst (a flood of 256 KiB frames) the
    process stayed at 193 MB of 209 MB resident; trimmed, it fell back to 71 MB.  A no-op
    returning False where there is no glibc (musl, macOS, Windows).  Takes well under 1 ms.
    """
    libc = _glibc_handle()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


#: Allocations below this come from glibc's heap, not from an ``mmap`` of their own.
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory glibc may keep at the top of its heap before handing it back by itself.
TRIM_THRESHOLD = 8 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep the data path's 1 MiB buffers in glibc's heap: no page faults per buffer.

    glibc serves a 1 MiB request with an ``mmap`` of its own at first, then, having seen one
    freed, from its heap, but gives the heap's top back to the OS whenever more than twice that
    lies free there.  A relay holds a few 1 MiB reads at once, so its heap top was given back
    and faulted in again all the time: 20-44 page faults per MB moved on each side, and bulk
    transfers 10-15 % faster (CPU per GB 10-20 % lower) once they were gone (``bench/``).
    Memory stays bounded: TRIM_THRESHOLD at most sits unused at the top, and
    :func:`release_free_memory` (the edge's periodic ``malloc_trim``) gives back the rest.

    For the processes tunneld's command line runs, not for a library user's.  Settings the
    user made (``GLIBC_TUNABLES``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``) are
    left alone.  False where glibc is not there, or when it was left alone.
    """
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc_handle()
    if libc is None:
        return False
    # Setting either one turns glibc's sliding threshold off: both are set.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
