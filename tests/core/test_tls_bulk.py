"""BulkTLSStream's bulk path (issue 17): direct OpenSSL calls and their fallback, 1 MiB reads,
no ciphertext buffer held by an idle stream, released record buffers, AES-128-GCM first."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from tunneld.core import _tls
from tunneld.core._lean import lean
from tunneld.core._tls import MAX_RECEIVE, BulkTLSStream

from .test_tls import Pki, _over, _tcp_pair, _tls_pair, _write_pki, exchange_both_ways


@pytest.fixture(scope="module")
def bulk_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki-bulk"), "127.0.0.1")


@pytest.fixture
async def lst() -> AsyncIterator[trio.SocketListener]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        yield listener


@pytest.fixture(params=["inplace", "inplace-python-records", "fast", "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test over the direct-cffi path with the engine reading socket reads in place
    (over ``lean`` sockets, as tunneld runs it; records decrypted by the compiled loop where
    it is built, and once more one SSL_read at a time from Python), with memory BIOs fed by the
    transport (any other stream), and over pyOpenSSL's public API."""
    if request.param == "fallback":
        monkeypatch.setattr(_tls, "_FAST", False)
    # Fresh per-thread buffers: the staging pointer is made for the path in use.
    monkeypatch.setattr(_tls, "_local", threading.local())
    if request.param == "inplace-python-records":
        monkeypatch.setattr(_tls, "_read_records", None)
        return "inplace"
    return str(request.param)


