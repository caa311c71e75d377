"""The Trio adapter for the muxado framing: :class:`MuxSession` and :class:`MuxStream`.

Theory of operation
-------------------
One :class:`MuxSession` owns one carrier stream (TLS over TCP, or a WebSocket adapter) and two
tasks: :meth:`MuxSession.run` is the reader and starts the writer.

* the **reader** feeds carrier bytes to the sans-IO :class:`~tunneld.core.proto.FrameDecoder`
  and routes each event: DATA into the stream's receive buffer, WNDINC into its send credit,
  RST and GOAWAY into errors.  It never blocks on a slow stream: per-stream credit bounds what a
  peer may send, and a peer that overruns it is a protocol error that ends the session.
* frames are **written at the end of the scheduler pass** that queued them.  Streams append
  frames to an outbox; a Trio instrument (:class:`_PassEndFlush`) writes every outbox that
  took frames during a pass once all of the pass's runnable tasks have run, just before the
  loop polls for I/O: many small frames (requests, responses, WNDINC) coalesce into one TLS
  record run and one syscall, and no task is woken to write them.  Frames the reader's own
  dispatch queued (heartbeat echoes, credit) it writes itself when it ends a dispatch.
* the **writer** task takes what cannot be written without waiting: outboxes over
  ``PASS_END_FLUSH_MAX`` (bulk), or any outbox while the carrier is busy or full.  It is the
  only task that waits on the carrier.  The outbox is bounded in bytes: data writers wait
  when it is full; control frames never wait.

Ownership: the session's owner runs :meth:`run` in its own nursery and consumes
:meth:`accept_stream`, or has :meth:`run` hand it each new stream (``on_stream``; the edge's
agent sessions: no accept loop, no queue).  When the carrier dies every stream becomes broken
(``trio.BrokenResourceError``), which is how the news reaches forwarders owned elsewhere —
cancellation flows down the tree, across owners it travels as a broken resource.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._lean import STREAK, checked_max_bytes
from .proto import (
    DEFAULT_WINDOW,
    MAX_DATA_FRAME,
    Data,
    ErrorCode,
    FrameDecoder,
    GoAway,
    ReceiveWindow,
    RemoteProtocolError,
    Reset,
    WindowUpdate,
    admit_syn,
    check_data_after_fin,
    data_header,
    encode_goaway,
    encode_rst,
    encode_wndinc,
    orphan_frame_reply,
)
from .proto._frames import Event

if TYPE_CHECKING:
    from ._idlewatch import IdleWatcher

log = logging.getLogger("tunneld.mux")

#: Carrier read size.  256 KiB reads measured 1.8-2.5 GB/s against 1.3 GB/s at 64 KiB; 1 MiB
#: (the TLS layer's ``MAX_RECEIVE``) hands the decoder four DATA frames of a bulk transfer per
#: read: bulk CPU per MB 3-6 % lower again (issue 17; near the noise of a shared machine).  A
#: read returns what is buffered, so small exchanges are unaffected.
READ_SIZE = 1024 * 1024
#: Received pieces one receive takes at most: joined by ``receive_some``, handed to ``writev``
#: by ``receive_parts`` (well under its IOV_MAX).
MAX_PARTS = 64
#: Streams handed data before the reader lets them run.  One read can carry the frames of
#: dozens of requests; dispatched all at once, every reply waits for the whole batch and the
#: two ends take turns instead of working in parallel (c=64 req/s 8.5-9k before, 10.8-12k
#: after).  A bulk transfer feeds one stream: it never pauses.
DISPATCH_SLICE = 8
#: Outboxes up to this size are written at the end of the scheduler pass that queued them
#: (the TLS carrier's ``send_parts_nowait`` takes two records); larger ones (bulk) go to the
#: writer task at once.
PASS_END_FLUSH_MAX = 32 * 1024
#: Bytes queued for the carrier before data writers must wait.
OUTBOX_LIMIT = 4 * 1024 * 1024
#: Concurrent streams a peer may hold open on one session (see ``MuxSession.max_remote_streams``
#: for a lower, per-session bound, which the edge sets: agents open only control streams).  The
#: edge opens one per public connection and queues opens beyond this (``max_local_streams``), so
#: it bounds how many public connections one agent serves at once (19,800 measured, ~9 KB each).
MAX_REMOTE_STREAMS = 32768
#: Streams the peer may open and we have not yet accepted (Go's backlog is 128).  As many as
#: it may hold: one read of the carrier can bring hundreds of SYNs (a burst of public
#: connections) before the accept loop runs, and refusing them would fail those connections.
ACCEPT_BACKLOG = MAX_REMOTE_STREAMS


class StreamReset(trio.BrokenResourceError):
    """The peer reset the stream (RST); ``code`` is the muxado error code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stream reset by peer ({_code_name(code)})")
        self.code = code


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


@attrs.define(eq=False)
class MuxStream(trio.abc.HalfCloseableStream):
    """One muxado stream, with trio's half-closeable stream semantics."""

    session: MuxSession
    id: int
    _credit: int
    _window: ReceiveWindow
    _syn_pending: bool = False
    #: Received, unread (made on the first DATA: an echoing or send-only stream never needs it).
    _chunks: collections.deque[bytes] | None = None
    _eof_received: bool = False
    _fin_sent: bool = False
    _closed: bool = False
    _error: BaseException | None = None
    #: The task waiting to receive / to send (one at most each: ``_receiving``/``_sending``).
    #: Plain slots, not ParkingLots: tens of thousands of streams each keep two, mostly empty.
    _read_waiter: trio.lowlevel.Task | None = None
    _write_waiter: trio.lowlevel.Task | None = None
    _receiving: bool = False
    _sending: bool = False
    #: Opened by the peer (counted in ``MuxSession.remote_stream_count``).
    _remote: bool = False
    #: Its unread bytes count towards ``MuxSession.max_remote_buffered`` (peer-opened, and the
    #: session has that cap: the edge's control streams; never the agent's proxy streams).
    _metered: bool = False
    #: Set by :meth:`echo`: the reader answers this stream's data itself.
    _echo: _Echo | None = None

    @property
    def last_echo(self) -> float | None:
        """When (``trio.current_time()``) the last echo was queued; None if not echoing."""
        return self._echo.last if self._echo is not None else None

    @property
    def eof_received(self) -> bool:
        """True once the peer half-closed (its FIN arrived)."""
        return self._eof_received

    # ---- receiving ----------------------------------------------------------------------

    async def receive_parts(self, max_bytes: int) -> list[bytes]:
        """:meth:`receive_some`, but the pieces as they arrived instead of one joined ``bytes``
        (an empty list at end of stream): a relay hands them to ``writev`` and copies nothing.
        """
        return await self.receive_some(max_bytes, _parts=True)  # type: ignore[return-value]

    async def receive_some(self, max_bytes: int | None = None, _parts: bool = False) -> bytes:
        # One body for both (``_parts``: receive_parts), without a frame more on the request path.
        max_bytes = checked_max_bytes(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._chunks or self._eof_received:
                    data: bytes | list[bytes]
                    if _parts:
                        data = self._take_parts(max_bytes) if self._chunks else []
                        size = sum(map(len, data))
                    else:
                        data = self._take(max_bytes) if self._chunks else b""
                        size = len(data)
                    if data:
                        if self._metered:
                            self.session._remote_buffered -= size
                        inc = self._window.on_consumed(size)
                        if inc and not self._eof_received:
                            self.session._queue_control(encode_wndinc(self.id, inc))
                    # Receives and sends that needed no wait skip the scheduler (``_lean``).
                    if waited:
                        STREAK.waited()
                    elif STREAK.ready(size):
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data  # type: ignore[return-value]  # a list only for receive_parts
                if self._error is not None:
                    raise self._error_copy()
                waited = True
                await _wait_in_slot(self, "_read_waiter")
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        # Small pieces coalesced, so a reader doing 1 MiB reads does not pay per frame (a join
        # of one piece is that piece).
        return b"".join(self._take_parts(max_bytes))

    def _take_parts(self, max_bytes: int | None) -> list[bytes]:
        chunks = self._chunks
        assert chunks  # the caller checked
        if max_bytes is None:
            max_bytes = READ_SIZE
        first = chunks[0]
        if max_bytes < len(first):
            chunks[0] = first[max_bytes:]
            return [first[:max_bytes]]
        parts = [chunks.popleft()]
        total = len(first)
        while chunks and total + len(chunks[0]) <= max_bytes and len(parts) < MAX_PARTS:
            nxt = chunks.popleft()
            parts.append(nxt)
            total += len(nxt)
        return parts

    def _error_copy(self) -> BaseException:
        err = self._error
        assert err is not None
        if isinstance(err, StreamReset):
            return StreamReset(err.code)
        new = trio.BrokenResourceError(str(err))
        new.__cause__ = err.__cause__
        return new

    # ---- echoing ------------------------------------------------------------------------

    def echo(self, unit: int = 4) -> None:
        """Answer everything the peer sends with the same bytes, ``unit`` bytes at a time, from
        the session's reader: no task waits on the stream (muxado heartbeats, which an idle
        session exchanges forever: one task wakeup and hop to the writer fewer each).

        Bytes the peer's credit does not let us echo yet wait in the stream and count as unread
        (window and ``max_remote_buffered``), so a peer that never reads its echoes is bounded as
        before.  The peer's FIN is answered with ours and the stream is forgotten.  Once called,
        the stream is the reader's: receive_some/send_all must not be used.
        """
        if unit < 1:
            raise ValueError("echo unit must be at least 1 byte")
        self._echo = _Echo(unit, trio.current_time())
        # Bytes that arrived before (e.g. in the SYN frame, after the stream type) go first.
        if self._chunks:
            self._echo.pending += b"".join(self._chunks)
        self._chunks = None  # the stream type was read from it: keep no empty deque for life
        self._echo_flush()
        if self._eof_received:
            self._echo_fin()

    def _echo_flush(self) -> None:
        echo = self._echo
        assert echo is not None
        pending = echo.pending
        n = min(len(pending), max(0, self._credit))
        n -= n % echo.unit
        if not n or self._closed or self._fin_sent or self._error is not None:
            return
        self._credit -= n
        echo.pending = pending[n:]
        echo.last = trio.current_time()
        session = self.session
        session._queue_control(data_header(self.id, n, syn=self._syn_pending) + pending[:n])
        self._syn_pending = False
        if self._metered:
            session._remote_buffered -= n
        inc = self._window.on_consumed(n)
        if inc and not self._eof_received:
            session._queue_control(encode_wndinc(self.id, inc))

    def _echo_fin(self) -> None:
        if not self._fin_sent and not self._closed and self._error is None:
            self._send_fin()

    # called by the session's reader
    def _on_data(self, data: bytes, fin: bool) -> None:
        if data:
            check_data_after_fin(self.id, self._eof_received, True)
            self._window.on_data(len(data))
            if self._metered:
                self.session._on_remote_buffered(len(data))
            if self._echo is not None:
                self._echo.pending += data
                self._echo_flush()
            elif self._chunks is None:
                self._chunks = collections.deque((data,))
            else:
                self._chunks.append(data)
        if fin:
            self._eof_received = True
            if self._echo is not None:
                self._echo_fin()
        if self._read_waiter is not None:
            _wake_slot(self, "_read_waiter")

    def _on_credit(self, inc: int) -> None:
        self._credit += inc
        if self._echo is not None and self._echo.pending:
            self._echo_flush()
        if self._write_waiter is not None:
            _wake_slot(self, "_write_waiter")

    def _on_broken(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake_both()

    def _wake_both(self) -> None:
        if self._read_waiter is not None:
            _wake_slot(self, "_read_waiter")
        if self._write_waiter is not None:
            _wake_slot(self, "_write_waiter")

    # ---- sending ------------------------------------------------------------------------

    def _enter_send(self) -> None:
        """One sender at a time, and never on a stream closed for sending."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed or self._fin_sent:
            raise trio.ClosedResourceError("stream is closed for sending")
        self._sending = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._enter_send()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if not isinstance(data, bytes):
                # The outbox keeps references until the writer runs: never to a mutable buffer.
                data = bytes(data)
            view = memoryview(data)
            session = self.session
            waited = False
            while view:
                while self._credit <= 0:
                    self._check_writable()
                    waited = True
                    await _wait_in_slot(self, "_write_waiter")
                self._check_writable()
                n = min(len(view), self._credit, MAX_DATA_FRAME)
                self._credit -= n
                header = data_header(self.id, n, syn=self._syn_pending)
                self._syn_pending = False
                waited = await session._queue_data(header, view[:n]) or waited
                view = view[n:]
            if not data:
                self._check_writable()
            if waited:
                STREAK.waited()
            elif STREAK.ready(len(data)):
                # Queued without waiting: let the pass end (and the frames go) now and then.
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def _check_writable(self) -> None:
        if self._closed or self._fin_sent:
            raise trio.ClosedResourceError("stream is closed for sending")
        if self._error is not None:
            raise self._error_copy()

    async def wait_send_all_might_not_block(self) -> None:
        self._enter_send()
        try:
            while self._credit <= 0 and self._error is None and not self._closed:
                await _wait_in_slot(self, "_write_waiter")
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if not self._fin_sent:
            self._check_writable()
            self._send_fin()
        await trio.lowlevel.checkpoint()

    def _send_fin(self) -> None:
        self._fin_sent = True
        if self._error is None and not self.session._dead:
            self.session._queue_control(data_header(self.id, 0, syn=self._syn_pending, fin=True))
        self._syn_pending = False
        self.session._maybe_forget(self)

    def reset(self, code: int = ErrorCode.STREAM_CANCELLED) -> None:
        """Abandon the stream: send RST and fail both directions locally."""
        if self._closed:
            return
        self._closed = True
        if self._error is None and not (self._fin_sent and self._eof_received) and not self.session._dead:
            self.session._queue_control(encode_rst(self.id, code))
        self._on_broken(trio.ClosedResourceError("stream was reset"))
        self._discard_unread()
        self.session._forget(self)

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """:meth:`aclose` without its checkpoint (closing never waits): for a handler's last
        step, where the checkpoint was a scheduler pass of its own on every proxied connection."""
        if not self._closed:
            if not self._fin_sent and self._error is None:
                self._send_fin()
            if self._chunks and not self._eof_received and self._error is None and not self.session._dead:
                # Unread data is discarded while the peer may still be sending: like TCP, answer
                # with RST, or a peer blocked on the credit those bytes hold would wait forever.
                self.session._queue_control(encode_rst(self.id, ErrorCode.STREAM_CLOSED))
            self._closed = True
            self._discard_unread()
            self.session._forget(self)
            self._wake_both()

    def _discard_unread(self) -> None:
        """Drop unread data (the stream is closed): its bytes leave the session's budget."""
        if self._metered:
            self.session._remote_buffered -= self._window.buffered
        self._window.buffered = 0
        self._chunks = None
        if self._echo is not None:
            self._echo.pending = b""

    # ---- helpers ------------------------------------------------------------------------

    async def receive_exactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes; a short stream is a protocol error."""
        parts = []
        need = n
        while need:
            chunk = await self.receive_some(need)
            if not chunk:
                raise RemoteProtocolError(f"stream {self.id} ended after {n - need} of {n} bytes")
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)


@attrs.define(eq=False)
class _Echo:
    """State of an echoing stream (:meth:`MuxStream.echo`)."""

    unit: int
    #: ``trio.current_time()`` of the last echo (or of :meth:`MuxStream.echo`).
    last: float
    #: Received, not yet echoed (waiting for a whole unit or for the peer's credit).
    pending: bytes = b""


@attrs.define(eq=False)
class MuxSession:
    """A muxado session over ``transport``.

    Args:
        transport: the carrier; owned by the session (closed by :meth:`run` on exit).
        client: True on the agent side (odd stream ids), False on the edge (even ids).
    """

    transport: trio.abc.Stream
    client: bool
    #: Window we grant on streams created from now on; see :meth:`set_window`.
    window: int = DEFAULT_WINDOW
    #: Streams we may hold open at once (None: no limit); :meth:`open_stream` waits beyond.
    #: ngrok's Rust SDKs refuse a peer's streams past 512 per session.
    max_local_streams: int | None = None
    #: Streams the peer may hold open at once; beyond, its SYNs are refused (RST STREAM_REFUSED).
    max_remote_streams: int = MAX_REMOTE_STREAMS
    #: Receive window of streams the peer opens from now on (None: ``window``).  A peer that
    #: sends more than it before we return credit breaks the protocol and loses its session.
    remote_window: int | None = None
    #: Unread bytes all peer-opened streams together may hold (None: each stream's window only).
    max_remote_buffered: int | None = None
    #: Carrier bytes the peer may still send (None: no limit); past it the session ends.
    receive_budget: int | None = None
    #: Carrier bytes already read (the edge peeks at the first bytes to tell TLS from
    #: WebSocket): decoded before the first read, with no wrapper around the carrier for life.
    initial_data: bytes = b""
    _decoder: FrameDecoder = attrs.field(init=False)
    _streams: dict[int, MuxStream] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(init=False)
    #: Peer-opened streams for :meth:`accept_stream` (made on first use; never when :meth:`run`
    #: was given ``on_stream``, which receives them instead).
    _accept_send: Any = attrs.field(default=None, init=False)
    _accept_recv: Any = attrs.field(default=None, init=False)
    _on_stream: Callable[[MuxStream], object] | None = attrs.field(default=None, init=False)
    _pending_accept: int = attrs.field(default=0, init=False)
    _outbox: list[bytes | memoryview] = attrs.field(factory=list, init=False)
    _outbox_bytes: int = attrs.field(default=0, init=False)
    #: The writer task while it waits for frames (a slot: there is one writer).
    _writer_waiter: trio.lowlevel.Task | None = attrs.field(default=None, init=False)
    #: Made by the first task that has to wait (an idle session keeps none):
    #: data writers waiting for room in the outbox, tasks waiting for it to be written,
    #: openers waiting for a stream to end (``max_local_streams``).
    _outbox_space: trio.lowlevel.ParkingLot | None = attrs.field(default=None, init=False)
    _flushed: trio.lowlevel.ParkingLot | None = attrs.field(default=None, init=False)
    _stream_gone: trio.lowlevel.ParkingLot | None = attrs.field(default=None, init=False)
    _dead: bool = attrs.field(default=False, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _last_remote_id: int = attrs.field(default=0, init=False)
    _goaway_sent: bool = attrs.field(default=False, init=False)
    #: Peer-opened streams open now, and their unread bytes.
    _remote_open: int = attrs.field(default=0, init=False)
    #: Streams we opened that are open now (counted: ``open_stream`` checks it per call).
    _local_open: int = attrs.field(default=0, init=False)
    _remote_buffered: int = attrs.field(default=0, init=False)
    #: Set when the carrier is gone (EOF, error, GOAWAY, or :meth:`close`).
    closed: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: Why the session ended (None for a clean EOF).
    close_reason: str = attrs.field(default="", init=False)
    _send_parts: Any = attrs.field(default=None, init=False)
    #: The carrier's ``send_parts_nowait`` (BulkTLSStream), or None.
    _send_nowait: Any = attrs.field(default=None, init=False)
    #: The reader is dispatching one carrier read: frames queued meanwhile wait for its end,
    #: where the reader writes them itself if the writer is idle (see :meth:`_end_dispatch`).
    _dispatching: bool = attrs.field(default=False, init=False)
    #: The writer holds parts taken from the outbox (nobody else may write before them).
    _writing: bool = attrs.field(default=False, init=False)
    #: The carrier holds ciphertext an inline write left: the writer must flush it.
    _flush_due: bool = attrs.field(default=False, init=False)
    #: Listed for the flush at the end of the scheduler's pass (:meth:`_flush_at_pass_end`).
    _flush_queued: bool = attrs.field(default=False, init=False)
    #: Where the reader parks while the session is idle (the edge's; see ``_idlewatch``), and
    #: the socket it parked with (None: not parked).
    idle_watcher: IdleWatcher | None = attrs.field(default=None, init=False)
    parked_fd: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._decoder = FrameDecoder(max_data_frame=max(self.window, MAX_DATA_FRAME))
        # Go and Rust clients number their streams 3, 5, 7, ...; servers 2, 4, 6, ...
        self._next_id = 3 if self.client else 2
        self._send_parts = getattr(self.transport, "send_all_parts", None)
        self._send_nowait = getattr(self.transport, "send_parts_nowait", None)

    def set_window(self, window: int) -> None:
        """Use ``window`` for streams opened from now on (agreed through Auth.Extra)."""
        self.window = window
        self._decoder._max_data = max(window, MAX_DATA_FRAME)

    @property
    def is_closed(self) -> bool:
        return self._dead

    # ---- the two tasks ------------------------------------------------------------------

    async def run(self, *, on_stream: Callable[[MuxStream], object] | None = None,
                  nursery: trio.Nursery | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the reader (in this task) and the writer until the carrier ends; then break
        every stream.

        ``on_stream``, if given, is called (by the reader, so it must not block: typically a
        nursery's ``start_soon``) with each stream the peer opens, instead of queueing it for
        :meth:`accept_stream`: no accept loop and no queue per session.  ``nursery``, if given,
        runs the writer task (which ends soon after this returns), instead of a nursery of
        this call's own: one nursery fewer per session.

        ``started()`` is reported at once.  Returns normally on EOF or GOAWAY; when the peer
        broke the protocol it sends a GOAWAY and raises :class:`RemoteProtocolError` (wrapped
        in an ExceptionGroup when this call made its own nursery: catch it with ``except*``).
        """
        if nursery is None:
            async with trio.open_nursery() as own:
                task_status.started()
                del task_status  # its nursery (Nursery.start's) is not ours to keep alive
                await self.run(on_stream=on_stream, nursery=own)
                own.cancel_scope.cancel()
            return
        task_status.started()
        del task_status
        self._on_stream = on_stream
        try:
            nursery.start_soon(self._writer_task)
            try:
                await self._reader_task()
            except RemoteProtocolError as exc:
                self.close_reason = f"protocol error: {exc}"
                self._queue_control(encode_goaway(self._last_remote_id, exc.code, str(exc).encode()))
                with trio.move_on_after(1):
                    await self._wait_flushed()
                raise
        finally:
            self._on_stream = None  # often a nursery's start_soon: no cycle through it after the end
            # The writer sees the session dead and ends (or fails on the closed carrier).
            self._die(self._error or trio.BrokenResourceError(self.close_reason or "session closed"))
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(self.transport)

    async def _reader_task(self) -> None:
        decode = self._decode
        receive = self.transport.receive_some
        # A carrier that lends its plaintext (BulkTLSStream) is decoded in place: the frames'
        # payloads are the only copies made of what it received.
        receive_with = getattr(self.transport, "receive_with", None)
        pending, self.initial_data = self.initial_data, b""
        events: list[Event] | None
        while True:
            try:
                if pending:
                    events, pending = decode(pending), b""
                elif receive_with is not None:
                    events = None
                    watcher = self.idle_watcher
                    if watcher is not None and self._idle():
                        fd = self.transport.socket_fileno()  # type: ignore[attr-defined]
                        if fd is not None:
                            # Heartbeats are answered there; back with frames, or None: read.
                            events = await watcher.park(self, fd)
                    if events is None:
                        events = await receive_with(decode, READ_SIZE)
                else:
                    events = decode(await receive(READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not self._dead:
                    self.close_reason = self.close_reason or f"carrier failed: {exc}"
                return
            if events is None:
                self.close_reason = self.close_reason or "peer closed the connection"
                return
            woken, last = 0, -1
            self._dispatching = True
            try:
                for event in events:
                    if type(event) is Data:
                        self._on_data(event)
                        if event.stream_id != last:
                            last = event.stream_id
                            woken += 1
                            if woken == DISPATCH_SLICE:
                                # Let the streams woken so far run (and answer) before the rest.
                                woken = 0
                                self._end_dispatch()
                                await trio.lowlevel.checkpoint()
                                if self._dead:  # closed meanwhile: the rest has nowhere to go
                                    return
                                self._dispatching = True
                    elif type(event) is WindowUpdate:
                        stream = self._streams.get(event.stream_id)
                        if stream is not None:
                            stream._on_credit(event.increment)
                    elif type(event) is Reset:
                        stream = self._streams.get(event.stream_id)
                        if stream is not None:
                            self._forget(stream)
                            stream._on_broken(StreamReset(event.code))
                    elif type(event) is GoAway:
                        self.close_reason = f"peer went away ({_code_name(event.code)})"
                        if event.debug:
                            self.close_reason += f": {event.debug.decode('utf-8', 'replace')[:200]}"
                        return
            finally:
                self._end_dispatch()
            events = None  # not kept while the reader waits

    def _idle(self) -> bool:
        """No stream open but an echoing one (the heartbeat): the reader may park."""
        streams = self._streams
        if len(streams) > 1 or self._dead or self.receive_budget is not None:
            return False
        return not streams or next(iter(streams.values()))._echo is not None

    def dispatch_echoes(self, events: list[Event]) -> bool:
        """Dispatch ``events`` as the reader would, if they are only data for echoing streams
        (and credit): the parked reader's :class:`IdleWatcher` answers heartbeats so.  False,
        doing nothing, when anything else came (the reader dispatches it)."""
        streams = self._streams
        for event in events:
            if type(event) is Data:
                stream = streams.get(event.stream_id)
                if stream is None or stream._echo is None or event.syn or event.fin:
                    return False
            elif type(event) is not WindowUpdate or event.stream_id not in streams:
                return False
        self._dispatching = True
        try:
            for event in events:
                if type(event) is Data:
                    self._on_data(event)
                else:
                    streams[event.stream_id]._on_credit(event.increment)  # type: ignore[union-attr]
        finally:
            self._end_dispatch()
        return True

    def _decode(self, data: bytes | bytearray | memoryview) -> list[Event] | None:
        """The frames one carrier read completes; None at end of stream.  Keeps no reference
        to ``data`` (see :meth:`BulkTLSStream.receive_with`)."""
        if not data:
            return None
        if self.receive_budget is not None:
            # One check per carrier read, not per frame.
            self.receive_budget -= len(data)
            if self.receive_budget < 0:
                raise RemoteProtocolError("peer sent more than it may at this point of the session",
                                          code=ErrorCode.ENHANCE_YOUR_CALM)
        return self._decoder.receive_data(data)

    def _end_dispatch(self) -> None:
        """After dispatching frames: write what they queued (echoes, credit, resets) from this
        task if the writer is idle, else wake it."""
        self._dispatching = False
        self._flush_inline()

    def _flush_inline(self) -> bool:
        """Write the outbox now, without waiting, if the writer is idle and the carrier takes it
        at once; else leave it to the writer.  True if a task was woken (the writer, or tasks
        waiting for room in the outbox or for it to be written)."""
        if not self._outbox or self._dead:
            return False
        woke = False
        if not self._writing and self._send_nowait is not None:
            sent = self._send_nowait(self._outbox)
            if sent is not None:
                self._outbox = []
                self._outbox_bytes = 0
                if self._outbox_space:
                    woke = bool(self._outbox_space.unpark_all())
                if sent:
                    if self._flushed:
                        woke = bool(self._flushed.unpark_all()) or woke
                    return woke
                self._flush_due = True  # the writer sends the rest
        return self._wake_writer() or woke

    def _flush_at_pass_end(self) -> None:
        """Have the outbox written when the scheduler's current pass ends (see
        :class:`_PassEndFlush`) rather than by the writer task woken for it: one task step,
        and at low load one scheduler pass, fewer per flush."""
        if self._send_nowait is None or self._writing or self._outbox_bytes > PASS_END_FLUSH_MAX:
            self._wake_writer()
            return
        if self._flush_queued:
            return
        self._flush_queued = True
        _pass_end_flush().due.append(self)

    def _wake_writer(self) -> bool:
        if self._writer_waiter is not None:
            _wake_slot(self, "_writer_waiter")
            return True
        return False

    def _on_data(self, event: Data) -> None:
        sid = event.stream_id
        stream = self._streams.get(sid)
        if event.syn:
            refusal = admit_syn(sid, we_are_client=self.client, already_open=stream is not None,
                                goaway_sent=self._goaway_sent, remote_open=self._remote_open,
                                max_remote_open=self.max_remote_streams, open_total=len(self._streams),
                                max_open_total=MAX_REMOTE_STREAMS, pending_accept=self._pending_accept,
                                accept_backlog=ACCEPT_BACKLOG)
            self._last_remote_id = max(self._last_remote_id, sid)
            if refusal is not None:
                self._queue_control(encode_rst(sid, refusal))
                return
            stream = MuxStream(self, sid, self.window, ReceiveWindow(self.remote_window or self.window),
                               remote=True, metered=self.max_remote_buffered is not None)
            self._streams[sid] = stream
            self._remote_open += 1
            if self._on_stream is not None:
                self._on_stream(stream)
            else:
                self._pending_accept += 1
                self._accept_channel()[0].send_nowait(stream)
        elif stream is None:
            reply = orphan_frame_reply(bool(event.data))
            if reply is not None:
                self._queue_control(encode_rst(sid, reply))
            return
        stream._on_data(event.data, event.fin)
        if event.fin:
            self._maybe_forget(stream)

    async def _writer_task(self) -> None:
        send_parts = self._send_parts
        send_all = self.transport.send_all
        while True:
            while not self._outbox and not self._flush_due:
                if self._flushed:
                    self._flushed.unpark_all()
                if self._dead:
                    return
                await _wait_in_slot(self, "_writer_waiter")
            if self._dead:
                return
            parts = self._outbox
            self._outbox = []
            self._outbox_bytes = 0
            self._flush_due = False
            if self._outbox_space:
                self._outbox_space.unpark_all()
            self._writing = True
            try:
                if send_parts is not None:
                    await send_parts(parts)
                elif len(parts) == 1:
                    await send_all(parts[0])
                else:
                    await send_all(b"".join(parts))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.close_reason = self.close_reason or f"carrier failed while writing: {exc}"
                self._die(trio.BrokenResourceError(self.close_reason))
                # Wake the reader too: nothing more can be exchanged.
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.transport)
                return
            finally:
                self._writing = False
            del parts  # not kept while the writer waits (an idle session's last reply)

    async def _wait_flushed(self) -> None:
        while (self._outbox or self._flush_due) and not self._dead:
            if self._flushed is None:
                self._flushed = trio.lowlevel.ParkingLot()
            await self._flushed.park()

    # ---- queueing -----------------------------------------------------------------------

    def _queue_control(self, frame: bytes) -> None:
        if self._dead:
            return
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if not self._dispatching:
            self._flush_at_pass_end()

    async def _queue_data(self, header: bytes, payload: memoryview) -> bool:
        """Queue one DATA frame, first waiting for room in the outbox; True if it waited."""
        waited = False
        while self._outbox_bytes >= OUTBOX_LIMIT and not self._dead:
            waited = True
            if self._outbox_space is None:
                self._outbox_space = trio.lowlevel.ParkingLot()
            await self._outbox_space.park()
        if self._dead:
            raise trio.BrokenResourceError(self.close_reason or "session closed")
        self._outbox.append(header)
        self._outbox.append(payload)
        self._outbox_bytes += len(header) + len(payload)
        self._flush_at_pass_end()
        return waited

    # ---- streams ------------------------------------------------------------------------

    async def open_stream(self, initial: bytes = b"") -> MuxStream:
        """Open a new stream; ``initial`` bytes travel in its SYN frame.

        Typed streams must carry their 4-byte type (and, for proxy streams, the header) in
        the SYN frame: Go clients read the type with a single Read (reference §2.3).
        """
        if self.max_local_streams is not None:
            while self.local_stream_count >= self.max_local_streams and not self._dead:
                if self._stream_gone is None:
                    self._stream_gone = trio.lowlevel.ParkingLot()
                await self._stream_gone.park()
        if self._dead:
            raise trio.BrokenResourceError(self.close_reason or "session closed")
        sid = self._next_id
        self._next_id += 2
        stream = MuxStream(self, sid, self.window, ReceiveWindow(self.window), syn_pending=True)
        self._streams[sid] = stream
        self._local_open += 1
        if initial:
            await stream.send_all(initial)
        return stream

    async def accept_stream(self) -> MuxStream:
        """The next stream the peer opened; raises ``trio.EndOfChannel`` once the session ended."""
        stream: MuxStream = await self._accept_channel()[1].receive()
        self._pending_accept -= 1
        return stream

    def _accept_channel(self) -> tuple[Any, Any]:
        if self._accept_send is None:
            self._accept_send, self._accept_recv = trio.open_memory_channel[MuxStream](math.inf)
            if self._dead:
                self._accept_send.close()
        return self._accept_send, self._accept_recv

    def _maybe_forget(self, stream: MuxStream) -> None:
        if stream._fin_sent and stream._eof_received:
            self._forget(stream)

    def _forget(self, stream: MuxStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            if stream._remote:
                self._remote_open -= 1
            else:
                self._local_open -= 1
                if self._stream_gone:
                    # As many waiting openers as there is room for, not all: thousands may
                    # queue.  Room left by one woken and then cancelled is handed on next time.
                    room = (self.max_local_streams or 0) - self._local_open
                    self._stream_gone.unpark(count=max(1, room))

    def _on_remote_buffered(self, n: int) -> None:
        self._remote_buffered += n
        if self.max_remote_buffered is not None and self._remote_buffered > self.max_remote_buffered:
            raise RemoteProtocolError(f"peer left more than {self.max_remote_buffered} bytes unread on the "
                                      "streams it opened", code=ErrorCode.ENHANCE_YOUR_CALM)

    @property
    def remote_stream_count(self) -> int:
        """Open streams that the peer opened (on the edge: the agent's control streams)."""
        return self._remote_open

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def local_stream_count(self) -> int:
        """Open streams that we opened (on the edge: proxied public connections)."""
        return self._local_open

    # ---- shutdown -----------------------------------------------------------------------

    def _die(self, exc: BaseException) -> None:
        if self._dead:
            return
        self._dead = True
        self._error = exc
        if self.parked_fd is not None and self.idle_watcher is not None:
            self.idle_watcher.unpark(self)  # before the carrier closes: the reader ends itself
        if self._accept_send is not None:
            self._accept_send.close()
        for stream in list(self._streams.values()):
            stream._on_broken(exc)
        self._streams.clear()
        self._remote_open = self._local_open = 0
        for lot in (self._outbox_space, self._flushed, self._stream_gone):
            if lot:
                lot.unpark_all()
        self._wake_writer()
        self.closed.set()

    async def go_away(self, code: int = ErrorCode.NONE, debug: str = "") -> None:
        """Tell the peer we are ending (GOAWAY) and refuse new streams; existing ones go on."""
        if self._goaway_sent or self._dead:
            return
        self._goaway_sent = True
        self._queue_control(encode_goaway(self._last_remote_id, code, debug.encode()))
        with trio.move_on_after(2):
            await self._wait_flushed()

    async def aclose(self) -> None:
        """Close the carrier now; every stream breaks."""
        self.close_reason = self.close_reason or "closed locally"
        self._die(trio.BrokenResourceError(self.close_reason))
        await trio.aclose_forcefully(self.transport)



async def _wait_in_slot(owner: Any, slot: str) -> None:
    """Park the current task in ``owner.<slot>`` until :func:`_wake_slot` or cancellation.

    A one-task ParkingLot: the slot is the only record of the waiter (no queue object), for
    waits that have one task at most by construction (one receiver, one sender, one writer).
    """
    assert getattr(owner, slot) is None, f"{slot} already has a waiting task"
    setattr(owner, slot, trio.lowlevel.current_task())

    def abort(_: Any) -> trio.lowlevel.Abort:
        setattr(owner, slot, None)
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


def _wake_slot(owner: Any, slot: str) -> None:
    """Reschedule the task waiting in ``owner.<slot>``, if any."""
    task = getattr(owner, slot)
    if task is not None:
        setattr(owner, slot, None)
        trio.lowlevel.reschedule(task)


class _PassEndFlush(trio.abc.Instrument):
    """Writes the outboxes of sessions that queued frames during a scheduler pass, at its end.

    Trio calls ``before_io_wait`` after running every task that was runnable, just before it
    polls for I/O: every frame the pass queued is there, so one write carries them all (as
    the writer task did), but no task is woken to make it.  What cannot be written at once
    (the carrier is busy or full) goes to the writer task, as outboxes over
    ``PASS_END_FLUSH_MAX`` do straight away.  An exception here would make Trio drop the
    instrument, so none escapes.
    """

    def __init__(self) -> None:
        self.due: list[MuxSession] = []

    def before_io_wait(self, timeout: float) -> None:
        due, self.due = self.due, []
        woke = False
        for session in due:
            session._flush_queued = False
            try:
                woke = session._flush_inline() or woke
            except Exception:  # noqa: BLE001 - the writer meets the same failure in a task
                session._flush_due = True
                woke = session._wake_writer() or woke
        if woke and timeout > 0:
            # The loop chose to sleep before we made tasks runnable: wake it.
            trio.lowlevel.current_trio_token().run_sync_soon(_nothing)


def _nothing() -> None:
    pass


_PASS_END: trio.lowlevel.RunVar[_PassEndFlush] = trio.lowlevel.RunVar("tunneld_mux_pass_end")


def _pass_end_flush() -> _PassEndFlush:
    """This run's :class:`_PassEndFlush`, installed on first use."""
    try:
        return _PASS_END.get()
    except LookupError:
        flusher = _PassEndFlush()
        trio.lowlevel.add_instrument(flusher)
        _PASS_END.set(flusher)
        return flusher
