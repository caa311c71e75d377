"""Bulk through a real edge and agent (issue 17): one connection, each direction, TCP and HTTP
tunnels, over both carriers.  Every byte is checked (SHA-256); the sizes are well past the
per-stream window, the TLS and relay read sizes and the mux frame size, so credit returns,
record boundaries and 1 MiB reads are all crossed many times."""

from __future__ import annotations

import hashlib
import random
import ssl
from functools import partial

import pytest
import trio

from tunneld.core import TunnelConfig, _tls
from tunneld.core._tls import CARRIER_SEND_CHUNK, BulkTLSStream

from ..conftest import EdgeEnv

SIZE = 12 * 1024 * 1024 + 12345  # not a multiple of any buffer size
PAYLOAD = random.Random(17).randbytes(SIZE)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest().encode()


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _drain_digest(stream: trio.abc.ReceiveStream, n: int, first: bytes = b"") -> bytes:
    h = hashlib.sha256(first)
    got = len(first)
    while got < n:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended after {got} of {n} bytes")
        h.update(chunk)
        got += len(chunk)
    assert got == n, f"{got - n} bytes too many"
    return h.hexdigest().encode()


# ---- upstreams --------------------------------------------------------------------------------


async def _tcp_upstream(stream: trio.SocketStream) -> None:
    """``U`` + 8-byte length: sink that many bytes, answer their SHA-256.  ``D``: send PAYLOAD."""
    buf = bytearray()
    op = await _read_exactly(stream, 9, buf)
    n = int.from_bytes(op[1:], "big")
    if op[:1] == b"U":
        await stream.send_all(await _drain_digest(stream, n, bytes(buf)))
    else:
        await stream.send_all(PAYLOAD[:n])
    await stream.send_eof()


async def _http_upstream(stream: trio.SocketStream) -> None:
    """``POST /up`` answers the body's SHA-256; ``GET /down`` answers PAYLOAD."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some()
        if not chunk:
            return
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if head.startswith(b"POST"):
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await _drain_digest(stream, length, rest)
    else:
        body = PAYLOAD
    await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    await stream.send_all(body)


async def _serve(nursery: trio.Nursery, handler: object) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


# ---- clients ----------------------------------------------------------------------------------


async def _http_exchange(port: int, host: str, request: bytes, body: bytes = b"",
                         tls: ssl.SSLContext | None = None) -> bytes:
    """One request on a fresh connection (over TLS if given a context); the response body's
    SHA-256 (or the body if short)."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname=host.rsplit(":", 1)[0])
    async with stream:
        async with trio.open_nursery() as nursery:
            async def send() -> None:
                await stream.send_all(request % {b"host": host.encode()})
                view = memoryview(body)
                while view:  # odd-sized writes
                    await stream.send_all(view[:300_007])
                    view = view[300_007:]

            nursery.start_soon(send)
            buf = bytearray()
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some()
                assert chunk, f"no response head: {bytes(buf)[:200]!r}"
                buf += chunk
            head, _, rest = bytes(buf).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if length < 100:
                return rest + await _read_exactly(stream, length - len(rest), bytearray())
            return await _drain_digest(stream, length, rest)


@pytest.mark.carriers
async def test_tcp_tunnel_bulk_both_directions(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    port = await _serve(nursery, _tcp_upstream)
    agent = await edge_env.start_agent(TunnelConfig(name="bulk", proto="tcp", addr=str(port)))
    public = int(agent.tunnels[0].public_url.rsplit(":", 1)[1])
    if edge_env.carrier == "tls":
        # Both ends of a TLS agent link write 1 MiB at a time (public connections 256 KiB).
        (session,) = edge_env.edge.sessions
        for carrier in (agent._mux.transport, session.transport):
            assert isinstance(carrier, BulkTLSStream) and carrier._send_chunk == CARRIER_SEND_CHUNK
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream("127.0.0.1", public)
        async with stream:
            await stream.send_all(b"U" + SIZE.to_bytes(8, "big"))
            view = memoryview(PAYLOAD)
            while view:
                await stream.send_all(view[:1_000_003])
                view = view[1_000_003:]
            assert await _read_exactly(stream, 64, bytearray()) == DIGEST
        stream = await trio.open_tcp_stream("127.0.0.1", public)
        async with stream:
            await stream.send_all(b"D" + SIZE.to_bytes(8, "big"))
            assert await _drain_digest(stream, SIZE) == DIGEST
            assert await stream.receive_some() == b""  # the upstream's EOF comes through


@pytest.mark.carriers
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_http_tunnel_bulk_both_directions(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTPS the edge's public side is TLS too: the mux frames go to its TLS layer's
    send_all_parts unjoined, and it decrypts the upload where the socket read put it."""
    public_in_place = []
    read_in_place = _tls.BulkTLSStream._read_in_place

    def counting(self: _tls.BulkTLSStream) -> int | None:
        n = read_in_place(self)
        if self.server_side and self._send_chunk == _tls.SEND_CHUNK and n and n > _tls._IN_PLACE_MIN:
            public_in_place.append(n)  # a public HTTPS connection's bulk read, read in place
        return n

    monkeypatch.setattr(_tls.BulkTLSStream, "_read_in_place", counting)
    port = await _serve(nursery, _http_upstream)
    agent = await edge_env.start_agent(TunnelConfig(name="bulk", proto="http", addr=f"127.0.0.1:{port}",
                                                    schemes=[scheme]))
    host = agent.tunnels[0].public_url.split("://", 1)[1]
    public = edge_env.http_port if scheme == "http" else edge_env.https_port
    tls = ssl.create_default_context(cafile=str(edge_env.ca)) if scheme == "https" else None
    with trio.fail_after(60):
        post = b"POST /up HTTP/1.1\r\nHost: %%(host)s\r\nContent-Length: %d\r\n\r\n" % SIZE
        up = await _http_exchange(public, host, post, PAYLOAD, tls)
        assert up == DIGEST
        down = await _http_exchange(public, host, b"GET /down HTTP/1.1\r\nHost: %(host)s\r\n\r\n", tls=tls)
        assert down == DIGEST
    assert bool(public_in_place) == (scheme == "https")


async def test_simultaneous_upload_and_download_share_the_session(edge_env: EdgeEnv,
                                                                  nursery: trio.Nursery) -> None:
    """Bulk both ways at once on one agent session: the carrier's TLS sends and receives at the
    same time at both ends (this once could deadlock, see ``_tls`` module docstring)."""
    port = await _serve(nursery, _tcp_upstream)
    agent = await edge_env.start_agent(TunnelConfig(name="bulk", proto="tcp", addr=str(port)))
    public = int(agent.tunnels[0].public_url.rsplit(":", 1)[1])

    async def upload() -> None:
        async with await trio.open_tcp_stream("127.0.0.1", public) as stream:
            await stream.send_all(b"U" + SIZE.to_bytes(8, "big"))
            await stream.send_all(PAYLOAD)
            assert await _read_exactly(stream, 64, bytearray()) == DIGEST

    async def download() -> None:
        async with await trio.open_tcp_stream("127.0.0.1", public) as stream:
            await stream.send_all(b"D" + SIZE.to_bytes(8, "big"))
            assert await _drain_digest(stream, SIZE) == DIGEST

    with trio.fail_after(60):
        for _ in range(3):
            async with trio.open_nursery() as both:
                both.start_soon(upload)
                both.start_soon(download)