def _count_in_place(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the socket reads the engine reads in place from now on."""
    sizes: list[int] = []
    read = BulkTLSStream._read_in_place

    def counting(self: BulkTLSStream) -> int | None:
        n = read(self)
        if n is not None and n > _tls._IN_PLACE_MIN:
            sizes.append(n)
        return n

    monkeypatch.setattr(BulkTLSStream, "_read_in_place", counting)
    return sizes


async def _pair(lst: trio.SocketListener, pki: Pki, path: str) -> tuple[BulkTLSStream, BulkTLSStream]:
    ctcp, stcp = await _tcp_pair(lst)
    if path == "inplace":
        client, server = await _over(lean(ctcp), lean(stcp), pki)
        assert client._in_place and server._in_place
        return client, server
    client, server = await _over(ctcp, stcp, pki)
    assert not client._in_place and not server._in_place
    return client, server


@pytest.mark.parametrize("attempt", range(3))
async def test_bulk_both_ways_intact(lst: trio.SocketListener, bulk_pki: Pki, path: str,
                                     attempt: int) -> None:
    """8 MiB each way at once, odd write sizes; every byte arrives in order.  Run a few times:
    before encryption moved under the send lock this deadlocked in about half the runs,
    depending on trio's (randomised) scheduling order."""
    with trio.fail_after(30):
        client, server = await _pair(lst, bulk_pki, path)
        # Writes larger than SEND_CHUNK and not a multiple of a record.
        await exchange_both_ways(client, server, 8 * 1024 * 1024, lambda _rnd: 3 * 1024 * 1024 + 17)
        await client.aclose()
        assert await server.receive_some() == b""  # close_notify, through the same read path
        await server.aclose()


async def test_receive_drains_up_to_1mib(bulk_pki: Pki, path: str) -> None:
    """Everything buffered is handed out in one call, up to 1 MiB (not one record, not 256 KiB).
    An unbounded in-memory transport keeps kernel buffer sizes out of it."""
    with trio.fail_after(20):
        client, server = await _over(*trio.testing.memory_stream_pair(), bulk_pki)
        data = os.urandom(4 * 1024 * 1024)
        await client.send_all(data)  # never blocks: the memory buffer is unbounded
        got = bytearray()
        sizes = []
        while len(got) < len(data):
            chunk = await server.receive_some()
            sizes.append(len(chunk))
            got += chunk
        assert got == data
        # One 1 MiB transport read yields 1 MiB of ciphertext: all its whole records at once.
        assert min(sizes[:-1]) > 1000 * 1024, sizes
        assert max(sizes) <= MAX_RECEIVE
        await client.aclose()
        assert await server.receive_some() == b""  # close_notify
        await server.aclose()


async def test_max_bytes_honoured(lst: trio.SocketListener, bulk_pki: Pki, path: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Short reads: in place, what the engine has not read of the shared buffer when the call
    returns goes into a BIO of its own (without that copy this test gets garbage)."""
    in_place = _count_in_place(monkeypatch)
    with trio.fail_after(10):
        client, server = await _pair(lst, bulk_pki, path)
        await client.send_all(b"x" * 100_000)
        await trio.sleep(0.05)  # all of it in the socket: the first read takes several records
        first = await server.receive_some(7)
        assert first == b"x" * 7
        rest = bytearray()
        while len(rest) < 100_000 - 7:
            rest += await server.receive_some(40_000)
        assert bytes(rest) == b"x" * (100_000 - 7)
        await client.send_all(b"y" * 50_000)
        assert await _recv(server, 50_000) == b"y" * 50_000
        assert bool(in_place) == (path == "inplace"), in_place
        await client.aclose()
        await server.aclose()


async def test_corrupt_record_breaks_stream(lst: trio.SocketListener, bulk_pki: Pki, path: str) -> None:
    """A bad record after the handshake is an error on the direct path too, not data or EOF."""
    with trio.fail_after(10):
        client, server = await _pair(lst, bulk_pki, path)
        # An application-data record header and 64 bytes that do not authenticate.
        await client.transport_stream.send_all(b"\x17\x03\x03\x00\x40" + os.urandom(64))
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_idle_stream_holds_no_ciphertext_buffer(lst: trio.SocketListener, bulk_pki: Pki,
                                                      path: str) -> None:
    """After sending, the ciphertext buffer goes back to a small per-thread pool; over a socket
    (``inplace``) bulk ciphertext is written from the engine's BIO and takes none at all."""
    with trio.fail_after(20):
        pairs = [await _pair(lst, bulk_pki, path) for _ in range(_tls._OBUF_POOL + 3)]
        data = os.urandom(1024 * 1024)

        async def one(client: BulkTLSStream, server: BulkTLSStream) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, data)
                assert await _recv(server, len(data)) == data

        async with trio.open_nursery() as nursery:
            for c, s in pairs:
                nursery.start_soon(one, c, s)
        for c, _s in pairs:
            assert not any(isinstance(v, bytearray) and len(v) > 4096 for v in vars(c).values())
        pools = getattr(_tls._local, "obufs", {})
        if path == "inplace":
            assert not any(pools.values()), pools.keys()
        else:
            assert 1 <= len(pools[_tls.SEND_CHUNK + _tls._OBUF_SLACK]) <= _tls._OBUF_POOL
        for c, s in pairs:
            await c.aclose()
            await s.aclose()


async def _recv(stream: BulkTLSStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some()
        assert chunk
        buf += chunk
    return bytes(buf)


async def test_parked_reader_decrypts_after_in_place_reads(lst: trio.SocketListener, bulk_pki: Pki,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge's idle watcher reads a parked session's socket itself and feeds the engine
    (``decrypt_nowait``): after in-place reads the engine has a writable BIO again."""
    in_place = _count_in_place(monkeypatch)
    with trio.fail_after(10):
        client, server = await _pair(lst, bulk_pki, "inplace")
        bulk = os.urandom(300_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, bulk)
            assert await _recv(server, len(bulk)) == bulk
        assert in_place
        await client.send_all(b"ping")
        fd = server.socket_fileno()
        assert fd is not None
        await trio.lowlevel.wait_readable(fd)
        assert server.decrypt_nowait(os.read(fd, 65536), bytes) == b"ping"
        await client.send_all(b"pong")
        assert await server.receive_some() == b"pong"
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


class _Capture(trio.abc.SendStream):
    """A transport's sending side that keeps the ciphertext instead of sending it."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_in_place_read_ending_inside_a_record_then_a_small_read(
        lst: trio.SocketListener, bulk_pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read larger than a record's plaintext can still end inside a (full) record: the engine
    takes what there is and waits for more, and the rest, even a read of a few bytes, must
    reach it (it went to the read-only BIO over the shared buffer, and broke the stream)."""
    with trio.fail_after(10):
        client, server = await _pair(lst, bulk_pki, "inplace")
        sizes = _count_in_place(monkeypatch)
        sock, capture = client.transport_stream, _Capture()
        client.transport_stream = capture  # the next record is cut in two by hand
        payload = os.urandom(_tls._RECORD)
        await client.send_all(payload)
        client.transport_stream = sock
        cut = _tls._IN_PLACE_MIN + 6
        assert len(capture.data) > cut + 8  # one full record: its header, plaintext and tag
        got = bytearray()
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                while len(got) < len(payload):
                    got.extend(await server.receive_some())

            nursery.start_soon(read)
            await sock.send_all(capture.data[:cut])
            await trio.sleep(0.3)  # read on its own, in place
            await sock.send_all(capture.data[cut:])
        assert got == payload and sizes == [cut]
        # And the stream goes on: the engine has a BIO of its own again.
        await client.send_all(b"after")
        assert await server.receive_some() == b"after"
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


class _Recording(trio.abc.Stream):
    """A transport that notes the size of every ``send_all``."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("chunk", [_tls.SEND_CHUNK, _tls.CARRIER_SEND_CHUNK])
async def test_ciphertext_goes_out_a_send_chunk_at_a_time(bulk_pki: Pki, chunk: int) -> None:
    """256 KiB of plaintext per transport write by default; an agent link asks for 1 MiB."""
    with trio.fail_after(20):
        a, b = trio.testing.memory_stream_pair()
        rec = _Recording(a)
        client = BulkTLSStream(rec, bulk_pki.client_ctx(), server_side=False,
                               server_hostname="127.0.0.1", send_chunk=chunk)
        server = BulkTLSStream(b, bulk_pki.server_ctx(), server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        rec.sends.clear()
        data = os.urandom(4 * 1024 * 1024)
        await client.send_all(data)
        assert await _recv(server, len(data)) == data
        # Each chunk sealed in 16 KiB records: 22 bytes of overhead each (TLS 1.3).
        sealed = chunk + chunk // (16 * 1024) * 22
        assert rec.sends == [sealed] * (len(data) // chunk), rec.sends[:8]
    with pytest.raises(ValueError):
        BulkTLSStream(a, bulk_pki.client_ctx(), server_side=False, server_hostname="127.0.0.1",
                      send_chunk=1000)


def test_contexts_release_buffers_and_prefer_aes128(bulk_pki: Pki) -> None:
    for ctx in (bulk_pki.server_ctx(), bulk_pki.client_ctx()):
        # set_mode ORs bits in and returns the resulting mode.
        assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS
    assert _tls._TLS13_SUITES.startswith(b"TLS_AES_128_GCM_SHA256:")


async def test_negotiates_aes128_gcm(lst: trio.SocketListener, bulk_pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(lst, bulk_pki)
        assert client.tls_version() == "TLSv1.3"
        assert client.cipher() == server.cipher() == "TLS_AES_128_GCM_SHA256"
        await client.aclose()
        await server.aclose()


def test_fast_path_available() -> None:
    """The pyOpenSSL in constraints.txt has the names the direct path uses."""
    assert _tls._FAST


async def test_grown_bios_are_renewed_once_traffic_is_small(
    bulk_pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory BIO keeps the largest size it held: after the handshake, and after bulk traffic
    once it is small again, the engine gets fresh BIOs (and no byte is lost on the way)."""
    # The renewal lives on the fast path; pyOpenSSL without its cffi binding would lose it.
    assert _tls._FAST, "pyOpenSSL's cffi binding is missing: BulkTLSStream runs its slow path"
    monkeypatch.setattr(_tls, "_BIO_SHRINK_AFTER", 0.2)
    with trio.fail_after(20):
        client, server = await _over(*trio.testing.memory_stream_pair(), bulk_pki)
        assert server._rbio_grown is None and server._wbio_grown is None
        bulk = os.urandom(3 * 1024 * 1024)
        for sender, receiver in ((client, server), (server, client)):
            await sender.send_all(bulk)
            got = bytearray()
            while len(got) < len(bulk):
                got += await receiver.receive_some()
            assert got == bulk
            assert receiver._rbio_grown is not None and sender._wbio_grown is not None
            rbio, wbio = receiver._conn._into_ssl, sender._conn._from_ssl
            await trio.sleep(0.3)
            await sender.send_all(b"small")  # the sender's drained BIO is renewed here
            assert await receiver.receive_some() == b"small"  # and the receiver's here
            assert receiver._rbio_grown is None and sender._wbio_grown is None
            assert receiver._conn._into_ssl != rbio and sender._conn._from_ssl != wbio
        # Both still work both ways after the swap.
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some() == b"pong"
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


async def test_send_parts_nowait_keeps_order_when_the_socket_is_full(lst: trio.SocketListener,
                                                                     bulk_pki: Pki) -> None:
    """Inline writes (the mux reader's) over a real loopback socket: once the kernel takes no
    more, the ciphertext left over is kept and goes out first with the next send, in order."""
    with trio.fail_after(20):
        ct, st = await _tcp_pair(lst)
        client, server = await _over(lean(ct), lean(st), bulk_pki)
        piece = b"y" * 16000
        sent = 0
        while True:  # nobody reads yet: fill the socket buffers
            result = client.send_parts_nowait([piece[:8000], piece[8000:]])
            assert result is not None
            sent += len(piece)
            if result is False:
                break
        # Ciphertext is waiting: further inline writes are refused, not reordered.
        assert client.send_parts_nowait([b"z"]) is None
        got = bytearray()

        async def drain() -> None:
            while not got.endswith(b"end"):
                got.extend(await server.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await client.send_all_parts(())  # writes the leftover
            await client.send_all(b"end")
        assert got == b"y" * sent + b"end"
        assert client.send_parts_nowait([b"again"]) is True  # room again: written at once
        assert await server.receive_some() == b"again"
        await client.aclose()
        await server.aclose()


async def test_bulk_sent_from_the_bio_while_the_engine_writes_more(lst: trio.SocketListener,
                                                                    bulk_pki: Pki,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a socket, bulk ciphertext goes out from the engine's BIO.  While the sender waits
    for a full socket, more engine output is appended to that BIO (as a receiver's ``SSL_read``
    may, answering a KeyUpdate), enough that the BIO grows and moves: everything still arrives,
    in order.  (Holding a pointer into the BIO across the wait sends freed memory here.)"""
    with trio.fail_after(30):
        ct, st = await _tcp_pair(lst)
        client, server = await _over(lean(ct), lean(st), bulk_pki)
        assert client._send_in_place
        transport = client.transport_stream
        wait = type(transport).wait_send_all_might_not_block
        extra = os.urandom(3 * 1024 * 1024 + 5)
        waits = []

        async def wait_and_append(self: object) -> None:
            if not waits:  # the first time the socket is full: 3 MiB more, sealed after ours
                client._encrypt(extra)
            waits.append(1)
            await wait(self)  # type: ignore[arg-type]

        monkeypatch.setattr(type(transport), "wait_send_all_might_not_block", wait_and_append)
        used: list[int] = []
        take = BulkTLSStream._take_outgoing
        monkeypatch.setattr(BulkTLSStream, "_take_outgoing",
                            lambda self, obuf: used.append(len(obuf)) or take(self, obuf))
        data = os.urandom(8 * 1024 * 1024 + 3)
        got = bytearray()

        async def drain() -> None:
            await trio.sleep(0.2)  # let the socket fill first
            while len(got) < len(data) + len(extra):
                got.extend(await server.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await client.send_all(data)
        assert waits, "the socket never filled"
        # The engine sealed ``extra`` between two chunks of ``data``; the bytes are intact.
        at = got.find(extra[:64])
        assert at > 0 and got[at : at + len(extra)] == extra
        assert got[:at] + got[at + len(extra):] == data
        # Only small sends (the handshake's, none here) take ciphertext out into a buffer.
        assert all(n <= _tls._SMALL_OBUF_SIZE for n in used), used
        await client.aclose()
        await server.aclose()


async def test_bulk_send_from_the_bio_fails_cleanly_when_the_peer_goes(lst: trio.SocketListener,
                                                                        bulk_pki: Pki) -> None:
    """The peer gone mid-transfer breaks the sending stream with trio's error, and later sends
    say so too (nothing half-sent is taken for sent)."""
    with trio.fail_after(20):
        ct, st = await _tcp_pair(lst)
        client, server = await _over(lean(ct), lean(st), bulk_pki)
        await trio.aclose_forcefully(server)
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(64):
                await client.send_all(os.urandom(1024 * 1024))
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x" * 100_000)
        await trio.aclose_forcefully(client)
