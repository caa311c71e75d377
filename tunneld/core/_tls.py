"""TLS for the bulk data path: :class:`BulkTLSStream` and context helpers.

Why not :class:`trio.SSLStream`?  The stdlib ``SSLObject.read()`` returns at most one 16 KiB TLS
record per call, so every ``receive_some`` yields ≤ 16 KiB and goes through SSLStream's retry
machinery; on loopback that costs ~75 % of the throughput (../shared/perf-notes.md Q2).
:class:`BulkTLSStream` drives a pyOpenSSL ``Connection(ctx, None)`` (memory BIOs) and

* on receive, drains *every* decrypted record that is already buffered (up to ``max_bytes``) and
  only touches the transport when nothing is buffered, refilling with 1 MiB reads;
* on send, encrypts the whole call into the outgoing BIO and hands the ciphertext to the
  transport with one ``send_all`` per 256 KiB of plaintext.

``trio.SSLStream`` remains fine for low-volume connections (control/API).

Concurrency model (same contract as every trio stream): one task may be in ``receive_some`` while
another is in ``send_all``; two tasks in the same direction raise :class:`trio.BusyResourceError`.
Internally all writes to the transport happen under ``_send_lock``; plaintext is encrypted into
the engine and bytes are taken out of its outgoing BIO only while holding it, so they reach the
wire in the order OpenSSL produced them.  Whoever holds the lock keeps draining the BIO until it
is empty before releasing it, which lets ``receive_some`` hand post-handshake output (e.g. a
KeyUpdate reply) to a concurrently blocked sender instead of waiting for it - waiting there could
deadlock two peers that are both blocked sending to each other.  For the same reason a receiver
that finds the lock free must never find a sender's bulk data in the BIO: it would block sending
it while holding the lock, and with the peer doing the same neither would read again.

Not a :class:`trio.abc.HalfCloseableStream`: TLS has no half close; a per-stream FIN has to come
from the layer above (the mux).
"""

from __future__ import annotations

import enum
import ipaddress
import operator
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import service_identity
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from ._lean import STREAK, lean

__all__ = [
    "BulkTLSStream",
    "accept_tls",
    "client_context",
    "open_tls_client",
    "server_context",
    "start_tls_client",
]

#: Largest chunk handed out by one ``receive_some`` (also the default).  1 MiB rather than
#: 256 KiB: the cost per call (scheduler passes, mux dispatch, wrappers) is paid 4x less often;
#: bulk CPU per MB fell ~20 % on both ends with this and ``TRANSPORT_READ`` (issue 17).  It is
#: one buffer per thread (``_staging``), not per connection.
MAX_RECEIVE = 1024 * 1024
#: Size of each read from the transport (a short read returns what the socket holds).
TRANSPORT_READ = 1024 * 1024
#: Plaintext encrypted before ciphertext is pushed to the transport (bounds memory per send: a
#: blocked sender holds this much in the engine's BIO, and over a transport other than a
#: socket once more in its ciphertext buffer).
SEND_CHUNK = 256 * 1024
#: The same for an agent link (the mux's carrier; ``send_chunk`` of :func:`accept_tls` and
#: :func:`start_tls_client`): its sender writes 1 MiB at a time and the receiving end reads,
#: decrypts and dispatches in fewer, larger passes.  Bulk through a tunnel, five alternating
#: pairs: download 1,089 -> 1,186 MB/s, both ends' CPU per GB 8-12 % lower (issue 17).  One
#: link per agent, each holding this at most twice while blocked (once over a socket); public
#: connections keep SEND_CHUNK, thousands of them may be blocked at once.
CARRIER_SEND_CHUNK = 1024 * 1024
#: Largest plaintext of one TLS record (RFC 8446 §5.1); SSL_read never returns more.
_RECORD = 16 * 1024
#: Ciphertext buffer of one transport write, beyond the send chunk it holds: a chunk of
#: plaintext sealed in full records (22 bytes of TLS 1.3 overhead per 16 KiB record, 29 with
#: TLS 1.2 GCM: 1.9 KiB per MiB) fits in one.
_OBUF_SLACK = 8 * 1024
#: Ciphertext sent without a pooled buffer when it fits (two full records and their overhead).
_SMALL_OBUF_SIZE = 2 * _RECORD + 256
#: Plaintext ``send_parts_nowait`` takes at most: its ciphertext (two records) fits that buffer.
_NOWAIT_MAX = 2 * _RECORD
#: Idle ciphertext buffers kept per thread (one is in use per connection that is sending).
_OBUF_POOL = 4
#: Socket reads up to this size are copied into the engine's BIO (which then never grows
#: past a record); larger ones it reads in place (``_read_in_place``).
_IN_PLACE_MIN = _RECORD
#: Ciphertext handed to the engine's incoming BIO at once.  A memory BIO never gives back the
#: room it grew to: fed whole 1 MiB reads, every session that once received a bulk transfer
#: kept ~1.3 MB for the rest of its life.
_FEED = 64 * 1024
#: Seconds without bulk traffic after which a connection swaps the engine's grown BIOs for
#: fresh ones (see ``_renew_bios``), on its next small receive or send.
_BIO_SHRINK_AFTER = 1.0
#: Seconds ``aclose`` spends trying to deliver close_notify.
CLOSE_NOTIFY_TIMEOUT = 1.0

