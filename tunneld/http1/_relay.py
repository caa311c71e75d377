"""The HTTP/1.x relay shared by the edge and the agent (Trio side of :mod:`._wire`).

Both ends run the same exchange: read a request head, pass it on (possibly rewritten), stream
the body by its framing while the response comes back, stream the response body, and loop for
the next request on a keep-alive connection.  ``Upgrade`` (websockets) switches to a plain
two-way byte relay after a ``101``.  Bodies are never buffered whole: bytes move in 256 KiB
pieces as they arrive.
"""

from __future__ import annotations

import enum
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from tunneld.core._util import release_free_memory
from tunneld.plugin import RELAY_CHUNK, PrefixedStream, forward

from ._wire import (
    MAX_HEAD,
    BadMessage,
    BodyKind,
    ChunkedScanner,
    RequestHead,
    ResponseHead,
    find_head_end,
    parse_response_head,
)

_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError)

#: Heads are read in pieces this size: a bytearray grown by 64 KiB steps never holds much more
#: than the head itself (256 KiB reads would let a 1 MiB head cost 1.25 MiB).
HEAD_READ = 64 * 1024
#: Seconds without a byte of a request body before the edge gives up on it (nginx's
#: ``client_body_timeout``, between two reads).
BODY_IDLE_TIMEOUT = 60.0
#: Bytes per second a request body must average: each read moves the body's deadline on by
#: its size at this rate, never past BODY_IDLE_TIMEOUT from now (Apache mod_reqtimeout's
#: ``MinRate``).  A body trickled a byte every few seconds is cut off after BODY_IDLE_TIMEOUT.
BODY_MIN_RATE = 500.0


