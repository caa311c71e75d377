"""The HTTP/1.x relay shared by the edge and the agent (Trio side of :mod:`._wire`).

Both ends run the same exchange: read a request head, pass it on (possibly rewritten), stream
the body by its framing while the response comes back, stream the response body, and loop for
the next request on a keep-alive connection.  ``Upgrade`` (websockets) switches to a plain
two-way byte relay after a ``101``.  Bodies are never buffered whole: bytes move in 256 KiB
pieces as they arrive.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import trio

from tunneld.core import CHUNK, forward

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


class Reader(trio.abc.HalfCloseableStream):
    """A stream with a pushback buffer: reads heads, meters bodies, then acts as the stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read_head(self, limit: int = MAX_HEAD) -> bytes | None:
        """The next head (through its blank line); None on EOF before any byte.

        Raises BadMessage(431) past ``limit`` and BadMessage(400) on EOF inside a head.
        """
        scan = 0
        buf = self.buf
        while True:
            self.skip_blank_lines()
            end = find_head_end(buf, scan)
            if end > 0:
                if end > limit:
                    raise BadMessage("message head too large", 431)
                head = bytes(buf[:end])
                del buf[:end]
                return head
            if len(buf) > limit:
                raise BadMessage("message head too large", 431)
            scan = len(buf)
            data = await self.stream.receive_some(CHUNK)
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
        while self.buf[:2] == b"\r\n":
            del self.buf[:2]

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
        return await self.stream.receive_some(max_bytes)

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


class Truncated(Exception):
    """A body ended before its framing said it would."""


async def copy_body(src: Reader, dst: trio.abc.SendStream, kind: int, length: int) -> int:
    """Copy one message body from ``src`` to ``dst`` by its framing; returns bytes copied."""
    total = 0
    if kind == BodyKind.NONE:
        return 0
    if kind == BodyKind.LENGTH:
        left = length
        while left:
            data = await src.receive_some(min(CHUNK, left))
            if not data:
                raise Truncated(f"body ended {left} bytes short")
            await dst.send_all(data)
            left -= len(data)
        return length
    if kind == BodyKind.CHUNKED:
        scanner = ChunkedScanner()
        while not scanner.done:
            data = await src.receive_some(CHUNK)
            if not data:
                raise Truncated("chunked body ended early")
            n = scanner.feed(data)
            if n < len(data):
                src.unread(data[n:])
                data = data[:n]
            await dst.send_all(data)
            total += n
        return total
    while data := await src.receive_some(CHUNK):
        await dst.send_all(data)
        total += len(data)
    return total


class Outcome(enum.Enum):
    #: The exchange finished cleanly and both sides allow another request.
    KEEP = "keep"
    #: The exchange finished (or failed after the response began): close the connection.
    CLOSE = "close"


class UpstreamFailed(Exception):
    """The upstream side ended or misbehaved before a response head was passed on."""

    def __init__(self, reason: str, bad_response: bool = False) -> None:
        super().__init__(reason)
        self.bad_response = bad_response


ResponseFilter = Callable[[ResponseHead, bytes], bytes]


#: A response body already buffered up to this size goes out in one write with its head.
COALESCE_BODY = 64 * 1024


@attrs.define
class _Progress:
    """How far the response has got (for the caller's error handling)."""

    resp: ResponseHead | None = None
    sent_any: bool = False


async def exchange(client: Reader, upstream: Reader, req: RequestHead, head: bytes,
                   response_filter: ResponseFilter | None = None, *,
                   upgraded_idle_timeout: float | None = None) -> tuple[Outcome, ResponseHead | None]:
    """Relay one request/response exchange between ``client`` and ``upstream``.

    ``head`` is sent first ("" when the caller sent it already, e.g. in the stream's SYN
    frame).  After a ``101`` the connection becomes a two-way byte relay, ended after
    ``upgraded_idle_timeout`` seconds without a byte either way (None: never).

    Raises :class:`UpstreamFailed` when no response head reached the client (so the caller may
    still answer with an error page); any later failure returns ``Outcome.CLOSE``.
    """
    if head:
        try:
            await upstream.send_all(head)
        except _ENDED as exc:
            raise UpstreamFailed(f"upstream closed: {exc}") from None
    progress = _Progress()
    if req.body == BodyKind.NONE:
        # The common case: nothing to send while the response comes, so no second task.
        body_done = True
        try:
            await _relay_response(client, upstream, req, response_filter, progress)
        except UpstreamFailed:
            if not progress.sent_any:
                raise
            return Outcome.CLOSE, progress.resp
        except (Truncated, BadMessage, *_ENDED):
            return Outcome.CLOSE, progress.resp
    else:
        body_done = await _exchange_with_body(client, upstream, req, response_filter, progress)
    resp = progress.resp
    if resp is None:
        return Outcome.CLOSE, None
    if resp.status == 101:
        await relay_upgraded(client, upstream, upgraded_idle_timeout)
        return Outcome.CLOSE, resp
    keep = body_done and progress.sent_any and req.keep_alive and resp.keep_alive
    return (Outcome.KEEP if keep else Outcome.CLOSE), resp


async def _exchange_with_body(client: Reader, upstream: Reader, req: RequestHead,
                              response_filter: ResponseFilter | None, progress: _Progress) -> bool:
    """Stream the request body while the response is relayed; True if the body went through."""
    body_state = {"done": False, "failed": False}
    # Exceptions are kept out of the nursery body: with strict exception groups anything
    # raised there would come out wrapped.
    failure: UpstreamFailed | None = None
    complete = False
    async with trio.open_nursery() as nursery:

        async def send_body() -> None:
            try:
                await copy_body(client, upstream, req.body, req.length)
                body_state["done"] = True
            except (Truncated, BadMessage, *_ENDED):
                body_state["failed"] = True
                nursery.cancel_scope.cancel()

        nursery.start_soon(send_body)
        try:
            await _relay_response(client, upstream, req, response_filter, progress)
            complete = True
        except UpstreamFailed as exc:
            failure = exc
        except (Truncated, BadMessage, *_ENDED):
            pass
        resp = progress.resp
        if not complete or resp is None or resp.status == 101 or not body_state["done"] \
                or not (req.keep_alive and resp.keep_alive):
            nursery.cancel_scope.cancel()
    if failure is not None and not progress.sent_any:
        raise failure
    if body_state["failed"] and progress.resp is None:
        raise UpstreamFailed("request body could not be delivered")
    return body_state["done"] and complete


async def _relay_response(client: Reader, upstream: Reader, req: RequestHead,
                          response_filter: ResponseFilter | None, progress: _Progress) -> None:
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
        if not resp.interim and resp.body == BodyKind.LENGTH and resp.status != 101 \
                and 0 < resp.length <= min(len(upstream.buf), COALESCE_BODY):
            # The whole small body is already here: one write (and one TLS record) for both.
            body = bytes(upstream.buf[:resp.length])
            del upstream.buf[:resp.length]
            await client.send_all(out + body)
            progress.sent_any = True
            return
        await client.send_all(out)
        progress.sent_any = True
        if not resp.interim:
            break
    if resp.status != 101:
        await copy_body(upstream, client, resp.body, resp.length)


class _Activity(trio.abc.HalfCloseableStream):
    """Pushes ``scope``'s deadline ``idle`` seconds ahead whenever bytes arrive from ``stream``."""

    def __init__(self, stream: Reader, scope: trio.CancelScope, idle: float) -> None:
        self.stream = stream
        self.scope = scope
        self.idle = idle

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.scope.deadline = trio.current_time() + self.idle
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def relay_upgraded(client: Reader, upstream: Reader, idle_timeout: float | None) -> None:
    """Relay an upgraded connection both ways until both directions end or it sits idle too long.

    The idle clock counts bytes in either direction: a WebSocket whose peer only listens still
    sees the other side's frames (or pings) arrive.
    """
    if idle_timeout is None:
        await forward(client, upstream)
        return
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:
        await forward(_Activity(client, scope, idle_timeout), _Activity(upstream, scope, idle_timeout))
