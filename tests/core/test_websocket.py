"""The WebSocket carrier: URL parsing, the upgrade, the stream against another implementation
(trio-websocket, on wsproto), the edge telling carriers apart, and the CLI end to end."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio_websocket

from tunneld.core._errors import RemoteProtocolError
from tunneld.core._tls import client_context, open_tls_client
from tunneld.core._websocket import (
    HandshakeError,
    WebSocketStream,
    _client_upgrade,
    accept_token,
    accept_websocket,
    looks_like_websocket,
    parse_websocket_url,
)
from tunneld.core.proto._wsframes import OP_BINARY, frame_header

from ..conftest import EdgeEnv
from ..test_cli import (  # noqa: F401 - fixtures are used by name
    EdgeProc,
    Proc,
    curl,
    edge,
    http_upstream,
    procs,
    spawn,
    started_urls,
)


@pytest.mark.parametrize(("url", "want"), [
    ("wss://edge.example.com", ("edge.example.com", 443, "/tunneld")),
    ("wss://edge.example.com:8443/x/y?z=1", ("edge.example.com", 8443, "/x/y?z=1")),
    ("WSS://[::1]:4443/t", ("::1", 4443, "/t")),
])
def test_parse_websocket_url(url: str, want: tuple[str, int, str]) -> None:
    assert parse_websocket_url(url) == want


@pytest.mark.parametrize("url", ["ws://edge:80/", "wss://", "wss://edge:99999/", "https://edge/"])
def test_parse_websocket_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_websocket_url(url)


def test_accept_token_from_the_rfc() -> None:
    # RFC 6455 1.3's worked example.
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    got = b""
    with trio.fail_after(5):
        while data := await stream.receive_some():
            got += data
    return got


@asynccontextmanager
async def our_server(nursery: trio.Nursery) -> AsyncIterator[tuple[int, list[BaseException]]]:
    """tunneld's server side on loopback, echoing what it reads; yields (port, its errors)."""
    errors: list[BaseException] = []

    async def serve(stream: trio.SocketStream) -> None:
        try:
            head = await stream.receive_some()
            ws = await accept_websocket(stream, head, timeout=5)
            while data := await ws.receive_some():
                await ws.send_all(data)
            await ws.aclose()
        except (RemoteProtocolError, trio.BrokenResourceError) as exc:
            errors.append(exc)

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    yield listeners[0].socket.getsockname()[1], errors


async def test_their_client_against_our_server(nursery: trio.Nursery) -> None:
    """trio-websocket's client (wsproto: masked frames, its own pings and close) through ours."""
    async with our_server(nursery) as (port, errors):
        async with trio_websocket.open_websocket("127.0.0.1", port, "/tunneld", use_ssl=False,
                                                 max_message_size=1 << 24) as ws:
            for size in (1, 125, 126, 65535, 65536, 3 << 20):
                data = os.urandom(size)
                got = b""

                async def collect(size: int = size) -> None:
                    nonlocal got
                    while len(got) < size:  # the echo's frames need not match the messages
                        got += await ws.get_message()

                # Read while sending: an echo of megabytes does not fit in the sockets' buffers.
                with trio.fail_after(10):
                    async with trio.open_nursery() as readers:
                        readers.start_soon(collect)
                        await ws.send_message(data)
                assert got == data
            with trio.fail_after(5):
                await ws.ping(b"still there?")  # returns once our pong came back
        assert ws.closed is not None and ws.closed.code == 1000
        assert not errors


async def test_their_text_message_is_refused_with_a_close_frame(nursery: trio.Nursery) -> None:
    async with our_server(nursery) as (port, errors):
        async with trio_websocket.open_websocket("127.0.0.1", port, "/", use_ssl=False) as ws:
            await ws.send_message("text")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(5):
                    await ws.get_message()
        assert closed.value.reason.code == 1002
        assert "text message" in (closed.value.reason.reason or "")
        assert len(errors) == 1 and "text message" in str(errors[0])


