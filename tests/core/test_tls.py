"""BulkTLSStream over real loopback sockets, certificates from trustme."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from OpenSSL import SSL

from tunneld.core import _tls
from tunneld.core._lean import lean
from tunneld.core._tls import (
    MAX_RECEIVE,
    BulkTLSStream,
    accept_tls,
    client_context,
    open_tls_client,
    server_context,
)

from ..conftest import require_compiled

ALPN = b"tunneld/1"


@pytest.fixture(autouse=True, params=["compiled", "python"])
def record_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the receiver's compiled record loop (``_tlsread.c``) and with
    one SSL_read per record from Python."""
    if request.param == "compiled":
        require_compiled("tunneld.core._tlsread", "the compiled TLS record loop")
    else:
        monkeypatch.setattr(_tls, "_read_records", None)
    return str(request.param)


@dataclass
class Pki:
    ca: trustme.CA
    ca_pem: Path
    chain: Path
    key: Path

    def server_ctx(self, alpn: tuple[bytes, ...] = (ALPN,)) -> SSL.Context:
        return server_context(self.chain, self.key, alpn=alpn)

    def client_ctx(self, alpn: tuple[bytes, ...] = (ALPN,)) -> SSL.Context:
        return client_context(self.ca_pem, alpn=alpn)


def _write_pki(tmp: Path, *identities: str) -> Pki:
    tmp.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(*identities)
    chain = tmp / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = tmp / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    return Pki(ca, ca_pem, chain, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"), "127.0.0.1", "localhost")


@pytest.fixture
async def listener() -> AsyncIterator[trio.SocketListener]:
    (lst,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with lst:
        yield lst


def _port(lst: trio.SocketListener) -> int:
    return int(lst.socket.getsockname()[1])


async def _tcp_pair(lst: trio.SocketListener) -> tuple[trio.SocketStream, trio.SocketStream]:
    client = await trio.open_tcp_stream("127.0.0.1", _port(lst))
    server = await lst.accept()
    return client, server


async def _tls_pair(
    lst: trio.SocketListener,
    pki: Pki,
    *,
    server_hostname: str = "127.0.0.1",
    handshake: bool = True,
) -> tuple[BulkTLSStream, BulkTLSStream]:
    ctcp, stcp = await _tcp_pair(lst)
    return await _over(ctcp, stcp, pki, server_hostname=server_hostname, handshake=handshake)


async def _over(
    ct: trio.abc.Stream, st: trio.abc.Stream, pki: Pki, *, server_hostname: str = "127.0.0.1",
    handshake: bool = True,
) -> tuple[BulkTLSStream, BulkTLSStream]:
    """A client and a server BulkTLSStream over the two ends of a transport, handshaken."""
    client = BulkTLSStream(ct, pki.client_ctx(), server_side=False, server_hostname=server_hostname)
    server = BulkTLSStream(st, pki.server_ctx(), server_side=True)
    if handshake:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    return client, server


async def _recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------------------------------------


async def test_handshake_and_echo_both_directions(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                stream = await accept_tls(await listener.accept(), pki.server_ctx())
                async with stream:
                    assert stream.selected_alpn_protocol() == ALPN
                    assert stream.tls_version() == "TLSv1.3"
                    assert stream.getpeercert_der() is None  # no client certificate
                    msg = await _recv_exactly(stream, 5)
                    await stream.send_all(b"echo:" + msg)
                    await stream.send_all(b"server first")
                    assert await _recv_exactly(stream, 5) == b"reply"

            nursery.start_soon(serve)
            client = await open_tls_client("127.0.0.1", _port(listener), pki.client_ctx())
            async with client:
                assert client.handshake_done
                assert client.selected_alpn_protocol() == ALPN
                assert client.tls_version() == "TLSv1.3"
                der = client.getpeercert_der()
                assert der is not None and len(der) > 100
                await client.do_handshake()  # idempotent
                await client.send_all(b"hello")
                assert await _recv_exactly(client, 10) == b"echo:hello"
                assert await _recv_exactly(client, 12) == b"server first"
                await client.send_all(memoryview(b"reply"))


async def test_implicit_handshake_and_no_alpn(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        ctcp, stcp = await _tcp_pair(listener)
        client = BulkTLSStream(ctcp, pki.client_ctx(alpn=()), server_side=False, server_hostname="localhost")
        server = BulkTLSStream(stcp, pki.server_ctx(), server_side=True)
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"ping")  # handshake happens inside
                assert await _recv_exactly(server, 4) == b"ping"
            assert client.selected_alpn_protocol() is None
            assert server.selected_alpn_protocol() is None


async def test_alpn_without_overlap_still_connects(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        ctcp, stcp = await _tcp_pair(listener)
        cctx = pki.client_ctx(alpn=(b"h2",))
        client = BulkTLSStream(ctcp, cctx, server_side=False, server_hostname="localhost")
        server = BulkTLSStream(stcp, pki.server_ctx(), server_side=True)
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.do_handshake)
                nursery.start_soon(server.do_handshake)
            assert client.selected_alpn_protocol() is None
            assert server.selected_alpn_protocol() is None


async def exchange_both_ways(client: BulkTLSStream, server: BulkTLSStream, size: int,
                             write_size: Callable[[random.Random], int]) -> dict[BulkTLSStream, list[int]]:
    """Send ``size`` random bytes each way at once, in writes of ``write_size(rng)`` bytes; check
    every byte arrived in order; return the sizes of each side's receives."""
    payload = {client: os.urandom(size), server: os.urandom(size)}
    digests: dict[BulkTLSStream, str] = {}
    sizes: dict[BulkTLSStream, list[int]] = {client: [], server: []}

    async def sender(stream: BulkTLSStream, seed: int) -> None:
        rnd = random.Random(seed)
        view = memoryview(payload[stream])
        while view:
            n = write_size(rnd)
            await stream.send_all(view[:n])
            view = view[n:]

    async def receiver(stream: BulkTLSStream) -> None:
        h = hashlib.sha256()
        got = 0
        while got < size:
            chunk = await stream.receive_some()
            assert chunk and len(chunk) <= MAX_RECEIVE
            assert type(chunk) is bytes  # never a view of the shared staging buffer
            sizes[stream].append(len(chunk))
            h.update(chunk)
            got += len(chunk)
        assert got == size
        digests[stream] = h.hexdigest()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, client, 1)
        nursery.start_soon(sender, server, 2)
        nursery.start_soon(receiver, client)
        nursery.start_soon(receiver, server)
    assert digests[server] == hashlib.sha256(payload[client]).hexdigest()
    assert digests[client] == hashlib.sha256(payload[server]).hexdigest()
    return sizes


async def test_bulk_64mib_each_way_concurrently(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(60):
        client, server = await _tls_pair(listener, pki)
        async with client, server:
            sizes = await exchange_both_ways(
                client, server, 64 * 1024 * 1024,
                lambda rnd: rnd.choice((1000, 16 * 1024, 64 * 1024 + 7, 256 * 1024, 1024 * 1024)))
        # The point of the class: many records per receive, not one 16 KiB record.
        for stream in (client, server):
            assert max(sizes[stream]) >= 64 * 1024, max(sizes[stream])


async def test_receive_drains_many_records_per_call(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        async with client, server:
            data = os.urandom(1024 * 1024)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, data)
                await trio.sleep(0.1)  # let the socket buffers fill up
                first = await server.receive_some()
                assert len(first) > 16 * 1024, len(first)  # more than one TLS record
                rest = await _recv_exactly(server, len(data) - len(first))
            assert bytes(first) + rest == data
            # max_bytes is honoured, leftovers stay buffered in the engine
            await client.send_all(b"abcdefgh" * 4096)
            await trio.sleep(0.05)
            assert await server.receive_some(3) == b"abc"
            assert await server.receive_some(5) == b"defgh"
            assert len(await _recv_exactly(server, 8 * 4096 - 8)) == 8 * 4096 - 8


async def test_receive_with_lends_the_plaintext_for_the_call_only(listener: trio.SocketListener,
                                                                  pki: Pki) -> None:
    """``receive_with`` hands ``consume`` a view of the shared staging buffer: what it returns
    comes back, the view is released afterwards (a kept one cannot be read later), and the
    end of the stream is an empty view."""
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        kept: list[memoryview] = []

        def consume(view: memoryview) -> bytes:
            kept.append(view)
            return bytes(view)

        data = os.urandom(100_000)
        await client.send_all(data)
        got = b""
        while len(got) < len(data):
            got += await server.receive_with(consume)
        assert got == data
        with pytest.raises(ValueError, match="released"):
            bytes(kept[0])
        await client.aclose()
        assert await server.receive_with(len) == 0
        await server.aclose()


async def test_many_small_writes_and_send_all_parts(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(20):
        client, server = await _tls_pair(listener, pki)
        rnd = random.Random(7)
        writes = [rnd.randbytes(rnd.randint(1, 100)) for _ in range(5000)]
        header = b"H" * 12
        big = rnd.randbytes(600 * 1024)
        parts_msgs = [
            [header, big],  # > SEND_CHUNK: flushed in pieces
            [header, b"tiny"],
            [b"", header, bytearray(b"x" * 20000), memoryview(b"y" * 70000), b"z"],
            [],
        ]
        expected = b"".join(writes) + b"".join(bytes(p) for msg in parts_msgs for p in msg)
        async with client, server:
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    for w in writes:
                        await client.send_all(w)
                    await client.send_all(b"")
                    for msg in parts_msgs:
                        await client.send_all_parts(msg)

                nursery.start_soon(send)
                assert await _recv_exactly(server, len(expected)) == expected


async def test_two_way_stream_conformance(listener: trio.SocketListener, pki: Pki) -> None:
    async def maker() -> tuple[BulkTLSStream, BulkTLSStream]:
        return await _tls_pair(listener, pki)

    async def clogged_maker() -> tuple[BulkTLSStream, BulkTLSStream]:
        # Over a lockstep transport every send blocks until the peer receives.
        ct, st = trio.testing.lockstep_stream_pair()
        client = BulkTLSStream(ct, pki.client_ctx(), server_side=False, server_hostname="localhost")
        server = BulkTLSStream(st, pki.server_ctx(), server_side=True)

        async def client_side() -> None:
            await client.do_handshake()
            # The server's session tickets follow its handshake: read them (then get cancelled).
            await client.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            await server.do_handshake()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        return client, server

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(maker, clogged_maker)


async def test_busy_resource_errors(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        async with client, server:
            with pytest.RaisesGroup(trio.BusyResourceError):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.receive_some)
                    nursery.start_soon(server.receive_some)
            # Clog the client: the server does not read.
            with pytest.RaisesGroup(trio.BusyResourceError):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, b"x" * (64 * 1024 * 1024))
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(client.send_all, b"y")
            # The first send_all was cancelled half way through a record: the stream is broken.
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(b"z")


async def test_receive_while_peer_blocked_sending(listener: trio.SocketListener, pki: Pki) -> None:
    """Full duplex with both sides clogged: each side keeps receiving while its send blocks."""
    size = 8 * 1024 * 1024
    with trio.fail_after(20):
        client, server = await _tls_pair(listener, pki)
        async with client, server:
            async with trio.open_nursery() as nursery:
                for s in (client, server):
                    nursery.start_soon(s.send_all, b"q" * size)
                await trio.testing.wait_all_tasks_blocked()
                for r in (client, server):
                    nursery.start_soon(_recv_exactly, r, size)


@pytest.mark.parametrize(
    ("identities", "server_hostname", "message"),
    [
        (("127.0.0.1", "localhost"), "example.com", "certificate for example.com does not match"),
        (("localhost",), "127.0.0.1", "certificate for 127.0.0.1 does not match"),
    ],
)
async def test_wrong_hostname(
    listener: trio.SocketListener,
    tmp_path: Path,
    identities: tuple[str, ...],
    server_hostname: str,
    message: str,
) -> None:
    pki = _write_pki(tmp_path, *identities)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                # The server's side of the handshake succeeds; the client then hangs up.
                stream = await accept_tls(await listener.accept(), pki.server_ctx())
                async with stream:
                    try:
                        assert await stream.receive_some() == b""
                    except trio.BrokenResourceError:
                        pass

            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError, match=message) as info:
                await open_tls_client(
                    "127.0.0.1", _port(listener), pki.client_ctx(), server_hostname=server_hostname
                )
            assert info.value.__cause__ is not None


async def test_untrusted_ca(listener: trio.SocketListener, pki: Pki, tmp_path: Path) -> None:
    other = _write_pki(tmp_path, "127.0.0.1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                # The client's "unknown CA" alert fails the server handshake too.
                with pytest.raises(trio.BrokenResourceError):
                    await accept_tls(await listener.accept(), pki.server_ctx())

            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError, match="certificate verify failed") as info:
                await open_tls_client("127.0.0.1", _port(listener), other.client_ctx())
            assert isinstance(info.value.__cause__, SSL.Error)


async def test_verifying_client_needs_hostname(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        ctcp, stcp = await _tcp_pair(listener)
        async with ctcp, stcp:
            with pytest.raises(ValueError, match="server_hostname"):
                BulkTLSStream(ctcp, pki.client_ctx(), server_side=False)


def _stdlib_client(port: int, ca_pem: Path, payload: bytes, max_version: ssl.TLSVersion) -> tuple[bytes, str]:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.maximum_version = max_version
    ctx.set_alpn_protocols(["h2", ALPN.decode()])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = tls.recv(1 << 20)
                assert chunk
                got += chunk
            version = tls.version() or ""
            tls.unwrap()  # close_notify both ways
    return bytes(got), version


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_interop_our_server_stdlib_client(
    listener: trio.SocketListener, pki: Pki, max_version: ssl.TLSVersion
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def echo() -> None:
                stream = await accept_tls(await listener.accept(), pki.server_ctx())
                async with stream:
                    assert stream.selected_alpn_protocol() == ALPN
                    while data := await stream.receive_some():
                        await stream.send_all(data)

            nursery.start_soon(echo)
            got, version = await trio.to_thread.run_sync(
                _stdlib_client, _port(listener), pki.ca_pem, payload, max_version
            )
        assert got == payload
        assert version == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[max_version]


def _stdlib_server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.chain), str(pki.key))
    ctx.set_alpn_protocols([ALPN.decode()])
    return ctx


async def test_interop_trio_sslstream_client(listener: trio.SocketListener, pki: Pki) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    with trio.fail_after(20):
        ctcp, stcp = await _tcp_pair(listener)
        cctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        client = trio.SSLStream(ctcp, cctx, server_hostname="127.0.0.1")
        server = BulkTLSStream(stcp, pki.server_ctx(), server_side=True)
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                assert await _recv_exactly(server, len(payload)) == payload
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, payload[::-1])
                assert await _recv_exactly(client, len(payload)) == payload[::-1]
            await client.aclose()
            assert await server.receive_some() == b""


async def test_interop_our_client_trio_sslstream_server(listener: trio.SocketListener, pki: Pki) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    with trio.fail_after(20):
        ctcp, stcp = await _tcp_pair(listener)
        server = trio.SSLStream(stcp, _stdlib_server_ctx(pki), server_side=True)
        client = BulkTLSStream(ctcp, pki.client_ctx(), server_side=False, server_hostname="localhost")
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, payload)
                assert await _recv_exactly(client, len(payload)) == payload
            assert client.selected_alpn_protocol() == ALPN
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload[::-1])
                assert await _recv_exactly(server, len(payload)) == payload[::-1]
            await server.aclose()
            assert await client.receive_some() == b""
            assert await client.receive_some() == b""  # stays at EOF


