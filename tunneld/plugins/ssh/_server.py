"""The asyncio side of the gateway: asyncssh callbacks for one connection, and channel pumps.

Everything here runs on the gateway's asyncio thread.  asyncssh callbacks only *report*
(``link.post(event)``, delivered to the connection's Trio task); every decision (which
tunnel, which URL, what to print) is taken on the Trio side, which calls back in with
coroutines run through :class:`~._bridge.AsyncioThread`.

A forwarded connection is two pumps between an SSH channel and one end of a socketpair.
Both directions are bounded: a pump writes at most one chunk and then waits for ``drain()``,
which waits for the SSH peer's window (asyncssh pauses the writer) or for the socket buffer
to empty.  A slow ssh client therefore stalls only its own channels, never the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import asyncssh
import attrs

from ._keys import KeyLookup, SshCredential

log = logging.getLogger("tunneld.ssh")

#: Bytes a pump moves per read.
CHUNK = 256 * 1024
#: SSH channel window (asyncssh's default is 2 MiB): the most one public connection may have
#: in flight towards the client's side.
WINDOW = 2 * 1024 * 1024
#: Send buffer of each end of a channel's socketpair: what one connection may hold in the kernel
#: each way (besides WINDOW), so a stuck client costs a bounded amount.
SOCKETPAIR_BUFFER = 1024 * 1024
#: Ciphers offered.  The client takes the first of *its* list that we offer, and OpenSSH lists
#: chacha20-poly1305 and aes-ctr before AES-GCM; asyncssh's AES-GCM moves 2-3x the bytes of its
#: chacha20-poly1305 (bench/ssh_gateway.py: 190-320 against 100-160 MB/s).  Every OpenSSH since
#: 6.2 (2013) and PuTTY since 0.76 has AES-GCM.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: Unknown keys one connection may offer before it is disconnected (OpenSSH's MaxAuthTries).
MAX_AUTH_TRIES = 6
#: ``-R`` forwards one connection may ask for; more are refused.
MAX_FORWARDS = 16


# ---- events, posted to the Trio side ------------------------------------------------------


@attrs.frozen
class ForwardRequested:
    """``tcpip-forward``: the client asks for ``-R host:port``; resolve ``reply`` with a
    :class:`VirtualListener` (accepted) or False (refused)."""

    host: str
    port: int
    reply: asyncio.Future[Any]


@attrs.frozen
class CommandReceived:
    """The session channel's ``exec`` command (None: a shell was asked for, no command)."""

    command: str | None


@attrs.frozen
class Interrupted:
    """Ctrl-C (a ``^C`` byte with a pty, or a signal/break request)."""


@attrs.frozen
class Closed:
    """The connection is gone."""

    reason: str


Event = ForwardRequested | CommandReceived | Interrupted | Closed


def resolve(fut: asyncio.Future[Any], value: object) -> None:
    """Settle a forward's reply (from any thread, through ``call_soon``), unless already settled."""
    if not fut.done():
        fut.set_result(value)