# TLS 1.2 suites for the server (TLS 1.3 has its own list).  Forward secret AEAD only, AES-GCM first.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"
# AES-128-GCM first: 6.0 GB/s against 4.1 GB/s for AES-256-GCM and 3.9 GB/s for ChaCha20 here
# (``openssl speed -evp``, 16 KiB records).  Go and BoringSSL order it first too.  The server's
# order wins (OP_CIPHER_SERVER_PREFERENCE).
_TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# The bulk path calls OpenSSL through the cffi binding pyOpenSSL itself uses, reading and
# writing straight into our buffers.  pyOpenSSL's ``recv_into`` decrypts into a temporary it
# allocates and copies (per 16 KiB record), and ``bio_read`` allocates, copies into a new bytes
# which we copied again.  These are private names of pyOpenSSL: if a release drops them we fall
# back to its public API (same behaviour, slower).
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read = _lib.SSL_read
    _SSL_write = _lib.SSL_write
    _BIO_write = _lib.BIO_write
    _SSL_pending = _lib.SSL_pending
    _SSL_get_error = _lib.SSL_get_error
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _BIO_read = _lib.BIO_read
    _BIO_new_mem_buf = _lib.BIO_new_mem_buf
    _BIO_set_mem_eof_return = _lib.BIO_set_mem_eof_return
    _SSL_set_bio = _lib.SSL_set_bio
    # BIO_get_mem_data(bio, char **): the bytes a memory BIO holds (BIO_CTRL_INFO) and where
    # they start, not copied; with NULL only the count (``_BIO_pending``).
    _BIO_get_mem_data = _BIO_pending = _lib.BIO_get_mem_data
    _from_buffer = _ffi.from_buffer
    _FAST = hasattr(SSL.Connection, "_raise_ssl_error")
except (ImportError, AttributeError):  # pragma: no cover - depends on the pyOpenSSL release
    _FAST = False


_compiled_loop: Callable[[int, int, int], tuple[int, int]] | None
try:
    # FULL and NEEDS_INPUT: the statuses of ``read_records`` besides SSL_read's failures.
    from ._tlsread import FULL as _LOOP_FULL
    from ._tlsread import NEEDS_INPUT as _LOOP_NEEDS_INPUT
    from ._tlsread import configure as _configure_loop
    from ._tlsread import read_records as _compiled_loop
except ImportError:  # pragma: no cover - not built (no C compiler at install time)
    _compiled_loop = None


def _record_loop() -> Callable[[int, int, int], tuple[int, int]] | None:
    """The compiled loop that decrypts every whole record in one call (``_tlsread.c``), pointed
    at the OpenSSL that pyOpenSSL's binding calls; None where it was not built (or the binding
    hides its functions): then one ``SSL_read`` per record from Python."""
    if not _FAST or _compiled_loop is None:
        return None

    def address(fn: Any, ctype: str) -> int:
        return int(_ffi.cast("uintptr_t", _ffi.cast(ctype, fn)))

    try:
        _configure_loop(address(_SSL_read, "int(*)(SSL *, void *, int)"),
                        address(_SSL_get_error, "int(*)(const SSL *, int)"), _WANT_READ)
    except (TypeError, ValueError):  # pragma: no cover - the binding's functions cannot be cast
        return None
    return _compiled_loop


#: See :func:`_record_loop`.
_read_records = _record_loop()


_local = threading.local()
_T = TypeVar("_T")
_NO_BYTES = memoryview(b"")


def _staging() -> tuple[memoryview, Any, int]:
    """This thread's plaintext staging buffer for ``receive_some``, a cffi pointer to it and
    its address (for ``_read_records``; None and 0 off the fast path).

    Filled and copied out with no checkpoint in between, so one per thread is enough (saves
    1 MiB per connection).
    """
    try:
        return _local.staging  # type: ignore[no-any-return]
    except AttributeError:
        buf = bytearray(MAX_RECEIVE)
        ptr = _from_buffer(buf) if _FAST else None
        addr = int(_ffi.cast("uintptr_t", ptr)) if ptr is not None else 0
        _local.staging = staging = (memoryview(buf), ptr, addr)
        return staging


def _cipher_staging() -> tuple[memoryview, Any]:
    """This thread's ciphertext buffer for socket reads, and a cffi pointer to it (fast path
    only).  The engine reads it through a read-only BIO and takes all of it, or the rest is
    copied out, before the reader next yields (see ``_read_in_place``)."""
    try:
        return _local.cipher  # type: ignore[no-any-return]
    except AttributeError:
        buf = bytearray(TRANSPORT_READ)
        _local.cipher = staging = (memoryview(buf), _from_buffer(buf))
        return staging


def _data_ptr() -> Any:
    """This thread's ``char **`` for ``BIO_get_mem_data`` (used with no checkpoint between)."""
    try:
        return _local.data_ptr
    except AttributeError:
        _local.data_ptr = ptr = _ffi.new("char **")
        return ptr


def _obuf_pool(size: int) -> list[bytearray]:
    pools: dict[int, list[bytearray]] | None = getattr(_local, "obufs", None)
    if pools is None:
        _local.obufs = pools = {}
    return pools.setdefault(size, [])


def _get_obuf(size: int) -> bytearray:
    """A ciphertext buffer of ``size`` bytes from this thread's pool.  A connection holds one
    only while it is sending, so an idle connection holds none; reusing them avoids the glibc
    trim/re-fault cycle of big short-lived allocations (it halved throughput when measured)."""
    pool = _obuf_pool(size)
    if pool:
        return pool.pop()
    return bytearray(size)


def _small_obuf() -> bytearray:
    """This thread's buffer for small sends (filled and copied out with no checkpoint between)."""
    try:
        return _local.small  # type: ignore[no-any-return]
    except AttributeError:
        _local.small = buf = bytearray(_SMALL_OBUF_SIZE)
        return buf