async def test_our_client_against_their_server(nursery: trio.Nursery) -> None:
    """Our client (masked frames, writev'd parts) against trio-websocket's server, which pings
    and then closes with its own code."""
    pinged = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        while True:
            message = await ws.get_message()
            if message == b"ping me":
                await ws.ping(b"p")
                pinged.set()
            elif message == b"bye":
                await ws.aclose(code=1001, reason="going away")
                return
            else:
                await ws.send_message(message)

    server = await nursery.start(partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None,
                                         max_message_size=1 << 24))
    tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
    ws = await _client_upgrade(tcp, f"127.0.0.1:{server.port}", "/carrier")
    data = os.urandom(2 << 20)
    await ws.send_all_parts([data[:7], memoryview(data)[7:1000], data[1000:]])
    got = b""
    with trio.fail_after(10):
        while len(got) < len(data):
            got += await ws.receive_some(1 << 16)
    assert got == data
    await ws.send_all(b"ping me")
    await ws.send_all(b"bye")
    # the ping is answered inside receive_some; their close reads as the end of the stream
    assert await read_until_closed(ws) == b""
    assert pinged.is_set()
    with pytest.raises(trio.ClosedResourceError):
        await ws.send_all(b"after close")
    await ws.aclose()


async def test_server_bytes_right_after_the_101_are_kept() -> None:
    client, server = await socket_pair()

    async def fake_edge() -> None:
        head = await server.receive_some()
        key = next(line.split(b": ")[1] for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        await server.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_token(key)
                              + b"\r\n\r\n" + frame_header(OP_BINARY, 5) + b"early")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_edge)
        ws = await _client_upgrade(client, "edge:443", "/tunneld")
        assert await ws.receive_some() == b"early"


@pytest.mark.parametrize(("answer", "match"), [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused: HTTP 403"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n", "wrong Sec-WebSocket-Accept"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
     "no Upgrade: websocket"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "refused: HTTP 200"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "bad WebSocket upgrade response"),
    (b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "head over 16384 bytes"),
    (b"", "closed the connection"),
    (b"HTTP/1.1 403 Forbidden\nContent-Length: 0\r\n\r\n", "bare LF"),
], ids=["403", "wrong-accept", "wrong-upgrade", "200", "not-http", "oversized", "closed", "bare-lf"])
async def test_client_refuses_a_bad_answer(answer: bytes, match: str) -> None:
    client, server = await socket_pair()

    async def fake_edge() -> None:
        await server.receive_some()
        await server.send_all(answer)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_edge)
        with pytest.raises(HandshakeError, match=match):
            await _client_upgrade(client, "edge:443", "/tunneld")


KEY = base64.b64encode(b"0123456789abcdef").decode()
GOOD = f"GET /tunneld HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
       f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"


@pytest.mark.parametrize(("request_head", "status", "match"), [
    (GOOD.replace("Version: 13", "Version: 8"), b"426", "version is not 13"),
    (GOOD.replace("GET", "POST"), b"400", "method POST"),
    (GOOD.replace("Upgrade: websocket\r\n", ""), b"400", "no Upgrade: websocket"),
    (GOOD.replace("Connection: Upgrade", "Connection: keep-alive"), b"400", "no Connection: Upgrade"),
    (GOOD.replace(KEY, "c2hvcnQ="), b"400", "Sec-WebSocket-Key"),
    (GOOD.replace("\r\n\r\n", "\r\nSec-WebSocket-Key: x\r\n\r\n"), b"400", "Sec-WebSocket-Key"),
    (GOOD.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"), b"400",
     "extensions"),
    (GOOD.replace("\r\n\r\n", "\r\nContent-Length: 3\r\n\r\nabc"), b"400", "a body"),
    (GOOD.replace("HTTP/1.1", "HTTP/1.0"), b"400", "HTTP/1.0"),
    (GOOD.replace("Host: edge", "Host: edge\r\nX-Big: " + "a" * 20000), b"431", "head over 16384 bytes"),
    ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400", "no Upgrade"),
    ("GET /\x00 HTTP/1.1\r\n\r\n", b"400", "bad WebSocket upgrade request"),
    (GOOD.replace("Host: edge\r\n", "Host: edge\n"), b"400", "bare LF"),
], ids=["version-8", "post", "no-upgrade", "no-connection-upgrade", "short-key", "two-keys", "extensions",
        "body", "http-1.0", "oversized-head", "plain-get", "malformed", "bare-lf"])