async def test_peer_close_notify_gives_eof(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        async with server:
            await client.send_all(b"last words")
            await client.aclose()
            assert await _recv_exactly(server, 10) == b"last words"
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""


async def test_transport_eof_without_close_notify_is_lenient(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        async with server:
            await client.send_all(b"abc")
            transport = client.transport_stream
            assert isinstance(transport, trio.SocketStream)
            # TCP FIN without close_notify.  (send_eof rather than aclose: closing a socket with
            # unread data, here the server's session tickets, sends RST instead of FIN.)
            await transport.send_eof()
            assert await _recv_exactly(server, 3) == b"abc"
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""
            await client.aclose()


async def test_eof_during_handshake_is_broken(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        ctcp, stcp = await _tcp_pair(listener)
        await ctcp.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await accept_tls(stcp, pki.server_ctx())


async def test_aclose_idempotent_and_closed_errors(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        await client.aclose()
        await client.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await client.wait_send_all_might_not_block()
        assert await server.receive_some() == b""
        await server.aclose()
        await server.aclose()
        # closing before any handshake just closes the transport
        ctcp, stcp = await _tcp_pair(listener)
        fresh = BulkTLSStream(ctcp, pki.client_ctx(), server_side=False, server_hostname="localhost")
        await fresh.aclose()
        await fresh.aclose()
        assert await stcp.receive_some() == b""
        await stcp.aclose()


async def test_aclose_wakes_blocked_receiver(listener: trio.SocketListener, pki: Pki) -> None:
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        async with client:
            async with trio.open_nursery() as nursery:

                async def blocked() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await server.receive_some()

                nursery.start_soon(blocked)
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()


async def test_open_tls_client_timeout(listener: trio.SocketListener, pki: Pki) -> None:
    """A server that accepts TCP but never speaks TLS: the handshake times out."""
    with trio.fail_after(10):
        with pytest.raises(trio.TooSlowError):
            await open_tls_client("127.0.0.1", _port(listener), pki.client_ctx(), timeout=0.3)


def test_server_context_rejects_mismatched_key(pki: Pki, tmp_path: Path) -> None:
    other = _write_pki(tmp_path, "127.0.0.1")
    with pytest.raises(SSL.Error):
        server_context(pki.chain, other.key)


async def test_receiver_flushes_only_what_the_engine_holds(listener: trio.SocketListener, pki: Pki) -> None:
    """A receive that finds nothing decrypted flushes the engine's output first (post-handshake
    messages), and skips the send lock when there is none."""
    with trio.fail_after(10):
        client, server = await _tls_pair(listener, pki)
        async with client, server:
            assert not client._outgoing_pending()
            client._conn.send(b"queued, not sent")  # encrypted into the BIO, nothing sent yet
            assert client._outgoing_pending()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.receive_some)  # flushes, then waits for the server
                assert await _recv_exactly(server, 16) == b"queued, not sent"
                assert not client._outgoing_pending()
                await server.send_all(b"x")


def _dribbling_pair(piece: int) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """trio's memory stream pair, but bytes towards the second end move at most ``piece`` at a
    time (each send and each receive pumps once): records arrive split anywhere."""
    to_server, server_in = trio.testing.memory_stream_one_way_pair()
    to_client, client_in = trio.testing.memory_stream_one_way_pair()

    async def pump() -> None:  # noqa: RUF029 - a trio.testing hook
        trio.testing.memory_stream_pump(to_server, server_in, max_bytes=piece)

    to_server.send_all_hook = server_in.receive_some_hook = pump
    return (trio.StapledStream(to_server, client_in), trio.StapledStream(to_client, server_in))


@pytest.mark.parametrize("piece", [1, 7, 100, 65536])
async def test_records_split_anywhere_and_no_idle_ssl_read(pki: Pki, piece: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver skips SSL_read while the engine holds no whole record (``_needs_input``):
    a small message costs one SSL_read, yet records split at any byte, or several in one read,
    all arrive intact and in order.  (Small reads never take the compiled record loop, whose
    last SSL_read is always one that fails.)"""
    assert _tls._FAST
    calls = 0
    real = _tls._SSL_read

    def counting(*args: object) -> int:
        nonlocal calls
        calls += 1
        return real(*args)

    with trio.fail_after(10):
        client, server = await _over(*_dribbling_pair(piece), pki)
        monkeypatch.setattr(_tls, "_SSL_read", counting)
        for i in range(20):
            await client.send_all(b"%04d" % i)
            assert await server.receive_some() == b"%04d" % i
        if piece >= 100:
            # One per message (and one after the handshake), none that only says "need more":
            # three per message before.
            assert calls <= 20 + 1, calls
        else:
            # A 26-byte record fed in pieces: SSL_read tries after each (the split is real).
            assert calls >= 2 * 20, calls
        burst = b"".join(b"%04d" % i for i in range(200))
        for i in range(200):
            await client.send_all(b"%04d" % i)  # 200 records, read in pieces or all at once
        assert await _recv_exactly(server, len(burst)) == burst


@pytest.mark.parametrize("size", [1, 777, 16384, 40000])
async def test_small_receives_take_what_was_asked_and_leave_the_rest(pki: Pki, size: int) -> None:
    """``receive_some(size)`` over many buffered records, some larger than ``size``: each call
    gives at most ``size`` bytes (the engine keeps the rest of a record it began), and a
    close_notify behind the data ends the stream after its last byte."""
    data = os.urandom(200_000)
    with trio.fail_after(10):
        client, server = await _over(*trio.testing.memory_stream_pair(), pki)
        await client.send_all(data)
        await client.aclose()  # close_notify, queued behind the data
        got = bytearray()
        while chunk := await server.receive_some(size):
            assert len(chunk) <= size
            got += chunk
        assert got == data
        assert await server.receive_some(size) == b""


async def test_a_forged_record_after_good_ones_breaks_the_stream(pki: Pki) -> None:
    """A record that fails authentication (here, one the peer never sealed) breaks the stream
    with trio's BrokenResourceError, for good: the engine's error is not mistaken for "need
    more ciphertext"."""
    with trio.fail_after(10):
        client, server = await _over(*trio.testing.memory_stream_pair(), pki)
        await client.send_all(b"good")
        assert await _recv_exactly(server, 4) == b"good"
        forged = b"\x17\x03\x03\x00\x40" + os.urandom(64)  # application_data, 64 bytes
        await client.transport_stream.send_all(forged)
        await client.send_all(b"after")
        with pytest.raises(trio.BrokenResourceError, match="bad record mac"):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


async def test_bulk_reads_decrypt_in_one_call(listener: trio.SocketListener, pki: Pki, record_loop: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a socket, a bulk read's records are decrypted by one call of the compiled loop
    (where it is built), not one SSL_read from Python each; the bytes arrive intact.  Over
    ``lean`` sockets (as tunneld runs it) a call per socket read; over any other stream a call
    per 64 KiB of ciphertext fed to the engine."""
    loop_calls, reads = 0, 0
    real_loop, real_read = _tls._read_records, _tls._SSL_read

    def counting_loop(*args: int) -> tuple[int, int]:
        nonlocal loop_calls
        loop_calls += 1
        assert real_loop is not None
        return real_loop(*args)

    def counting_read(*args: object) -> int:
        nonlocal reads
        reads += 1
        return real_read(*args)

    data = os.urandom(8 * 1024 * 1024)
    records = len(data) // _tls._RECORD
    for wrap, most in ((lean, records // 8), (lambda s: s, records // 3)):
        loop_calls = reads = 0
        with trio.fail_after(20):
            ctcp, stcp = await _tcp_pair(listener)
            client, server = await _over(wrap(ctcp), wrap(stcp), pki)
            with monkeypatch.context() as patch:
                if record_loop == "compiled":
                    patch.setattr(_tls, "_read_records", counting_loop)
                patch.setattr(_tls, "_SSL_read", counting_read)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, data)
                    assert await _recv_exactly(server, len(data)) == data
            await client.aclose()
            await server.aclose()
        if record_loop == "compiled":
            assert 1 <= loop_calls < most, loop_calls
            assert reads < most, reads
        else:
            assert loop_calls == 0 and reads >= records, reads