class HeadBudget:
    """Bytes of unfinished request heads held across every public connection of the process.

    Each connection is charged what its partial head holds while it waits for more; a charge
    that would take the total past ``limit`` is refused (the caller answers 503 and closes).
    Heads that arrive whole in one read are never charged, so ordinary requests go on being
    served while a flood of half-sent heads is turned away.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: Highest ``used`` since the heap was last trimmed (see :meth:`release`).
        self.peak = 0

    def hold(self, reader: Reader, size: int) -> None:
        """Charge ``reader`` for ``size`` buffered bytes in all (BadMessage(503) beyond the limit)."""
        new = self.used + size - reader.charged
        if size > reader.charged and new > self.limit:
            self.release(reader)
            raise BadMessage("too many unfinished request heads on this server; retry later", 503)
        self.used = new
        reader.charged = size
        if new > self.peak:
            self.peak = new

    def release(self, reader: Reader) -> None:
        """Give back what ``reader`` holds; trim the C heap once a large flood has drained."""
        if reader.charged:
            self.used -= reader.charged
            reader.charged = 0
            if self.used == 0 and self.peak >= TRIM_AFTER:
                self.peak = 0
                trim_heap()


#: A drained budget whose peak reached this many bytes returns freed memory to the OS.
TRIM_AFTER = 16 * 1024 * 1024

#: Public as ``tunneld.http1.trim_heap``: hand free C-heap memory back to the OS.
trim_heap = release_free_memory


def _bare_lf(buf: bytearray, start: int, end: int) -> bool:
    """Whether ``buf[start:end]`` has a LF not preceded by CR (``buf[start-1]`` included)."""
    return buf.count(b"\n", start, end) != buf.count(b"\r\n", max(0, start - 1), end)


class Reader(trio.abc.HalfCloseableStream):
    """A stream with a pushback buffer: reads heads, meters bodies, then acts as the stream."""

    def __init__(self, stream: trio.abc.Stream, budget: HeadBudget | None = None) -> None:
        if type(stream) is PrefixedStream:
            # Its prefix is pushback, as our buffer is: taking it over saves a layer of calls
            # on every read and write of the connection.
            self.buf = bytearray(stream.prefix)
            stream = stream.transport_stream
        else:
            self.buf = bytearray()
        self.stream = stream
        #: Shared bound on partial heads (public connections of the edge), or None.
        self.budget = budget
        #: Bytes this reader is charged for in ``budget``.
        self.charged = 0

    async def read_head(self, limit: int = MAX_HEAD) -> bytes | None:
        """The next head (through its blank line); None on EOF before any byte.

        Raises BadMessage(431) past ``limit``, BadMessage(400) on EOF inside a head or on a
        bare LF (seen as soon as it arrives: such a head would never end), and
        BadMessage(503) when the head budget is spent.
        """
        buf = self.buf
        scan = 0
        while True:
            if buf:
                if buf.startswith(b"\r\n"):
                    self.skip_blank_lines()
                    scan = 0
                end = find_head_end(buf, scan)
                if end > 0:
                    if end > limit:
                        raise BadMessage("message head too large", 431)
                    head = bytes(buf[:end])
                    del buf[:end]
                    if self.charged:
                        self.budget.release(self)  # type: ignore[union-attr]
                    return head
                if len(buf) > limit:
                    raise BadMessage("message head too large", 431)
                # Only a head still waiting for its end needs this: a complete one goes through
                # llhttp, which refuses a bare LF anyway.
                if _bare_lf(buf, scan, len(buf)):
                    raise BadMessage("bare LF in message head (lines must end with CRLF)")
                scan = len(buf)
                if self.budget is not None and buf:
                    self.budget.hold(self, len(buf))
            data = await self.stream.receive_some(HEAD_READ if self.budget is not None else RELAY_CHUNK)
            if not data:
                if buf:
                    raise BadMessage("connection closed inside a message head")
                return None
            buf += data

    def head_buffered(self, limit: int = MAX_HEAD) -> bool:
        """Whether a complete head (within ``limit``) is already buffered."""
        return 0 < find_head_end(self.buf) <= limit

    def skip_blank_lines(self) -> None:
        """Drop stray CRLFs buffered between messages (RFC 9112 §2.2 says to ignore them)."""
        while self.buf.startswith(b"\r\n"):
            del self.buf[:2]

    def release(self) -> None:
        """Drop buffered bytes and give back the head budget (the connection is done)."""
        if self.budget is not None:
            self.budget.release(self)
        self.buf = bytearray()

    @property
    def partial(self) -> bool:
        """True when some bytes of an unfinished head are buffered."""
        return bool(self.buf)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.buf:
            n = len(self.buf) if max_bytes is None else min(max_bytes, len(self.buf))
            data = bytes(self.buf[:n])
            del self.buf[:n]
            await trio.lowlevel.checkpoint()
            return data
        # Trio's streams give bytes; their ABC also allows bytearray, which no stream here returns.
        return await self.stream.receive_some(max_bytes)  # type: ignore[return-value]

    def unread(self, data: bytes) -> None:
        self.buf[0:0] = data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            await self.stream.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()


_LINGER_0 = struct.pack("ii", 1, 0)


def abort(stream: trio.abc.Stream) -> None:
    """End ``stream`` as a failure its peer can tell from a clean end.

    The innermost stream decides: a mux stream is reset (RST frame), a socket is closed with
    SO_LINGER 0 so the kernel sends a TCP RST instead of a FIN.  TLS layers above are skipped on
    purpose: no close_notify goes out, so a TLS client sees the connection fail as well.
    """
    inner: Any = stream
    while getattr(inner, "socket", None) is None:
        below = getattr(inner, "transport_stream", None) or getattr(inner, "stream", None)
        if below is None:
            break
        inner = below
    sock = getattr(inner, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        except OSError:
            pass
        sock.close()
        return
    reset = getattr(inner, "reset", None)
    if reset is not None:
        reset()


class ExchangeTap(Protocol):
    """Sees an exchange's bytes as they are relayed (the agent's request capture).

    Called in the relay's own task, between reads and writes: keep it cheap.  Bodies arrive as
    framed on the wire (chunk lines included); the request head is the caller's to record.
    """

    def request_body(self, data: bytes) -> None:
        """A piece of the request body, as it goes to the upstream."""
        ...

    def response_head(self, head: bytes) -> None:
        """The final response head (after the response filter), as it goes to the client."""
        ...

    def response_body(self, data: bytes) -> None:
        """A piece of the response body, as it goes to the client."""
        ...


class Truncated(Exception):
    """A body ended (EOF, or its source broke) before its framing said it would."""


def _body_clock(timer: trio.CancelScope, deadline: float, n: int) -> float:
    """Move the request body's deadline on for ``n`` more bytes (see BODY_MIN_RATE)."""
    deadline = timer.deadline = min(trio.current_time() + BODY_IDLE_TIMEOUT, deadline + n / BODY_MIN_RATE)
    return deadline


