"""The file server: an HTTP tunnel's requests answered by the agent from a local folder or file.

Theory of operation
-------------------
The http plugin hands each public connection's stream here (it is plain HTTP/1.x, already
routed by the edge).  :meth:`FileServer.serve` reads request heads with the relay's
:class:`Reader` and httptools-based parser, and answers them one at a time, keeping the
connection alive as HTTP/1.0 and 1.1 allow.  Per request:

* the filesystem work (sanitise, resolve, open, stat or scandir) is one blocking call,
  :meth:`FileServer.lookup`, run in a worker thread so a slow disk never stalls the agent;
* the answer (validators, 304, ranges, 416) is decided by the pure functions of ``_http``;
* a body is sent in 256 KiB chunks (``_reading``: from the page cache inline, from the disk
  in a worker thread), so a large file is never held in memory.

Only GET and HEAD are served (405 otherwise).  A directory URL without its trailing slash is
redirected (301) so relative links in listings work; a directory with an ``index.html``
serves that file (as Go's ``http.FileServer``, which ngrok uses), otherwise a listing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING

import attrs
import trio

from tunneld.http1 import BadMessage, BodyKind, Reader, RequestHead, Truncated, copy_body, parse_request_head
from tunneld.plugin import CHUNK

from ._http import content_type, decide, request_headers, response_head, text_response
from ._listing import LISTING_HEADERS, render, scan
from ._paths import contain, split_target, url_path
from ._reading import FileReader
from ._url import parse_file_url

if TYPE_CHECKING:
    from tunneld.plugin import proto

__all__ = ["FileServer"]

log = logging.getLogger("tunneld.file")

#: A request body (to a file server, an odd thing) up to this size is read and dropped so the
#: connection can carry the next request; a bigger one closes the connection instead.
MAX_DISCARD = 1024 * 1024

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
               # never follow a symlink swapped in after the containment check; never block
               # opening a FIFO that replaced a regular file
               | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
_NOSNIFF = ("X-Content-Type-Options", "nosniff")


# ---- what a lookup finds -----------------------------------------------------------------------


@attrs.frozen
class Opened:
    """A regular file, open; whoever receives it closes ``fd``."""

    fd: int
    size: int
    mtime_ns: int
    #: The name its Content-Type is guessed from.
    name: str


@attrs.frozen
class Page:
    body: bytes


@attrs.frozen
class Redirect:
    location: str


@attrs.frozen
class Refused:
    status: int
    reason: str


Found = Opened | Page | Redirect | Refused
_NOT_FOUND = Refused(404, "not found")


class _Discard(trio.abc.SendStream):
    """A sink for request bodies, refusing more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.left -= len(data)
        if self.left < 0:
            raise Truncated("request body too large to discard")
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class FileServer:
    """Serves ``root``: a directory (listings, files below it) or one regular file."""

    #: Normalised address, shown as the tunnel's upstream: ``file:///srv/share``.
    url: str
    #: Real path (symlinks resolved) of the directory or file served.
    root: str
    is_dir: bool

    @classmethod
    def from_url(cls, url: str) -> FileServer:
        """Check that ``url`` names an existing, readable directory or file on this machine.

        Raises:
            ValueError: with a message for the user (bad URL, missing path, permissions).
        """
        path = parse_file_url(url)
        if isinstance(path, PureWindowsPath) and os.name != "nt":
            raise ValueError(f"{url!r} is a Windows path; it cannot be served on this system")
        try:
            real = os.path.realpath(path, strict=True)
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise ValueError(f"cannot serve {path}: {exc.strerror or exc}") from None
        if stat.S_ISDIR(mode):
            readable = os.access(real, os.R_OK | os.X_OK)
        elif stat.S_ISREG(mode):
            readable = os.access(real, os.R_OK)
        else:
            raise ValueError(f"cannot serve {path}: neither a directory nor a regular file")
        if not readable:
            raise ValueError(f"cannot serve {path}: permission denied")
        return cls(Path(real).as_uri(), real, stat.S_ISDIR(mode))

    # ---- filesystem (blocking: runs in a worker thread) ----

    def lookup(self, target: bytes) -> Found:
        """What the request target names under the root."""
        split = split_target(target)
        if split is None:
            return _NOT_FOUND
        segments, trailing = split
        if not self.is_dir:
            name = os.path.basename(self.root)
            if not segments or (segments == [name] and not trailing):
                return self._open(self.root, name)
            return _NOT_FOUND
        real = contain(self.root, segments)
        if real is None:
            return _NOT_FOUND
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return _NOT_FOUND
        if not stat.S_ISDIR(mode):
            # "/file.txt/" names a directory that is not there
            return _NOT_FOUND if trailing else self._open(real, segments[-1])
        if segments and not trailing:
            query = target.split(b"#", 1)[0].partition(b"?")[2].decode("latin-1")
            return Redirect(url_path(segments, True) + (f"?{query}" if query else ""))
        index = contain(self.root, [*segments, "index.html"])
        if index is not None:
            found = self._open(index, "index.html")
            if isinstance(found, Opened):
                return found
        try:
            entries = scan(self.root, real)
        except OSError as exc:
            return Refused(403, "forbidden") if exc.errno == errno.EACCES else _NOT_FOUND
        return Page(render(url_path(segments, True), entries, at_root=not segments))

    @staticmethod
    def _open(real: str, name: str) -> Found:
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except PermissionError:
            return Refused(403, "forbidden")
        except OSError:
            return _NOT_FOUND
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return _NOT_FOUND
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return _NOT_FOUND
        return Opened(fd, st.st_size, st.st_mtime_ns, name)

    # ---- HTTP (trio) ----

    async def serve(self, stream: trio.abc.HalfCloseableStream, header: proto.ProxyHeader,
                    request_done: Callable[[float], None] | None = None) -> None:
        """Answer the requests of one public connection until either side ends it.

        ``request_done`` is called with each request's duration (the tunnel's metrics).  The
        caller closes ``stream``; a broken stream raises trio's BrokenResourceError.
        """
        client = Reader(stream)
        while True:
            try:
                raw = await client.read_head()
                if raw is None:
                    return
                req = parse_request_head(raw)
            except BadMessage as exc:
                await client.send_all(text_response(exc.status, str(exc), keep_alive=False, http10=False,
                                                    head_only=False))
                return
            started = time.monotonic()
            keep = await self._answer(client, req)
            if request_done is not None:
                request_done(time.monotonic() - started)
            if not keep:
                return

    async def _answer(self, client: Reader, req: RequestHead) -> bool:
        """Answer one request; True if the connection may carry another."""
        keep = req.keep_alive and not req.upgrade and await self._discard_body(client, req)
        http10 = req.version == "1.0"
        head_only = req.method == b"HEAD"

        def text(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> bytes:
            return text_response(status, message, keep_alive=keep, http10=http10, head_only=head_only,
                                 extra=extra)

        if req.method not in (b"GET", b"HEAD"):
            await client.send_all(text(405, "only GET and HEAD are served", [("Allow", "GET, HEAD")]))
            return keep
        found = await trio.to_thread.run_sync(self.lookup, req.target)
        if isinstance(found, Opened):
            # no checkpoint between the lookup and this try: the descriptor is always closed
            try:
                keep = await self._send_file(client, req, found, keep, http10, head_only)
            finally:
                os.close(found.fd)
            status = "file"
        elif isinstance(found, Page):
            await client.send_all(response_head(200, LISTING_HEADERS, len(found.body), keep_alive=keep,
                                                http10=http10) + (b"" if head_only else found.body))
            status = "listing"
        elif isinstance(found, Redirect):
            await client.send_all(text(301, found.location, [("Location", found.location)]))
            status = "301"
        else:
            await client.send_all(text(found.status, found.reason))
            status = str(found.status)
        log.debug("%s %r: %s", req.method.decode("latin-1"), req.target, status)
        return keep

    @staticmethod
    async def _discard_body(client: Reader, req: RequestHead) -> bool:
        """Read and drop a request body; False if the connection cannot be reused after it."""
        if req.body == BodyKind.NONE:
            return True
        if req.expect_continue or req.body == BodyKind.UNTIL_CLOSE or (
                req.body == BodyKind.LENGTH and req.length > MAX_DISCARD):
            # With Expect: 100-continue the client may or may not send the body after our
            # final answer, so the connection's framing is lost either way: close it.
            return False
        try:
            await copy_body(client, _Discard(MAX_DISCARD), req.body, req.length)
        except (Truncated, BadMessage):
            return False
        return True

    async def _send_file(self, client: Reader, req: RequestHead, found: Opened, keep: bool, http10: bool,
                         head_only: bool) -> bool:
        answer = decide(request_headers(req.headers), found.size, found.mtime_ns, content_type(found.name))
        headers = [*answer.headers, _NOSNIFF]
        length = None if answer.status == 304 else answer.length
        head = response_head(answer.status, headers, length, keep_alive=keep, http10=http10)
        if head_only or not answer.length:
            await client.send_all(head)
            return keep
        return await _stream_file(client, head, found.fd, answer.start, answer.length) and keep


async def _stream_file(client: trio.abc.SendStream, head: bytes, fd: int, start: int, length: int) -> bool:
    """Send ``head`` then ``length`` bytes of ``fd`` from ``start``; False if the file fell short.

    The head goes out with the first chunk (one write for small files).  If the file shrinks
    under us (or a read fails) the promised Content-Length cannot be kept: the caller must
    close the connection.
    """
    reader = FileReader(fd)
    offset, end = start, start + length
    pending = head
    while offset < end:
        try:
            data = await reader.read(offset, min(CHUNK, end - offset))
        except OSError as exc:
            log.warning("reading a served file failed: %s", exc)
            return False
        if not data:
            return False
        await client.send_all(pending + data if pending else data)
        pending = b""
        offset += len(data)
    return True
