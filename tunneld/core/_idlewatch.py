"""One task that keeps watch over the edge's idle agent sessions and answers their heartbeats.

An idle session (no proxied stream open) still gets a muxado heartbeat every 10 s.  Served by
the session's own reader, each one resumed and suspended the reader's whole coroutine stack
(about a dozen frames, cold in memory with thousands of sessions), re-armed trio's one-shot
epoll registration and ended in a read that failed with EAGAIN: ~160 Python calls per
heartbeat, 1.0-1.2 % of a core per 1,000 sessions at 3,000 (issue 17's target is 1 %).  Here
it is one ``os.read``, one ``SSL_read`` and the echo's write: 0.63-0.90 % in the same window
(``bench/many_agents.py``, A/B).

A session's reader that is about to wait with nothing buffered and no stream but its echoing
heartbeat *parks* here instead (:meth:`IdleWatcher.park`): its socket joins this watcher's own
level-triggered epoll set, and this task reads it when it becomes readable, decrypts and
decodes what came (the session's own TLS engine and frame decoder) and, when that is only
heartbeat data, echoes it (the session's reader code, :meth:`MuxSession.dispatch_echoes`)
without waking the reader.  Anything else — another frame, end of stream, an error, a TLS
message the engine must answer — goes back to the reader, which resumes where it would have
resumed anyway, with the frames already decoded; a record split across reads is completed here.

The reader stays in its own task and nursery (cancelling it unparks it); a session that is
closed from outside unparks its reader first (``MuxSession._die``).  Linux only (epoll): on
other systems the watcher never runs and readers read for themselves, as they always did.
"""

from __future__ import annotations

import os
import select
from typing import Any, Protocol

import outcome
import trio

__all__ = ["IdleWatcher"]

#: Ciphertext read per readable parked socket: a heartbeat is one 34-byte record; more than
#: this means traffic, which the session's reader takes over.
READ_SIZE = 16 * 1024 + 512
#: Sockets served per pass before the watcher lets other tasks run.
BATCH = 512


class MuxSession(Protocol):
    """What the watcher uses of a parked reader's session (``_mux.MuxSession``)."""

    parked_fd: int | None
    #: A BulkTLSStream (it gave the reader its ``socket_fileno()``).
    transport: Any

    def _decode(self, data: memoryview) -> Any: ...

    def dispatch_echoes(self, events: Any) -> bool: ...


class IdleWatcher:
    """Serves the sockets of parked session readers; run :meth:`run` in a nursery."""

    def __init__(self) -> None:
        #: Made by :meth:`run` (an edge that never runs holds no descriptor for it).
        self._epoll: select.epoll | None = None
        #: fd -> (session, its parked reader task).
        self._parked: dict[int, tuple[MuxSession, trio.lowlevel.Task]] = {}
        self.running = False
        #: Heartbeats answered without waking a reader; readers handed back (for tests and stats).
        self.answered = 0
        self.handed_back = 0

    @property
    def parked(self) -> int:
        return len(self._parked)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not hasattr(select, "epoll"):
            return  # not Linux: nobody parks
        self._epoll = epoll = select.epoll()
        self.running = True
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _events in epoll.poll(0, BATCH):
                    entry = self._parked.get(fd)
                    if entry is not None:
                        self._serve(fd, *entry)
        finally:
            self.running = False
            # Every reader still parked goes back to waiting on its own.
            for fd in list(self._parked):
                self._hand_back(fd, outcome.Value(None))
            self._epoll = None
            epoll.close()

    async def park(self, session: MuxSession, fd: int) -> Any:
        """Park the calling reader of ``session`` (socket ``fd``) until its socket brings more
        than heartbeats.  Returns the decoded frames for the reader to dispatch, or None: read
        the carrier as usual (end of stream, close_notify, a TLS message to answer, the session
        closing, the watcher stopping).  Errors the watcher met reading are raised here."""
        if not self.running:
            await trio.lowlevel.checkpoint()
            return None
        if fd in self._parked:
            # A socket closed without its session's knowledge, its number now reused: that
            # reader goes back to find its carrier closed.
            self._hand_back(fd, outcome.Value(None))
        epoll = self._epoll
        assert epoll is not None  # running
        try:
            epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        except FileExistsError:  # the old description lives on elsewhere (a dup)
            epoll.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._parked[fd] = (session, trio.lowlevel.current_task())
        session.parked_fd = fd

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._forget(fd, session)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def unpark(self, session: MuxSession) -> None:
        """Send ``session``'s parked reader back to its carrier (the session is closing)."""
        fd = session.parked_fd
        if fd is not None and self._parked.get(fd, (None,))[0] is session:
            self._hand_back(fd, outcome.Value(None))

    def _forget(self, fd: int, session: MuxSession) -> None:
        del self._parked[fd]
        session.parked_fd = None
        if self._epoll is None:
            return
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # closed meanwhile: the kernel dropped it already
            pass

    def _hand_back(self, fd: int, result: outcome.Outcome[Any]) -> None:
        session, task = self._parked[fd]
        self._forget(fd, session)
        self.handed_back += 1
        trio.lowlevel.reschedule(task, result)

    def _serve(self, fd: int, session: MuxSession, task: trio.lowlevel.Task) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._hand_back(fd, outcome.Value(None))  # the reader reads the error itself
            return
        if not data:
            self._hand_back(fd, outcome.Value(None))
            return
        tls = session.transport
        try:
            events = tls.decrypt_nowait(data, session._decode)
        except Exception as exc:  # the reader raises it as if it had read it itself
            self._hand_back(fd, outcome.Error(exc))
            return
        if tls.socket_fileno() is None:
            # The engine wants the reader: a close_notify to find, a TLS message to answer
            # (KeyUpdate), a session closed by what was dispatched.
            self._hand_back(fd, outcome.Value(events))
        elif events is None:
            pass  # a record still incomplete: wait for the rest here
        elif len(data) < READ_SIZE and session.dispatch_echoes(events):
            self.answered += 1
        else:
            self._hand_back(fd, outcome.Value(events))