def _put_obuf(buf: bytearray) -> None:
    pool = _obuf_pool(len(buf))
    if len(pool) < _OBUF_POOL:
        pool.append(buf)


def _BIO_new_mem() -> Any:  # noqa: N802 - named as the other OpenSSL calls here
    """A new, empty memory BIO (fast path only); MemoryError if OpenSSL has no memory for one."""
    bio = _lib.BIO_new(_lib.BIO_s_mem())
    if bio == _ffi.NULL:
        raise MemoryError("BIO_new failed")
    return bio


def _quiet_since(grown: float | None) -> bool:
    """A BIO grew at ``grown`` (trio time) and traffic has been small for a while since."""
    return grown is not None and trio.current_time() - grown > _BIO_SHRINK_AFTER


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _hardened(ctx: SSL.Context) -> None:
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    ctx.set_options(options)
    ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.set_tls13_ciphersuites(_TLS13_SUITES)
    # Free the engine's record buffers (~34 KiB per connection) while a connection is idle:
    # edge RSS per idle agent session fell from 110 to 78 KiB (bench/many_agents.py, 1000
    # agents); bulk CPU per MB did not move measurably (a malloc per record against decrypting
    # it).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)


# --------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------


def server_context(cert_chain: Path, key: Path, *, alpn: Sequence[bytes] = ()) -> SSL.Context:
    """A server context: TLS 1.2+ (official ngrok agents speak 1.2 or 1.3), AEAD only with
    AES-GCM preferred, no compression, no renegotiation, session tickets on (OpenSSL default).

    *cert_chain* is a PEM file holding the leaf followed by any intermediates; *key* the matching
    PEM private key (checked).  *alpn* lists protocols in server preference order; a client that
    offers none of them still connects, without ALPN.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    _hardened(ctx)
    ctx.use_certificate_chain_file(str(cert_chain))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()  # raises SSL.Error when the key does not match the leaf
    if alpn:
        ours = [bytes(p) for p in alpn]

        def _select(_conn: SSL.Connection, offered: list[bytes]) -> Any:
            for proto in ours:
                if proto in offered:
                    return proto
            return SSL.NO_OVERLAPPING_PROTOCOLS

        ctx.set_alpn_select_callback(_select)
    return ctx


def client_context(root_cas: Path | None, *, alpn: Sequence[bytes] = ()) -> SSL.Context:
    """A verifying client context: TLS 1.2+, ``VERIFY_PEER``.

    With *root_cas* only the CA certificates in that PEM file are trusted; without it the system
    default paths are.  The host name is checked by :class:`BulkTLSStream` after the handshake.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    _hardened(ctx)
    ctx.set_verify(SSL.VERIFY_PEER)
    if root_cas is not None:
        ctx.load_verify_locations(str(root_cas))
    else:
        ctx.set_default_verify_paths()
    if alpn:
        ctx.set_alpn_protos([bytes(p) for p in alpn])
    return ctx


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class _Conflict:
    """Like trio's internal ConflictDetector: a second concurrent user raises BusyResourceError."""

    __slots__ = ("_held", "_msg")

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class BulkTLSStream(trio.abc.Stream):
    """TLS over any :class:`trio.abc.Stream`, tuned for bulk transfer.  See the module docstring.

    End of stream: ``receive_some`` returns ``b""`` after the peer's close_notify **and also** when
    the transport hits EOF without one (a truncation attack can therefore not be told apart from a
    clean close; like most HTTP stacks we are lenient because many peers just drop the TCP
    connection; protocols on top carry their own framing/lengths).  EOF *during* the handshake is
    an error.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        send_chunk: int = SEND_CHUNK,
        initial_data: bytes = b"",
    ) -> None:
        if send_chunk < _RECORD:
            raise ValueError(f"send_chunk must be at least {_RECORD} bytes")
        self.transport_stream = transport
        #: Plaintext encrypted before its ciphertext goes to the transport (SEND_CHUNK).
        self._send_chunk = send_chunk
        self.server_side = server_side
        self.server_hostname = server_hostname
        self._verify = (
            not server_side and bool(context.get_verify_mode() & SSL.VERIFY_PEER)
        )
        if self._verify and not server_hostname:
            raise ValueError("server_hostname is required for a verifying client context")
        self._conn = SSL.Connection(context, None)
        if server_side:
            self._conn.set_accept_state()
        else:
            if server_hostname and not _is_ip_literal(server_hostname):
                self._conn.set_tlsext_host_name(server_hostname.encode("idna"))
            self._conn.set_connect_state()
        if _FAST:
            # pyOpenSSL turns partial writes on, so that SSL_write seals one 16 KiB record per
            # call; into a memory BIO (which never blocks) one call can seal a whole send chunk.
            # Bulk: 64 calls through the wrapper per MB -> 4, ~10 % of the sender's CPU.
            _lib.SSL_clear_mode(self._conn._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        if initial_data:
            # Bytes already read from the transport (a peeked ClientHello): the engine's first.
            self._conn.bio_write(initial_data)

        self._state = _State.OK
        self._handshook = False
        self._eof = False  # close_notify or transport EOF seen
        # Dropped once the handshake is done (an idle session holds thousands of these).
        self._handshake_lock: trio.Lock | None = trio.Lock()
        self._send_lock = trio.Lock()  # guards transport.send_all / wait_send_all_might_not_block
        self._send_conflict = _Conflict("another task is using this stream for send")
        #: Ciphertext :meth:`send_parts_nowait` took from the engine and the socket did not
        #: take: written first by the next sender.
        self._unsent = b""
        #: Ciphertext read from the transport, not yet fed to the engine (at most _FEED a time).
        self._backlog: memoryview | None = None
        #: When the engine's incoming / outgoing BIO last grew past small records (or None:
        #: not since it was new).  Fresh ones replace them once traffic is small again.
        self._rbio_grown: float | None = None
        self._wbio_grown: float | None = None
        #: The engine holds no complete record: SSL_read would only say WANT_READ until more
        #: ciphertext is fed (an SSL_read fewer at both ends of an idle heartbeat's read).
        self._needs_input = False
        self._recv_conflict = _Conflict("another task is using this stream for receive")
        #: The engine can read socket reads in place: the transport has ``read_into_nowait``
        #: (a plain socket, see ``_lean``) and the cffi fast path is there (``_read_in_place``).
        self._in_place = _FAST and hasattr(transport, "read_into_nowait")
        #: Bulk ciphertext goes to the socket straight from the engine's BIO (``_send_bio_in_place``).
        self._send_in_place = _FAST and hasattr(transport, "write_nowait")

    # ---- introspection ---------------------------------------------------------------------

    def selected_alpn_protocol(self) -> bytes | None:
        """The negotiated ALPN protocol, or None."""
        proto = self._conn.get_alpn_proto_negotiated()
        return proto or None

    def peer_certificate(self) -> x509.Certificate | None:
        return self._conn.get_peer_certificate(as_cryptography=True)

    def getpeercert_der(self) -> bytes | None:
        """DER of the peer's leaf certificate (None before the handshake / no client cert)."""
        cert = self.peer_certificate()
        return None if cert is None else cert.public_bytes(Encoding.DER)

    def tls_version(self) -> str | None:
        """E.g. ``"TLSv1.3"``; None before the handshake."""
        return self._conn.get_protocol_version_name() if self._handshook else None

    def cipher(self) -> str | None:
        return self._conn.get_cipher_name()

    @property
    def handshake_done(self) -> bool:
        return self._handshook

    # ---- internals -------------------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("TLS stream is broken")
        raise trio.ClosedResourceError("TLS stream is closed")

    def _take_outgoing(self, obuf: bytearray) -> int:
        """Move ciphertext from the engine's outgoing BIO into *obuf*; the byte count (0: empty).

        Only ``_send_lock`` holders call this, so the BIO is drained in the order OpenSSL
        filled it.  Stops when *obuf* is full; the caller sends and calls again.
        """
        size = len(obuf)
        if _FAST:
            bio = self._conn._from_ssl
            with _from_buffer(obuf) as ptr:
                pos = 0
                while pos < size:
                    n = _BIO_read(bio, ptr + pos, size - pos)
                    if n <= 0:
                        break  # empty (a memory BIO says "retry"; nothing else can fail here)
                    pos += n
            return pos
        conn = self._conn
        pos = 0
        while pos < size:
            try:
                piece = conn.bio_read(size - pos)
            except SSL.WantReadError:
                break
            obuf[pos : pos + len(piece)] = piece
            pos += len(piece)
        return pos

    async def _send_pending_locked(self, plaintext: int = 0) -> None:
        """Send the outgoing BIO until it stays empty.  Caller holds ``_send_lock``; ``plaintext``
        is what it just encrypted, if it knows (0: unknown, probably little)."""
        # Most sends are small (a heartbeat echo, a response head): taken through this thread's
        # small buffer and copied out, they hold no pooled buffer across the send's checkpoint.
        # (Thousands of sessions echoing heartbeats at once emptied the pool: a 264 KiB
        # allocation per echo, 6 % of an idle edge's CPU.)  Bulk goes straight to the pool.
        obuf: bytearray | None = None
        head = b""
        unsent, self._unsent = self._unsent, b""
        if plaintext <= _RECORD:
            small = _small_obuf()
            n = self._take_outgoing(small)
            big = n == len(small)  # the BIO may hold more
            if not big and _quiet_since(self._wbio_grown):
                self._renew_bios(read=False, write=True)  # drained, and bulk is over
            if not n and not unsent:
                return
            with memoryview(small) as view, view[:n] as taken:
                head = bytes(taken)
        else:
            big = True
            self._wbio_grown = trio.current_time()
        try:
            if unsent:
                await self.transport_stream.send_all(unsent)
            if head:
                await self.transport_stream.send_all(head)
            if big:
                if self._send_in_place:
                    await self._send_bio_in_place()
                    return
                obuf = _get_obuf(self._send_chunk + _OBUF_SLACK)
                while n := self._take_outgoing(obuf):
                    with memoryview(obuf) as view, view[:n] as data:
                        await self.transport_stream.send_all(data)
        except trio.ClosedResourceError:
            raise
        except BaseException:
            # Cancelled or failed mid-write: an unknown prefix of a record went out.
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise
        finally:
            if obuf is not None:
                _put_obuf(obuf)

    async def _send_bio_in_place(self) -> None:
        """Write the engine's outgoing BIO to the socket from the BIO's own memory.  Caller
        holds ``_send_lock`` and is on the ``_send_in_place`` path.

        Taking the ciphertext out into a buffer first was a third copy of every byte sent (the
        engine's record buffer and the BIO are the others): ~5 % of a bulk sender's CPU
        (``perf``).  Each write goes from the BIO's memory, then ``BIO_read`` into that same
        memory consumes what went out: a ``memcpy`` onto itself, which glibc skips (a copy of
        equal bytes onto themselves anywhere else).  No pointer into the BIO is held across a
        wait: a receiver's ``SSL_read`` may write to the BIO meanwhile (a TLS 1.3 KeyUpdate
        answer) and move or grow its memory; what it wrote goes after what we have not sent.
        """
        transport = self.transport_stream
        write = transport.write_nowait  # type: ignore[attr-defined]
        bio = self._conn._from_ssl
        ptr = _data_ptr()
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        total = 0
        while (n := _BIO_get_mem_data(bio, ptr)) > 0:
            data = ptr[0]
            sent = write(_ffi.buffer(data, n))
            if sent:
                _BIO_read(bio, data, sent)
                total += sent
            else:  # full: wait (after a short write, try again first: the peer may be reading)
                waited = True
                await transport.wait_send_all_might_not_block()
        # Yield as the socket's own send_all would (``_lean``; shielded: the bytes are sent).
        if waited:
            STREAK.waited()
        elif STREAK.ready(total):
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _flush(self) -> None:
        async with self._send_lock:
            if self._state is _State.BROKEN:
                # Whoever held the lock failed while sending our bytes along with theirs.
                raise trio.BrokenResourceError("TLS stream is broken")
            await self._send_pending_locked()

    async def _flush_from_receiver(self) -> None:
        # If a sender holds the lock it drains the BIO before releasing it (see module doc), so
        # never wait here: the peer may only read our data once we have read theirs.  Nearly
        # always the engine has nothing to send: then skip the lock, whose acquisition is a
        # trip through the scheduler (two per heartbeat on an idle session).
        if not self._send_lock.locked() and self._outgoing_pending():
            await self._flush()

    def _outgoing_pending(self) -> bool:
        """Whether ciphertext waits to be sent (True when we cannot tell)."""
        if self._unsent:
            return True
        if _FAST:
            return bool(_BIO_pending(self._conn._from_ssl, _ffi.NULL))
        return True

    def _broken(self, exc: BaseException, what: str) -> trio.BrokenResourceError:
        if self._state is _State.OK:
            self._state = _State.BROKEN
        return trio.BrokenResourceError(f"TLS {what} failed: {exc!r}")

    # ---- handshake -------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake (idempotent; receive/send call it implicitly).

        On a client with a verifying context the peer certificate is then matched against
        ``server_hostname``.  Failures raise :class:`trio.BrokenResourceError`.  If the
        handshake is cancelled, the stream is broken.
        """
        if self._handshook:
            self._check_status()
            await trio.lowlevel.checkpoint()
            return
        self._check_status()
        lock = self._handshake_lock
        assert lock is not None  # None only once the handshake is done
        async with lock:
            self._check_status()
            if self._handshook:
                return
            try:
                await self._handshake_locked()
            except trio.ClosedResourceError:
                raise
            except BaseException:
                if self._state is _State.OK:
                    self._state = _State.BROKEN
                raise

    async def _handshake_locked(self) -> None:
        conn = self._conn
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                data = await self.transport_stream.receive_some(TRANSPORT_READ)
                if not data:
                    raise trio.BrokenResourceError(
                        "peer closed the connection during the TLS handshake"
                    ) from None
                conn.bio_write(data)
            except SSL.Error as exc:
                # Deliver our alert if there is one (best effort), then fail.
                try:
                    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                        await self._flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc!r}") from exc
        # Client: our Finished; server: its TLS 1.3 session tickets.
        await self._flush()
        if self._verify:
            host = self.server_hostname
            assert host is not None
            try:
                if _is_ip_literal(host):
                    verify_ip_address(conn, host.strip("[]"))
                else:
                    verify_hostname(conn, host)
            except (service_identity.VerificationError, service_identity.CertificateError) as exc:
                raise trio.BrokenResourceError(
                    f"certificate for {host} does not match: {exc}"
                ) from exc
        self._handshook = True
        self._handshake_lock = None
        # The handshake's flights (a post-quantum key share is over 1 KB each way) grew both
        # BIOs: ~4 KB per idle session given back.
        self._renew_bios(read=True, write=True)

    def _renew_bios(self, *, read: bool, write: bool) -> None:
        """Give the engine fresh, empty memory BIOs in place of grown ones that are empty now
        (a memory BIO keeps the largest size it ever held).  Only on the cffi fast path."""
        if not _FAST:
            return
        conn = self._conn
        rbio, wbio = conn._into_ssl, conn._from_ssl
        new_r = read and not _BIO_pending(rbio, _ffi.NULL)
        new_w = write and not _BIO_pending(wbio, _ffi.NULL)
        if not (new_r or new_w):
            return
        if new_r:
            rbio = _BIO_new_mem()
            self._rbio_grown = None
        if new_w:
            wbio = _BIO_new_mem()
            self._wbio_grown = None
        # The SSL object frees the BIOs it no longer uses (SSL_set_bio's ownership rules).
        _SSL_set_bio(conn._ssl, rbio, wbio)
        conn._into_ssl, conn._from_ssl = rbio, wbio

    # ---- receive ---------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to *max_bytes* (default and cap: 1 MiB) of plaintext; ``b""`` at end of stream.

        Returns every decrypted record already buffered (many per call), and reads the transport
        only when nothing is buffered.
        """
        return await self.receive_with(bytes, max_bytes)

    async def receive_with(self, consume: Callable[[memoryview], _T], max_bytes: int | None = None) -> _T:
        """:meth:`receive_some`, but the plaintext goes to ``consume(view)`` instead of being
        copied into a new ``bytes``: what ``consume`` returns is returned.

        ``view`` is this thread's staging buffer, valid during the call only (``consume`` must
        copy what it keeps, and must not wait); an empty view means end of stream.  The mux
        decodes frames straight from it: one copy of every received byte fewer.
        """
        with self._recv_conflict:
            if max_bytes is None:
                max_bytes = MAX_RECEIVE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
                max_bytes = min(max_bytes, MAX_RECEIVE)
            self._check_status()
            if not self._handshook:
                await self.do_handshake()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            if self._eof:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return consume(_NO_BYTES)

            conn = self._conn
            view, ptr, addr = _staging()
            ssl = conn._ssl if ptr is not None else None
            loop = _read_records if ptr is not None else None
            # Bulk ciphertext came in this call (a socket read or a feed of more than a record):
            # the compiled loop decrypts it.  A small read stays on the per-record path, which
            # learns that the engine is empty without the failing SSL_read the loop ends with.
            bulk = False
            got = 0
            blocked = False
            in_place = 0  # bytes of the shared ciphertext buffer the engine reads in place
            while got < max_bytes:
                want_read = False
                try:
                    if ptr is None:
                        n = conn.recv_into(view[got:], max_bytes - got)
                    elif self._needs_input:
                        want_read = True
                    elif bulk and loop is not None:
                        # Every whole record at once, in C (``_tlsread.c``).
                        n, status = loop(int(_ffi.cast("uintptr_t", ssl)), addr + got, max_bytes - got)
                        got += n
                        n = 0
                        if status == _LOOP_NEEDS_INPUT:
                            want_read = self._needs_input = True
                        elif status != _LOOP_FULL:
                            conn._raise_ssl_error(ssl, status)
                            raise SSL.SysCallError(-1, f"SSL_read returned {status}")
                    else:
                        # SSL_read decrypts one record straight into the staging buffer.
                        n = _SSL_read(ssl, ptr + got, max_bytes - got)
                        if n <= 0:
                            # "Need more ciphertext" is the common case (every read ends with
                            # it): told apart without raising, the rest as recv_into raises it.
                            if _SSL_get_error(ssl, n) == _WANT_READ:
                                want_read = self._needs_input = True
                            else:
                                conn._raise_ssl_error(ssl, n)
                                raise SSL.SysCallError(-1, f"SSL_read returned {n}")
                        elif not _SSL_pending(ssl) and not _BIO_pending(conn._into_ssl, _ffi.NULL):
                            # That was the last whole record: no SSL_read to learn so.
                            self._needs_input = True
                except SSL.WantReadError:
                    want_read = True
                except SSL.ZeroReturnError:
                    self._eof = True  # close_notify
                    break
                except SSL.Error as exc:
                    raise self._broken(exc, "receive") from exc
                if want_read:
                    # Waited for outside the except clause: a task parked in one keeps the
                    # exception, its traceback and frame alive (every idle session did).
                    chunk = self._backlog  # read already: fed without waiting
                    if chunk is None:
                        if got:
                            break
                        if in_place:
                            # A read that ended inside a record: the engine took all of it
                            # and wants more.  Its own BIO again before anything yields or
                            # reads (the buffer is shared; a small read is fed to that BIO).
                            self._detach_ciphertext(in_place)
                            in_place = 0
                        await self._flush_from_receiver()
                        if self._in_place:
                            # Waits happen before the read, never between it and decryption:
                            # the ciphertext buffer is shared by all connections.
                            waited = False
                            while (nread := self._read_in_place()) is None:
                                waited = True
                                await self.transport_stream.wait_readable()  # type: ignore[attr-defined]
                            if not nread:
                                self._eof = True  # EOF without close_notify, as below
                                break
                            if nread > _IN_PLACE_MIN:
                                in_place = nread
                                bulk = True
                            self._needs_input = False
                            # Yield as the transport would have (``_lean``), after the data
                            # is consumed: the ciphertext buffer is shared until then.
                            if waited:
                                STREAK.waited()
                                blocked = True
                            else:
                                blocked = not STREAK.ready(nread)
                            continue
                        data = await self.transport_stream.receive_some(TRANSPORT_READ)
                        blocked = True
                        if not data:
                            self._eof = True  # EOF without close_notify: lenient, see class doc
                            break
                        if len(data) <= _RECORD:
                            if _quiet_since(self._rbio_grown):
                                self._renew_bios(read=True, write=False)
                            self._feed(data)
                            self._needs_input = False
                            continue
                        self._rbio_grown = trio.current_time()
                        chunk = memoryview(data)
                    self._feed(chunk[:_FEED])
                    bulk = True
                    self._needs_input = False
                    self._backlog = chunk[_FEED:] if len(chunk) > _FEED else None
                    continue
                got += n
            if in_place:
                self._detach_ciphertext(in_place)
            # Consumed before the checkpoint: the staging buffer is shared by all streams.
            with view[:got] as plain:
                result = consume(plain)
            if not blocked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return result

    def _read_in_place(self) -> int | None:
        """Read the socket into this thread's ciphertext buffer and hand what came to the
        engine: the byte count (0 at end of stream), or None when nothing is there yet.

        A bulk read the engine reads where it lies, through a read-only BIO: a copy of every
        received byte fewer than feeding a memory BIO.  The caller decrypts before it next
        yields and then calls :meth:`_detach_ciphertext`.  A small read is copied into the
        engine's own BIO, which is cheaper than making a BIO for it.
        """
        cview, cptr = _cipher_staging()
        n: int | None = self.transport_stream.read_into_nowait(cview)  # type: ignore[attr-defined]
        if not n:
            return n
        if n <= _IN_PLACE_MIN:
            self._feed(cview[:n])
            return n
        bio = _BIO_new_mem_buf(cptr, n)
        if bio == _ffi.NULL:
            raise self._broken(MemoryError("BIO_new_mem_buf failed"), "receive")
        _BIO_set_mem_eof_return(bio, -1)  # empty means "more to come", not end of stream
        conn = self._conn
        # The SSL object frees the BIO it no longer uses (SSL_set_bio's ownership rules).
        _SSL_set_bio(conn._ssl, bio, conn._from_ssl)
        conn._into_ssl = bio
        self._rbio_grown = None
        return n

    def _detach_ciphertext(self, length: int) -> None:
        """Give the engine a memory BIO of its own in place of the read-only one over the first
        ``length`` bytes of the shared ciphertext buffer, holding what it has not read of them
        (nothing, unless a caller asked for less than they hold)."""
        conn = self._conn
        left = _BIO_pending(conn._into_ssl, _ffi.NULL)
        bio = _BIO_new_mem()
        if left:
            view, _ = _cipher_staging()
            with view[length - left : length] as rest, _from_buffer(rest) as buf:
                if _BIO_write(bio, buf, left) != left:
                    _lib.BIO_free(bio)
                    raise self._broken(MemoryError("BIO_write failed"), "receive")
        _SSL_set_bio(conn._ssl, bio, conn._from_ssl)
        conn._into_ssl = bio

    # ---- receiving for a parked reader (the edge's idle-session watcher) -----------------

    def socket_fileno(self) -> int | None:
        """The descriptor of the socket under this stream when :meth:`decrypt_nowait` can serve
        it (a plain socket, the cffi fast path, handshake done, nothing buffered either way);
        else None."""
        if not (_FAST and self._handshook and self._state is _State.OK and self._needs_input) \
                or self._eof or self._backlog is not None or self._recv_conflict._held \
                or self._outgoing_pending():
            return None
        socket = getattr(self.transport_stream, "socket", None)
        if socket is None or not hasattr(self.transport_stream, "write_nowait"):
            return None
        fd: int = socket.fileno()
        return fd if fd >= 0 else None

    def decrypt_nowait(self, ciphertext: bytes, consume: Callable[[memoryview], _T]) -> _T | None:
        """Feed ``ciphertext`` (read by the caller from :meth:`socket_fileno`) to the engine and
        hand every whole record's plaintext to ``consume`` as :meth:`receive_with` does; None
        while no record is complete.

        For the one caller that stands in for a receiver parked outside :meth:`receive_with`
        (never during one).  Engine errors raise as :meth:`receive_some` would raise them,
        except a close_notify, which is left for that receiver to find (returns None).
        """
        conn = self._conn
        ssl = conn._ssl
        self._feed(ciphertext)
        self._needs_input = False
        view, ptr, _ = _staging()
        got = 0
        try:
            while got < MAX_RECEIVE:
                n = _SSL_read(ssl, ptr + got, MAX_RECEIVE - got)
                if n > 0:
                    got += n
                    continue
                if _SSL_get_error(ssl, n) == _WANT_READ:
                    self._needs_input = True
                    break
                conn._raise_ssl_error(ssl, n)
                raise SSL.SysCallError(-1, f"SSL_read returned {n}")
        except SSL.ZeroReturnError:
            # close_notify: SSL_read keeps answering so; the receiver ends the stream.
            pass
        except SSL.Error as exc:
            raise self._broken(exc, "receive") from exc
        if not got:
            return None
        with view[:got] as plain:
            return consume(plain)

    # ---- send ------------------------------------------------------------------------------

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        conn = self._conn
        try:
            if _FAST:
                ssl = conn._ssl
                with _from_buffer(data) as buf:
                    total, done = len(buf), 0
                    while done < total:
                        n = _SSL_write(ssl, buf + done, total - done)
                        if n <= 0:
                            conn._raise_ssl_error(ssl, n)
                            raise SSL.SysCallError(-1, f"SSL_write returned {n}")
                        done += n
                return
            view = memoryview(data)
            while view:
                n = conn.send(view)
                view = view[n:]
        except SSL.Error as exc:
            raise self._broken(exc, "send") from exc

    def _feed(self, ciphertext: bytes | bytearray | memoryview) -> None:
        """Hand ciphertext to the engine's incoming memory BIO (which takes all of it)."""
        conn = self._conn
        if not _FAST:
            conn.bio_write(ciphertext)
            return
        with _from_buffer(ciphertext) as buf:
            n = _BIO_write(conn._into_ssl, buf, len(buf))
        if n != len(buf):  # a memory BIO refuses only when out of memory
            raise self._broken(MemoryError(f"BIO_write took {n} of {len(buf)} bytes"), "receive")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt *data* and send it; one transport ``send_all`` per 256 KiB of plaintext."""
        await self.send_all_parts((data,))

    async def send_all_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Like ``send_all(b"".join(parts))`` without the join: e.g. a mux header + payload.

        Small parts are coalesced so a 12-byte header shares a TLS record with its payload.
        """
        with self._send_conflict:
            self._check_status()
            if not self._handshook:
                await self.do_handshake()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            # Encrypt only while holding the send lock.  Otherwise a receiver that took the
            # free lock to flush engine output (``_flush_from_receiver``) could find our bulk
            # ciphertext in the BIO and block sending it; with the peer doing the same, neither
            # would read again: a deadlock seen with both directions busy (issue 17).
            async with self._send_lock:
                if self._state is _State.BROKEN:
                    raise trio.BrokenResourceError("TLS stream is broken")
                await self._encrypt_and_send_locked(parts)

    async def _encrypt_and_send_locked(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        small = bytearray()  # coalesces parts smaller than a record
        pending = 0  # plaintext written to the engine since the last transport write
        chunk = self._send_chunk
        for part in parts:
            view = memoryview(part).cast("B")
            if not view:
                continue
            if len(small) + len(view) <= _RECORD:
                small += view
                continue
            if small:
                # Top the buffer up to one full record from this part, then encrypt it.
                take = _RECORD - len(small)
                small += view[:take]
                view = view[take:]
                self._encrypt(small)
                pending += len(small)
                small = bytearray()
            while view:
                if pending >= chunk:
                    await self._send_pending_locked(pending)
                    pending = 0
                piece = view[: chunk - pending]
                self._encrypt(piece)
                pending += len(piece)
                view = view[len(piece) :]
        if small:
            self._encrypt(small)
            pending += len(small)
        if pending or self._unsent:
            await self._send_pending_locked(pending)

    def send_parts_nowait(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool | None:
        """Encrypt *parts* (at most two records' worth) and write them now, in this task.

        For a caller that must not wait (the mux's reader answering a heartbeat or returning
        credit, the mux's flush at the end of a scheduler pass): one task wakeup and a scheduler
        trip fewer than handing them to a writer.
        Returns None when it cannot take them without waiting — another task is sending, the
        handshake is not done, the stream failed, the engine has output queued, or the
        transport cannot write without waiting — and the caller sends them the usual way.
        Returns True when all went out, False when some ciphertext is left (then the caller
        must make sure a send or flush follows: ``send_all_parts(())`` writes it).
        """
        write = getattr(self.transport_stream, "write_nowait", None)
        if (write is None or self._send_conflict._held or self._send_lock.locked()
                or not self._handshook or self._state is not _State.OK or self._outgoing_pending()):
            return None
        if len(parts) == 1:
            data = parts[0]
            if len(data) > _NOWAIT_MAX:
                return None
        elif sum(map(len, parts)) > _NOWAIT_MAX:  # before joining: a bulk outbox is megabytes
            return None
        else:
            data = b"".join(parts)
        self._encrypt(data)
        small = _small_obuf()
        n = self._take_outgoing(small)
        try:
            with memoryview(small) as view, view[:n] as taken:
                sent = write(taken)
                if sent < n:
                    self._unsent = bytes(taken[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Encrypted but not sent: the stream is unusable; the next send reports it.
            self._state = _State.BROKEN
            return False
        return not self._unsent

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            self._check_status()
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()
                await self._send_pending_locked()

    # ---- close -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify (best effort, ≤ ``CLOSE_NOTIFY_TIMEOUT`` s), then close the transport.

        Idempotent.  Does not wait for the peer's close_notify (allowed by RFC 8446 §6.1).  If
        another task is blocked sending, no close_notify is sent (unclean close).
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        graceful = self._state is _State.OK and self._handshook
        self._state = _State.CLOSED
        try:
            if graceful and not self._send_lock.locked():
                try:
                    self._conn.shutdown()
                except SSL.Error:
                    pass
                else:
                    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                        await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport_stream.aclose()


# --------------------------------------------------------------------------------------------
# Dial / accept helpers
# --------------------------------------------------------------------------------------------


async def open_tls_client(
    host: str,
    port: int,
    context: SSL.Context,
    *,
    server_hostname: str | None = None,
    timeout: float = 10,
) -> BulkTLSStream:
    """Connect TCP to *host*:*port* and complete a TLS handshake, all within *timeout* seconds
    (:class:`trio.TooSlowError` otherwise).  *server_hostname* (SNI and certificate check)
    defaults to *host*.
    """
    with trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(host, port)
        return await start_tls_client(tcp, context, server_hostname=server_hostname or host)


async def start_tls_client(
    tcp: trio.SocketStream, context: SSL.Context, *, server_hostname: str, timeout: float = float("inf"),
    lean_io: bool = False, send_chunk: int = SEND_CHUNK,
) -> BulkTLSStream:
    """Client-side handshake over a connected TCP stream (TCP_NODELAY set) within *timeout*
    seconds.  On failure the connection is closed and the error re-raised.

    With *lean_io* the socket's reads and writes that need no wait skip the scheduler
    (:mod:`._lean`; the stream then checkpoints less often than trio's streams promise).
    """
    transport = lean(tcp) if lean_io else tcp
    stream = BulkTLSStream(transport, context, server_side=False, server_hostname=server_hostname,
                           send_chunk=send_chunk)
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def accept_tls(
    transport: trio.abc.Stream, context: SSL.Context, *, timeout: float = 10, send_chunk: int = SEND_CHUNK,
    initial_data: bytes = b"",
) -> BulkTLSStream:
    """Server-side handshake on an accepted transport within *timeout* seconds.  On failure the
    transport is closed and the error (BrokenResourceError / TooSlowError) re-raised.

    ``initial_data``: bytes the caller already read from the transport (a ClientHello it
    peeked at), handed to the engine first.  Passing them so, rather than wrapping the
    transport in a :class:`PrefixedStream`, keeps a plain socket's fast paths (see ``_lean``).
    """
    stream = BulkTLSStream(transport, context, server_side=True, send_chunk=send_chunk,
                           initial_data=initial_data)
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream
