"""Streams that skip the scheduler when they need not wait: trio's semantics, fewer trips.

trio's streams yield to the scheduler after every send or receive, even one that completed at
once, and ``trio.SocketStream`` wraps each call in a context manager and a conflict detector.
A proxied HTTP request does one receive and one send on the public socket, on the mux stream
and on the upstream socket: at ~10k requests/s those trips were about a tenth of the edge's and
the agent's CPU (py-spy, cProfile; scheduler steps per request 5.5 -> 1.5 on the edge).

Here every call still checks for cancellation first, as trio does (a cancelled call does
nothing).  A call that had to wait has yielded; one that completed at once yields if it moved
:data:`BULK_BYTES` or more, and otherwise only every :data:`YIELD_EVERY` such calls in a row
in the same task (:class:`ReadyStreak`), so a busy task cannot hold the others back for long.
A yield after the operation is shielded, as in trio: the bytes are already consumed or sent,
so the call must not fail with ``Cancelled``.
"""

from __future__ import annotations

import errno
import operator
import os
import sys
from collections.abc import Sequence

import trio
from trio.lowlevel import current_task

__all__ = ["LeanSocketStream", "ReadyStreak", "STREAK", "aclose_at_once", "close_forcefully", "close_now",
           "lean", "YIELD_EVERY"]

#: Calls in a row that completed without waiting before the task yields anyway.
YIELD_EVERY = 8
#: A call that moved at least this many bytes yields at once, as in trio: next to the bytes
#: moved the trip is cheap, and bulk transfers keep the scheduling they were tuned with.
BULK_BYTES = 16384
#: Bytes asked for when the caller gives no ``max_bytes`` (trio's default).
DEFAULT_RECEIVE_SIZE = 65536
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})
#: Pieces one ``writev`` may take (POSIX's minimum for IOV_MAX is 16; Linux allows 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


class ReadyStreak:
    """Counts the calls in a row that completed without waiting; see the module docstring.

    One for the process (:data:`STREAK`), following the task that made the last such call: a
    call from another task starts the count afresh.  That is the per-task rule, since a task
    cannot lose the CPU between two of its calls without yielding, and it is kept without a
    context variable lookup per call.  Counting per task, not per stream, matters: a relay that
    reads a socket and waits for the mux in turn has yielded on every round, and must not be
    made to yield again because one of its streams alone kept being ready.
    """

    __slots__ = ("count", "task_id")

    def __init__(self) -> None:
        self.count = 0
        #: ``id()`` of the task counted: a reference would keep a finished task alive.  (An id
        #: reused by a new task only makes that task yield a little early.)
        self.task_id = 0

    def ready(self, nbytes: int) -> bool:
        """Count a call that did not wait; True when it must yield (shielded) now: it moved
        BULK_BYTES or more, or it is the YIELD_EVERY-th in a row."""
        task_id = id(current_task())
        if task_id != self.task_id:
            self.task_id = task_id
            self.count = 1
        else:
            self.count += 1
        if self.count >= YIELD_EVERY or nbytes >= BULK_BYTES:
            self.count = 0
            return True
        return False

    def waited(self) -> None:
        """The operation waited (and so yielded): start counting afresh."""
        self.count = 0
        self.task_id = 0  # whoever calls next starts at 1


#: The process's streak (Trio runs one task at a time).
STREAK = ReadyStreak()


