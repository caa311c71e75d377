"""Reading a served file in chunks without blocking the event loop.

A chunk is first read with ``preadv(…, RWF_NOWAIT)`` (Linux ≥ 4.14): the kernel copies what
the page cache holds and answers EAGAIN rather than wait for the disk.  Only a miss costs a
worker thread.  The hop is worth avoiding: through the tunnel, a thread per 256 KiB chunk
nearly doubled the agent's CPU per byte (bench/file_server.py), and shared folders are mostly
read warm.  Elsewhere (no RWF_NOWAIT, or a filesystem refusing it) every read takes a thread.
"""

from __future__ import annotations

import errno
import os

import trio

__all__ = ["FileReader"]

_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def _pread(fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: the descriptor belongs to one request only
    return os.read(fd, n)


class FileReader:
    """Positional reads of one open file descriptor (not closed here)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._nowait = bool(_NOWAIT) and hasattr(os, "preadv")

    async def read(self, offset: int, n: int) -> bytes | bytearray:
        """Up to ``n`` bytes at ``offset``; empty at the end of the file.  Raises OSError."""
        if self._nowait:
            buf = bytearray(n)
            try:
                got = os.preadv(self.fd, [buf], offset, _NOWAIT)
            except BlockingIOError:
                got = 0  # not cached: read it in a thread below
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # this filesystem cannot: stop trying
                got = 0
            if got:
                # a cancellation point; the caller's send is the schedule point
                await trio.lowlevel.checkpoint_if_cancelled()
                if got < n:
                    del buf[got:]
                return buf
        return await trio.to_thread.run_sync(_pread, self.fd, n, offset)