async def test_server_refuses_a_bad_upgrade(request_head: str, status: bytes, match: str) -> None:
    client, server = await socket_pair()
    data = request_head.encode("latin-1")
    await client.send_all(data)
    await client.send_eof()
    with pytest.raises(HandshakeError, match=match):
        await accept_websocket(server, await server.receive_some(16), timeout=5)
    await server.aclose()
    answer = await read_until_closed(client)
    assert answer.split(b" ")[1] == status, answer[:200]
    if status == b"426":
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer


async def test_server_accepts_a_good_upgrade_and_keeps_pipelined_frames() -> None:
    client, server = await socket_pair()
    key = b"\x01\x02\x03\x04"
    early = frame_header(OP_BINARY, 3, key) + bytes(b ^ key[i] for i, b in enumerate(b"abc"))
    await client.send_all(GOOD.encode() + early)
    ws = await accept_websocket(server, await server.receive_some(10), timeout=5)
    answer = await client.receive_some()
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: " + accept_token(KEY.encode()) in answer
    assert await ws.receive_some() == b"abc"


async def test_bulk_both_ways_with_partial_reads() -> None:
    """Our client and server over a socket pair: 8 MiB each way, read in odd sizes."""
    a, b = await socket_pair()
    client = WebSocketStream(a, client=True)
    server = WebSocketStream(b, client=False)
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)

    async def pump(src: WebSocketStream, data: bytes) -> None:
        for i in range(0, len(data), 300_001):
            await src.send_all(data[i:i + 300_001])

    async def drain(dst: WebSocketStream, n: int, out: list[bytes]) -> None:
        got = 0
        while got < n:
            piece = await dst.receive_some(77_777)
            assert 0 < len(piece) <= 77_777
            out.append(piece)
            got += len(piece)

    got_up: list[bytes] = []
    got_down: list[bytes] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, up)
            nursery.start_soon(pump, server, down)
            nursery.start_soon(drain, server, len(up), got_up)
            nursery.start_soon(drain, client, len(down), got_down)
    assert b"".join(got_up) == up and b"".join(got_down) == down
    await client.aclose()
    assert await server.receive_some() == b""  # the close frame reads as the end


def test_sniffing_rule() -> None:
    # A muxado peer opens with a DATA+SYN frame: byte 3 is 0x12, never an ASCII letter.
    assert looks_like_websocket(b"GET /tunneld HTTP/1.1\r\n")
    assert not looks_like_websocket(b"\x00\x00\x04\x12\x00\x00\x00\x03")


async def test_plain_http_get_on_agent_port_is_refused(edge_env: EdgeEnv) -> None:
    """A GET without an Upgrade gets an HTTP error and the connection ends; no session is made."""
    tls = await open_tls_client("127.0.0.1", edge_env.info.ports["agent"], client_context(edge_env.ca))
    await tls.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    with trio.fail_after(5):
        try:
            while data := await tls.receive_some():
                got += data
        except trio.BrokenResourceError:
            pass
    assert got.startswith(b"HTTP/1.1 4"), got[:100]
    assert not edge_env.edge.sessions
    await trio.aclose_forcefully(tls)


def test_cli_agent_over_websocket(edge: EdgeProc, http_upstream: int, spawn: Callable[..., Proc]) -> None:
    flags = ["--authtoken", edge.token, "--server-addr", f"wss://127.0.0.1:{edge.agent}/tunneld",
             "--root-cas", str(edge.ca), "--log", "stdout", "--log-format", "logfmt", "--web-addr", "false"]
    agent = spawn("http", str(http_upstream), *flags)
    urls = started_urls(agent, 2)
    for url in urls.values():
        assert "hello from upstream /ws" in curl(url + "/ws", "--cacert", str(edge.ca))


def test_cli_refuses_bad_server_url(spawn: Callable[..., Proc]) -> None:
    agent = spawn("http", "8080", "--server-addr", "wss://edge:99999/x", "--authtoken", "x")
    assert agent.popen.wait(15) == 1
    assert "--server-addr" in agent.err and "port" in agent.err
