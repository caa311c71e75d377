"""Idle upstream connections kept between public connections (the agent side of HTTP tunnels).

A public connection that ends while its upstream connection is still good (the last exchange
finished cleanly on it) leaves that connection here, and the next public connection to the
same upstream takes it instead of connecting again: no connect, no scheduler pass waiting for
it, no close, and no accept on the upstream's side.  Go's ``http.Transport`` (ngrok's agent)
and nginx's upstream ``keepalive`` do the same.

Bounds: at most :data:`MAX_IDLE` connections per upstream URL, each for at most
:data:`IDLE_TIMEOUT` seconds (a system task closes them when that passes, so an upstream's
idle close never leaves a socket in CLOSE_WAIT for long), and every connection is probed
before reuse (:func:`closed_while_idle`).  The pools belong to one Trio run: when it ends,
the sweeper is cancelled and closes what is left.
"""

from __future__ import annotations

import collections
import select

import trio

from tunneld.http1 import Reader
from tunneld.plugin import close_forcefully

#: Idle connections kept per upstream URL: enough for a browser's six and a few more.
MAX_IDLE = 16
#: Seconds an idle connection is kept: under the usual upstream keep-alive timeouts (Node,
#: Apache, uvicorn: 5 s), so that the upstream rarely closes one just as it is reused.
IDLE_TIMEOUT = 4.0


def closed_while_idle(upstream: Reader) -> bool:
    """True when an idle kept-alive upstream connection is readable: closed, or stray bytes."""
    if upstream.buf:
        return True
    # A socket stream (trio's or lean) has the socket; TLS over one, the transport stream.
    stream: object = upstream.stream
    while (sock := getattr(stream, "socket", None)) is None:
        if _tls_holds_bytes(stream):
            return True
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _tls_holds_bytes(stream: object) -> bool:
    """Whether a TLS stream (an https:// upstream's ``trio.SSLStream``) already took bytes from
    its socket that nobody has read: records still encrypted in its incoming buffer, or
    plaintext decrypted and waiting.  The socket's probe cannot see them, and on a parked
    connection they are an answer to nothing (an upstream that answered twice, or a desync):
    handed to the next client, they would be taken for its response.
    """
    if not isinstance(stream, trio.SSLStream):
        return False
    try:
        return bool(stream._incoming.pending or stream._ssl_object.pending())
    except AttributeError:  # a trio that keeps them elsewhere: not known clean, so not reused
        return True


async def _discard(reader: Reader) -> None:
    try:
        await close_forcefully(reader.stream)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # it is being thrown away: a failing close changes nothing


class IdlePool:
    """The idle connections to one upstream URL, most recently used last."""

    def __init__(self, url: str, pools: dict[str, IdlePool]) -> None:
        self.url = url
        self._pools = pools
        #: (time parked, connection), oldest first.
        self.idle: collections.deque[tuple[float, Reader]] = collections.deque()
        self._sweeping = False

    async def take(self) -> Reader | None:
        """The most recently parked connection that is still good, or None."""
        while self.idle:
            parked, reader = self.idle.pop()
            if trio.current_time() - parked < IDLE_TIMEOUT and not closed_while_idle(reader):
                return reader
            await _discard(reader)
        return None

    def give(self, reader: Reader) -> bool:
        """Park ``reader``; False (the caller closes it) when it has stray bytes or the pool is full."""
        if reader.buf or len(self.idle) >= MAX_IDLE:
            return False
        self.idle.append((trio.current_time(), reader))
        if not self._sweeping:
            self._sweeping = True
            trio.lowlevel.spawn_system_task(self._sweep, name=f"idle upstream connections to {self.url}")
        return True

    async def _sweep(self) -> None:
        """Close each connection when its time is up; the pool leaves the registry when empty."""
        try:
            while self.idle:
                await trio.sleep_until(self.idle[0][0] + IDLE_TIMEOUT)
                now = trio.current_time()
                while self.idle and now - self.idle[0][0] >= IDLE_TIMEOUT:
                    await _discard(self.idle.popleft()[1])
        finally:
            # Cancelled: the run is ending, and nothing will take them.
            while self.idle:
                await _discard(self.idle.popleft()[1])
            self._sweeping = False
            if self._pools.get(self.url) is self:
                del self._pools[self.url]


_POOLS: trio.lowlevel.RunVar[dict[str, IdlePool]] = trio.lowlevel.RunVar("tunneld_http_idle_upstreams")


def _pools() -> dict[str, IdlePool]:
    try:
        return _POOLS.get()
    except LookupError:
        pools: dict[str, IdlePool] = {}
        _POOLS.set(pools)
        return pools


async def take_idle(url: str) -> Reader | None:
    """A parked connection to ``url`` that is still good, or None."""
    pool = _pools().get(url)
    return None if pool is None else await pool.take()


def give_idle(url: str, reader: Reader) -> bool:
    """Park ``reader`` (a connection to ``url`` between exchanges); False: the caller closes it."""
    pools = _pools()
    pool = pools.get(url)
    if pool is None:
        pool = pools[url] = IdlePool(url, pools)
    return pool.give(reader)