def checked_max_bytes(max_bytes: int | None) -> int | None:
    """trio's contract for ``receive_some(max_bytes)``: an integer >= 1, or None.

    A non-integer is a TypeError, < 1 a ValueError (0 would return b"", which reads as EOF).
    """
    if max_bytes is None:
        return None
    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class LeanSocketStream(trio.abc.HalfCloseableStream):
    """Wraps a connected ``trio.SocketStream``; closing, half-closing and options go to it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        #: The stdlib socket inside trio's (one call less per ``fileno()``).
        self._raw = getattr(stream.socket, "_sock", stream.socket)
        self._receiving = False
        self._sending = False

    def _fileno(self) -> int:
        # Looked up on every call, never cached: once the socket is closed its number may
        # already belong to another connection.
        fd: int = self._raw.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this socket was already closed")
        return fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = checked_max_bytes(max_bytes) or DEFAULT_RECEIVE_SIZE
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                try:
                    data = os.read(self._fileno(), max_bytes)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _stream_error(exc) from exc
                else:
                    if waited:
                        STREAK.waited()
                    elif STREAK.ready(len(data)):
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                waited = True
                await trio.lowlevel.wait_readable(self.socket)
        finally:
            self._receiving = False

    def read_into_nowait(self, buf: memoryview) -> int | None:
        """Read what the socket holds into ``buf`` now: the byte count (0 at end of stream), or
        None if nothing is there yet (then :meth:`wait_readable`).

        For a caller that uses ``buf`` before it next yields (the TLS layer reads into a buffer
        shared by all connections); it yields itself, as :meth:`receive_some` would.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        try:
            return os.readv(self._fileno(), (buf,))
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def wait_readable(self) -> None:
        """Wait until the socket has data or end of stream (or is closed)."""
        await trio.lowlevel.wait_readable(self.socket)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._fileno()  # even an empty send fails on a closed socket
            if self.socket.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            waited = False
            with memoryview(data) as view:
                sent, total = 0, len(view)
                while sent < total:
                    try:
                        sent += os.write(self._fileno(), view[sent:])
                    except BlockingIOError:
                        waited = True
                        await trio.lowlevel.wait_writable(self.socket)
                    except OSError as exc:
                        raise _stream_error(exc) from exc
            if waited:
                STREAK.waited()
            elif STREAK.ready(total):
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_all_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Like ``send_all(b"".join(parts))``, without the join: one ``writev`` for up to
        IOV_MAX of them."""
        if len(parts) == 1:
            await self.send_all(parts[0])
            return
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._fileno()
            if self.socket.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            views = [memoryview(p) for p in parts]
            total = sum(map(len, views))
            waited = False
            i = 0
            while i < len(views):
                try:
                    n = os.writev(self._fileno(), views[i : i + _IOV_MAX])
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_writable(self.socket)
                    continue
                except OSError as exc:
                    raise _stream_error(exc) from exc
                # Skip what went out: whole pieces, then the front of a partly sent one.
                while i < len(views) and n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                if n:
                    views[i] = views[i][n:]
            if waited:
                STREAK.waited()
            elif STREAK.ready(total):
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without waiting: the byte count (0 if none).

        For a caller that owns the sending side at this moment (raises BusyResourceError
        while a ``send_all`` is in progress).
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        try:
            return os.write(self._fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await self.stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.stream.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        return self.stream.getsockopt(level, option, buffersize)


def lean(stream: trio.abc.Stream) -> trio.abc.Stream:
    """``stream`` as a :class:`LeanSocketStream` if it is a plain socket stream, else unchanged.

    Not on Windows, where a socket is not a file descriptor that ``os.read`` could use.
    """
    if type(stream) is trio.SocketStream and sys.platform != "win32":
        return LeanSocketStream(stream)
    return stream


def close_now(stream: object) -> bool:
    """Close ``stream`` at once, without a checkpoint, when closing it never waits: a plain
    socket stream (trio's or lean), or a stream with a ``close_now()`` method (the mux's
    streams).  False, doing nothing, for any other stream.
    """
    if type(stream) is LeanSocketStream:
        stream = stream.stream
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return True
    close = getattr(stream, "close_now", None)
    if close is None:
        return False
    close()
    return True


async def aclose_at_once(stream: trio.abc.AsyncResource) -> None:
    """``await stream.aclose()``, done at once (no checkpoint) where :func:`close_now` can: a
    relay's last close of its mux stream was otherwise a scheduler pass of its own."""
    if not close_now(stream):
        await stream.aclose()


async def close_forcefully(stream: trio.abc.AsyncResource) -> None:
    """``trio.aclose_forcefully(stream)``, done at once (no checkpoint) where :func:`close_now`
    can.

    ``aclose_forcefully`` runs the close inside a cancelled scope, so its checkpoint raises
    ``Cancelled`` and catches it again: ~30 µs more than the socket's close, paid for every
    proxied connection on the edge and on the agent.
    """
    if not close_now(stream):
        await trio.aclose_forcefully(stream)