class VirtualListener(asyncssh.SSHListener):
    """A remote forward with no socket behind it: the edge's own listeners feed it."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        # The base class closes the whole *connection* (../shared/perf-notes.md Q5 pitfalls): a cancelled
        # forward only stops routing, which the Trio side handles.
        pass

    async def wait_closed(self) -> None:
        pass


@attrs.define(eq=False)
class Link:
    """asyncio-side state of one SSH connection."""

    keys: KeyLookup
    #: Delivers an event to the connection's Trio task (thread-safe).
    post: Callable[[Event], None]
    #: The connection's socket (a duplicate of Trio's), owned by this thread from login on.
    sock: socket.socket | None = None
    conn: asyncssh.SSHServerConnection | None = None
    chan: asyncssh.SSHServerChannel[bytes] | None = None
    username: str = ""
    credential: SshCredential | None = None
    failed_keys: int = 0
    forwards: int = 0
    pumps: set[asyncio.Task[None]] = attrs.field(factory=set)

    # ---- called from Trio through the bridge ----

    def write(self, text: str) -> None:
        if self.chan is not None and not self.chan.is_closing():
            # Bytes only: the channel has no encoding, and writing str there drops the connection.
            self.chan.write(text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace"))

    def finish(self, status: int) -> None:
        """End the session channel with ``status`` (ssh exits with it), then the connection."""
        if self.chan is not None and not self.chan.is_closing():
            self.chan.exit(status)
        if self.conn is not None:
            # Give the exit status a moment to leave before the disconnect.
            asyncio.get_running_loop().call_later(0.5, self.conn.close)

    def disconnect(self, reason: str) -> None:
        """Close with a reason OpenSSH prints (``Received disconnect ...: reason``)."""
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    def abort(self) -> None:
        """Drop the connection now (or its socket, if asyncssh never took it)."""
        if self.conn is not None:
            self.conn.abort()
        elif self.sock is not None:
            self.sock.close()

    async def open_forward(self, listen_host: str, listen_port: int, orig_host: str,
                           orig_port: int) -> socket.socket:
        """Open a ``forwarded-tcpip`` channel; return the Trio end of a socketpair pumped to it.

        Raises ``asyncssh.ChannelOpenError`` when the client refuses (its local service is down).
        """
        assert self.conn is not None
        reader, writer = await self.conn.open_connection(listen_host, listen_port, orig_host, orig_port,
                                                         window=WINDOW)
        writer.channel.set_write_buffer_limits(high=CHUNK)
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            # Room for bursts: with the 208 KiB default the two threads hand over in small steps
            # (uploads measured 88 -> 141 MB/s with 1 MiB).  The kernel caps it at wmem_max.
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKETPAIR_BUFFER)
        try:
            sreader, swriter = await asyncio.open_connection(sock=theirs, limit=CHUNK)
        except BaseException:
            ours.close()
            theirs.close()
            writer.close()
            raise
        task = asyncio.get_running_loop().create_task(_pump_pair(reader, writer, sreader, swriter))
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)
        return ours


async def _copy(reader: Any, writer: Any) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _pump_pair(creader: asyncssh.SSHReader[bytes], cwriter: asyncssh.SSHWriter[bytes],
                     sreader: asyncio.StreamReader, swriter: asyncio.StreamWriter) -> None:
    """Copy both ways, passing on half-closes; a failure either way ends both."""
    try:
        to_trio = asyncio.ensure_future(_copy(creader, swriter))
        to_client = asyncio.ensure_future(_copy(sreader, cwriter))
        _done, pending = await asyncio.wait((to_trio, to_client), return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        await asyncio.gather(to_trio, to_client, return_exceptions=True)
    finally:
        cwriter.close()
        swriter.close()


async def login(link: Link, host_key: asyncssh.SSHKey, timeout: float) -> None:
    """Run the SSH handshake and public-key login on ``link.sock``; raises if it fails."""
    assert link.sock is not None
    await asyncssh.run_server(link.sock, server_factory=lambda: GatewayServer(link),
                              server_host_keys=[host_key], login_timeout=timeout, keepalive_interval=30,
                              keepalive_count_max=3, encryption_algs=list(CIPHERS), server_version="tunneld")


class SessionChannel(asyncssh.SSHServerSession[bytes]):
    """The one session channel of a connection: where the command arrives and output goes."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._link.chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return True  # ``ssh -t``: then Ctrl-C arrives as a byte, which ends the session

    def shell_requested(self) -> bool:
        self._link.post(CommandReceived(None))
        return True

    def exec_requested(self, command: str) -> bool:
        self._link.post(CommandReceived(command))
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if b"\x03" in data:
            self._link.post(Interrupted())

    def eof_received(self) -> bool:
        # ``ssh ... < /dev/null`` sends EOF at once: stdin is not how a session ends.
        return True

    def signal_received(self, signal: str) -> None:
        self._link.post(Interrupted())

    def break_received(self, msec: int) -> bool:
        self._link.post(Interrupted())
        return True


class GatewayServer(asyncssh.SSHServer):
    """asyncssh's view of one connection: public-key auth, ``-R`` forwards, one session."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._link.conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.post(Closed(str(exc) if exc else "closed by the client"))

    def begin_auth(self, username: str) -> bool:
        self._link.username = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        credential = self._link.keys.lookup(key)
        if credential is None:
            self._link.failed_keys += 1
            if self._link.failed_keys >= MAX_AUTH_TRIES and self._link.conn is not None:
                self._link.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                           "too many keys refused")
            return False
        self._link.credential = credential
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if self._link.forwards >= MAX_FORWARDS:
            return False
        self._link.forwards += 1
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._link.post(ForwardRequested(listen_host, listen_port, reply))
        return reply

    def session_requested(self) -> Any:
        conn = self._link.conn
        if self._link.chan is not None or conn is None:
            return False  # one session per connection
        return conn.create_server_channel(encoding=None), SessionChannel(self._link)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return False  # no -L through the gateway