async def copy_body(src: Reader, dst: trio.abc.SendStream, kind: int, length: int,
                    timer: trio.CancelScope | None = None,
                    tap: Callable[[bytes], None] | None = None) -> int:
    """Copy one message body from ``src`` to ``dst`` by its framing; returns bytes copied.

    Whose fault a failure is shows in its type: ``src`` ending early or breaking raises
    :class:`Truncated`, malformed chunked framing BadMessage, ``dst`` failing trio's resource
    errors.  ``timer`` (the connection's one cancel scope) gets a deadline that every read
    moves on (BODY_IDLE_TIMEOUT, BODY_MIN_RATE), and none once the body is through.
    ``tap`` sees each piece before it is sent.
    """
    if kind == BodyKind.NONE:
        return 0
    deadline = math.inf
    if timer is not None:
        deadline = timer.deadline = trio.current_time() + BODY_IDLE_TIMEOUT
    total = 0
    receive = src.receive_some
    send: Callable[[Any], Awaitable[None]] = dst.send_all
    # A mux stream into a socket or TLS: frames go out as they came, unjoined (see ``forward``).
    receive_parts: Any = getattr(src.stream, "receive_parts", None)
    send_parts: Any = getattr(getattr(dst, "stream", None), "send_all_parts", None)
    if receive_parts is None:
        send_parts = None  # both ends, or neither
    if timer is not None:
        scope = timer

        def paced(send_one: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
            async def send(data: Any) -> None:
                # Only the client's pace is bounded: the clock stops while the other side is slow.
                nonlocal deadline
                scope.deadline = math.inf
                paused = trio.current_time()
                await send_one(data)
                deadline += trio.current_time() - paused
                scope.deadline = deadline
            return send

        send = paced(dst.send_all)
        if send_parts is not None:
            send_parts = paced(send_parts)

    try:
        if kind == BodyKind.LENGTH:
            left = length
            while left:
                # Frames as they came when both ends allow it and nothing is buffered here.
                parted = send_parts is not None and not src.buf
                try:
                    got: Any = await (receive_parts if parted else receive)(min(RELAY_CHUNK, left))
                except _ENDED as exc:
                    raise Truncated(f"body source failed {left} bytes short: {exc}") from exc
                n = sum(map(len, got)) if parted else len(got)
                if not n:
                    raise Truncated(f"body ended {left} bytes short")
                if timer is not None:
                    deadline = _body_clock(timer, deadline, n)
                if tap is not None:
                    for part in got if parted else (got,):
                        tap(part)
                await (send_parts if parted else send)(got)
                left -= n
            return length
        if kind == BodyKind.CHUNKED:
            scanner = ChunkedScanner()
            while not scanner.done:
                try:
                    data = await receive(RELAY_CHUNK)
                except _ENDED as exc:
                    raise Truncated(f"chunked body source failed: {exc}") from exc
                if not data:
                    raise Truncated("chunked body ended early")
                if timer is not None:
                    deadline = _body_clock(timer, deadline, len(data))
                n = scanner.feed(data)
                if n < len(data):
                    src.unread(data[n:])
                    data = data[:n]
                if tap is not None:
                    tap(data)
                await send(data)
                total += n
            return total
        while True:
            try:
                data = await receive(RELAY_CHUNK)
            except _ENDED as exc:
                # A reset is not an end: a close-delimited body cut short must not look whole.
                raise Truncated(f"body source failed: {exc}") from exc
            if not data:
                return total
            if tap is not None:
                tap(data)
            await dst.send_all(data)
            total += len(data)
    finally:
        if timer is not None:
            timer.deadline = math.inf


class Outcome(enum.Enum):
    #: The exchange finished cleanly and both sides allow another request.
    KEEP = "keep"
    #: The exchange finished cleanly: close the connection.
    CLOSE = "close"
    #: The exchange failed after the response began: :func:`abort` both streams, so the client
    #: sees a failure, never a truncated response that looks complete.
    ABORT = "abort"


class UpstreamFailed(Exception):
    """The upstream side ended or misbehaved before a response head was passed on."""

    def __init__(self, reason: str, bad_response: bool = False) -> None:
        super().__init__(reason)
        self.bad_response = bad_response


ResponseFilter = Callable[[ResponseHead, bytes], bytes]


#: A response body already buffered up to this size goes out in one write with its head.
COALESCE_BODY = 64 * 1024


@attrs.define
class Progress:
    """How far the response has got (for the caller's error handling)."""

    resp: ResponseHead | None = None
    sent_any: bool = False


async def exchange(client: Reader, upstream: Reader, req: RequestHead, head: bytes,
                   response_filter: ResponseFilter | None = None, *,
                   upgraded_idle_timeout: float | None = None,
                   body_timer: trio.CancelScope | None = None,
                   progress: Progress | None = None,
                   tap: ExchangeTap | None = None) -> tuple[Outcome, ResponseHead | None]:
    """Relay one request/response exchange between ``client`` and ``upstream``.

    ``head`` is sent first ("" when the caller sent it already, e.g. in the stream's SYN
    frame).  After a ``101`` the connection becomes a two-way byte relay, ended after
    ``upgraded_idle_timeout`` seconds without a byte either way (None: never).
    ``body_timer``: the connection's cancel scope, to bound the client's request body (see
    :func:`copy_body`).  ``progress`` (reset here) lets the caller see how far the response
    got when the exchange is cancelled.  ``tap`` sees the request body and the final response
    (not interim heads, nor the bytes of an upgraded connection).

    Raises :class:`UpstreamFailed` when no response head reached the client (so the caller may
    still answer with an error page), and BadMessage(400) when the client's request body was
    malformed or cut short before any response began.  A failure after the response began
    returns ``Outcome.ABORT``.
    """
    if head:
        try:
            await upstream.stream.send_all(head)  # Reader.send_all, one call less
        except _ENDED as exc:
            raise UpstreamFailed(f"upstream closed: {exc}") from None
    if progress is None:
        progress = Progress()
    else:
        progress.resp = None
        progress.sent_any = False
    if req.body == BodyKind.NONE:
        # The common case: nothing to send while the response comes, so no second task.
        body_done = True
        try:
            await _relay_response(client, upstream, req, response_filter, progress, tap)
        except UpstreamFailed:
            if not progress.sent_any:
                raise
            return Outcome.ABORT, progress.resp
        except (Truncated, BadMessage, *_ENDED):
            return Outcome.ABORT, progress.resp
    else:
        try:
            body_done = await _exchange_with_body(client, upstream, req, response_filter, progress,
                                                  body_timer, tap)
        except _ResponseBroken:
            return Outcome.ABORT, progress.resp
    resp = progress.resp
    if resp is None:
        return Outcome.CLOSE, None
    if resp.status == 101:
        if await relay_upgraded(client, upstream, upgraded_idle_timeout):
            return Outcome.ABORT, resp
        return Outcome.CLOSE, resp
    keep = body_done and progress.sent_any and req.keep_alive and resp.keep_alive
    return (Outcome.KEEP if keep else Outcome.CLOSE), resp


class _ResponseBroken(Exception):
    """Internal: the response failed after it began (the exchange ends in ``Outcome.ABORT``)."""


async def _exchange_with_body(client: Reader, upstream: Reader, req: RequestHead,
                              response_filter: ResponseFilter | None, progress: Progress,
                              body_timer: trio.CancelScope | None, tap: ExchangeTap | None) -> bool:
    """Stream the request body while the response is relayed; True if the body went through.

    Raises _ResponseBroken when the response did not complete after it began.
    """
    body_done = False
    #: Truncated/BadMessage: the client's fault; a resource error: the upstream's.
    body_error: Exception | None = None
    # Exceptions are kept out of the nursery body: with strict exception groups anything
    # raised there would come out wrapped.
    failure: UpstreamFailed | None = None
    complete = False
    async with trio.open_nursery() as nursery:

        async def send_body() -> None:
            nonlocal body_done, body_error
            try:
                await copy_body(client, upstream, req.body, req.length, body_timer,
                                tap.request_body if tap is not None else None)
                body_done = True
            except (Truncated, BadMessage) as exc:
                body_error = exc
                nursery.cancel_scope.cancel()
            except _ENDED as exc:
                # The upstream stopped reading: its response (a 413, say) may still come, so
                # the response side decides.
                body_error = exc

        nursery.start_soon(send_body)
        try:
            await _relay_response(client, upstream, req, response_filter, progress, tap)
            complete = True
        except UpstreamFailed as exc:
            failure = exc
        except (Truncated, BadMessage, *_ENDED):
            pass
        resp = progress.resp
        if not complete or resp is None or resp.status == 101 or not body_done \
                or not (req.keep_alive and resp.keep_alive):
            nursery.cancel_scope.cancel()
    if progress.sent_any:
        if not complete:
            raise _ResponseBroken
        return body_done
    if isinstance(body_error, BadMessage):
        raise BadMessage(f"malformed request body: {body_error}", 400)
    if isinstance(body_error, Truncated):
        raise BadMessage(f"request body incomplete: {body_error}", 400)
    if failure is not None:
        raise failure
    if body_error is not None:
        raise UpstreamFailed("request body could not be delivered")
    return body_done and complete


async def _relay_response(client: Reader, upstream: Reader, req: RequestHead,
                          response_filter: ResponseFilter | None, progress: Progress,
                          tap: ExchangeTap | None = None) -> None:
    """Relay interim and final response heads, then the final response's body (not after 101)."""
    while True:
        try:
            raw = await upstream.read_head()
        except BadMessage as exc:
            raise UpstreamFailed(str(exc), bad_response=True) from None
        except _ENDED as exc:
            raise UpstreamFailed(f"upstream failed: {exc}") from None
        if raw is None:
            raise UpstreamFailed("upstream closed before responding")
        try:
            resp = parse_response_head(raw, req.method)
        except BadMessage as exc:
            raise UpstreamFailed(str(exc), bad_response=True) from None
        progress.resp = resp
        out = response_filter(resp, raw) if response_filter is not None else raw
        if tap is not None and not resp.interim:
            tap.response_head(out)
        if not resp.interim and resp.body == BodyKind.LENGTH and resp.status != 101 \
                and 0 < resp.length <= min(len(upstream.buf), COALESCE_BODY):
            # The whole small body is already here: one write (and one TLS record) for both.
            body = bytes(upstream.buf[:resp.length])
            del upstream.buf[:resp.length]
            if tap is not None:
                tap.response_body(body)
            await client.stream.send_all(out + body)
            progress.sent_any = True
            return
        await client.stream.send_all(out)
        progress.sent_any = True
        if not resp.interim:
            break
    if resp.status != 101:
        await copy_body(upstream, client, resp.body, resp.length,
                        tap=tap.response_body if tap is not None else None)


class _Watched(trio.abc.HalfCloseableStream):
    """An upgraded side: notes a broken receive, and moves an idle deadline on each read."""

    def __init__(self, stream: Reader, scope: trio.CancelScope | None, idle: float) -> None:
        self.stream = stream
        self.scope = scope
        self.idle = idle
        self.broken = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self.stream.receive_some(max_bytes)
        except _ENDED:
            self.broken = True
            raise
        if self.scope is not None:
            self.scope.deadline = trio.current_time() + self.idle
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except _ENDED:
            self.broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def relay_upgraded(client: Reader, upstream: Reader, idle_timeout: float | None) -> bool:
    """Relay an upgraded connection both ways until both directions end or it sits idle too long.

    The idle clock counts bytes in either direction: a WebSocket whose peer only listens still
    sees the other side's frames (or pings) arrive.  Returns True when either side broke (a
    reset, not an EOF): the caller aborts the other one so that it sees a failure too.
    """
    if idle_timeout is None:
        a, b = _Watched(client, None, 0.0), _Watched(upstream, None, 0.0)
        await forward(a, b)
    else:
        with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:
            a, b = _Watched(client, scope, idle_timeout), _Watched(upstream, scope, idle_timeout)
            await forward(a, b)
    return a.broken or b.broken
