"""End-to-end tests of HTTP tunnels: real sockets, a real edge, real agents, real clients.

Every test runs an in-process edge (``edge_env``) and one or more agents on loopback, and a
small h11 upstream server on 127.0.0.1 port 0.  Public clients are curl, httpx, trio-websocket
and raw trio sockets speaking bytes written by hand; they all connect to 127.0.0.1 and pick the
tunnel with the ``Host`` header (or SNI and ``--resolve`` for HTTPS).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import socket
import ssl
import types
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import httpx
import pytest
import trio
import trio.testing
import trio_websocket

from tunneld.core import ERROR_HEADER, Agent, TunnelConfig, proto
from tunneld.core._tls import client_context, open_tls_client
from tunneld.plugins.http import _agent as http_agent
from tunneld.plugins.http import _edge, _pool

from ..conftest import EdgeEnv

# The end-to-end tests run over both agent carriers: muxado over TLS, and over a WebSocket.
pytestmark = pytest.mark.carriers

MiB = 1024 * 1024

# --------------------------------------------------------------------------------------------
# The upstream: a small h11 server
# --------------------------------------------------------------------------------------------


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@attrs.define(eq=False)
class Upstream:
    """An HTTP/1.1 server with a few routes, recording every request it sees."""

    name: str
    port: int = 0
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    continues_sent: int = 0
    #: Open connections from the agent.
    open_connections: int = 0
    #: Connections the agent opened, in all.
    accepted: int = 0

    async def start(self, nursery: trio.Nursery) -> Upstream:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=2 * MiB)
        self.open_connections += 1
        self.accepted += 1
        try:
            while True:
                event = await self._next(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                await self._respond(conn, stream, event)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(256 * 1024))

    async def _body(self, conn: h11.Connection, stream: trio.SocketStream) -> tuple[int, str]:
        """Consume the request body; returns (length, sha256)."""
        if conn.they_are_waiting_for_100_continue:
            self.continues_sent += 1
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        digest = hashlib.sha256()
        total = 0
        while True:
            event = await self._next(conn, stream)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                total += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return total, digest.hexdigest()
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    async def _respond(self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request) -> None:
        target = req.target.decode()
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        headers = [(k.decode(), v.decode("latin-1")) for k, v in req.headers]
        record = {"method": req.method.decode(), "target": target, "headers": headers,
                  "http_version": req.http_version.decode()}
        self.requests.append(record)
        length, sha = await self._body(conn, stream)
        record["length"] = length
        head_only = req.method == b"HEAD"

        async def send(event: Any) -> None:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

        async def reply(body: bytes, ctype: str = "text/plain", extra: list[tuple[str, str]] | None = None,
                        status: int = 200) -> None:
            hdrs = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("X-Upstream", self.name)]
            await send(h11.Response(status_code=status, headers=hdrs + (extra or [])))
            if body and not head_only:
                await send(h11.Data(data=body))
            await send(h11.EndOfMessage())

        if parts.path == "/hello":
            await reply(f"hello from {self.name}\n".encode())
        elif parts.path == "/echo":
            info = {**record, "upstream": self.name, "sha256": sha}
            await reply(json.dumps(info).encode(), "application/json")
        elif parts.path == "/sha256":
            await reply(json.dumps({"length": length, "sha256": sha}).encode(), "application/json")
        elif parts.path == "/stream":
            # No Content-Length: chunked for HTTP/1.1 clients, close-delimited for HTTP/1.0.
            data = pattern(int(query["size"]), int(query.get("seed", "1")))
            await send(h11.Response(status_code=200, headers=[("X-Upstream", self.name)]))
            if not head_only:
                view = memoryview(data)
                for i in range(0, len(data), 64 * 1024):
                    await send(h11.Data(data=view[i:i + 64 * 1024]))
            await send(h11.EndOfMessage())
        elif parts.path == "/big":
            size = int(query["size"])
            await send(h11.Response(status_code=200, headers=[("Content-Length", str(size)),
                                                              ("X-Upstream", self.name)]))
            block = b"x" * (64 * 1024)
            left = size
            while left:
                n = min(left, len(block))
                await send(h11.Data(data=block[:n]))
                left -= n
            await send(h11.EndOfMessage())
        elif parts.path == "/forge":
            await reply(b"forged", extra=[(ERROR_HEADER, "ERR_TUNNELD_3200"), ("X-Other", "kept")])
        else:
            await reply(b"not found", status=404)


async def ws_echo_server(nursery: trio.Nursery) -> int:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass

    server = await nursery.start(partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0,
                                         ssl_context=None))
    return int(server.port)


async def scripted_upstream(nursery: trio.Nursery, replies: list[bytes], *, idle_close: float | None = None,
                            delay: float = 0.0) -> int:
    """A raw upstream answering the n-th request head of each connection with ``replies[n]``.

    An empty reply closes the connection without answering; after the last reply it closes too.
    ``idle_close`` closes a connection idle that long (a server's keep-alive timeout).
    """

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        served = 0
        try:
            while True:
                with trio.move_on_after(idle_close if idle_close is not None else math.inf) as idle:
                    data = await stream.receive_some(65536)
                if idle.cancelled_caught or not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    reply = replies[served] if served < len(replies) else b""
                    served += 1
                    await trio.sleep(delay)
                    if not reply:
                        return
                    await stream.send_all(reply)
                    if served == len(replies):
                        return
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


# --------------------------------------------------------------------------------------------
# Raw public client
# --------------------------------------------------------------------------------------------


@attrs.define
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A hand-written HTTP/1.x client over one connection (plain or TLS)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(256 * 1024)
        if not data:
            return False
        self.buf += data
        return True

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EOFError(f"EOF with {len(self.buf)} of {n} body bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if not await self._fill():
                raise EOFError("EOF inside a chunk line")
        out = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return out

    async def read_response(self, method: str = "GET", *, interim: bool = False) -> Response:
        """The next response; 1xx are skipped unless ``interim``."""
        while True:
            while (i := self.buf.find(b"\r\n\r\n")) < 0:
                if not await self._fill():
                    raise EOFError(f"EOF before a response head (have {bytes(self.buf[:80])!r})")
            head = bytes(self.buf[:i]).decode("latin-1")
            del self.buf[: i + 4]
            status_line, *lines = head.split("\r\n")
            version, status_s, *_ = status_line.split(" ", 2)
            headers = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines)]
            resp = Response(version, int(status_s), headers, b"")
            if 100 <= resp.status < 200 and resp.status != 101:
                if interim:
                    return resp
                continue
            break
        if method == "HEAD" or resp.status in (101, 204, 304):
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None and "chunked" in te.lower():
            parts = []
            while True:
                size = int((await self._line()).split(b";")[0], 16)
                if size == 0:
                    while await self._line():
                        pass
                    break
                parts.append(await self._exactly(size))
                if await self._line() != b"":
                    raise ValueError("bad chunk terminator")
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = await self._exactly(int(cl))
        else:
            while await self._fill():
                pass
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    async def request(self, method: str, path: str, host: str, *,
                      headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                      version: str = "1.1") -> Response:
        await self.send(request_bytes(method, path, host, headers=headers, body=body, version=version))
        return await self.read_response(method)

    async def at_eof(self) -> bool:
        """Read until the connection ends (EOF or reset); True if no stray bytes came."""
        try:
            while await self._fill():
                pass
        except (trio.BrokenResourceError, ConnectionError):
            pass
        return not self.buf

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def request_bytes(method: str, path: str, host: str, *, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    for k, v in headers or ():
        lines.append(f"{k}: {v}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def host_of(agent: Agent, index: int = 1) -> str:
    host = urlsplit(agent.tunnels[index].public_url).hostname
    assert host
    return host


async def http_tunnel(env: EdgeEnv, upstream_port: int, name: str = "web") -> tuple[Agent, str]:
    agent = await env.start_agent(TunnelConfig(name=name, proto="http", addr=f"127.0.0.1:{upstream_port}"))
    assert agent.tunnels[0].public_url.startswith("https://")
    assert agent.tunnels[1].public_url.startswith("http://")
    assert host_of(agent, 0) == host_of(agent, 1)
    return agent, host_of(agent)


async def start_cancellable_agent(env: EdgeEnv, *tunnels: TunnelConfig) -> tuple[Agent, trio.CancelScope]:
    agent = Agent(env.agent_config(), list(tunnels))
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await agent.run(task_status=task_status)

    await env.nursery.start(run)
    return agent, scope


async def curl(*args: str) -> tuple[int, bytes]:
    """Run curl; returns (status, body). The status comes from ``-w``."""
    proc = await trio.run_process(["curl", "-s", "-S", "-o", "-", "-w", "\n%{http_code}", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    body, _, status = proc.stdout.rpartition(b"\n")
    return int(status), body


def httpx_client(**kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(), timeout=20, **kw)


def httpx_for(env: EdgeEnv, scheme: str, host: str,
              **kw: Any) -> tuple[httpx.AsyncClient, str, dict[str, Any]]:
    """A client reaching ``host`` through the edge's ``scheme`` listener at 127.0.0.1.

    Returns (client, base URL, request extensions): over HTTPS the TLS name (SNI and the
    certificate check) is ``host`` through httpx's ``sni_hostname`` extension.
    """
    if scheme == "http":
        return httpx_client(headers={"Host": host}, **kw), f"http://127.0.0.1:{env.http_port}", {}
    ctx = ssl.create_default_context(cafile=str(env.ca))
    client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(verify=ctx), timeout=20,
                               headers={"Host": host}, **kw)
    return client, f"https://127.0.0.1:{env.https_port}", {"sni_hostname": host}


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    return await Upstream("A").start(nursery)


@pytest.fixture
async def web(edge_env: EdgeEnv, upstream: Upstream) -> str:
    """The public host of an HTTP tunnel to ``upstream``."""
    _agent, host = await http_tunnel(edge_env, upstream.port)
    return host


# --------------------------------------------------------------------------------------------
# Clients: curl (http and https), forwarding headers, keep-alive routing
# --------------------------------------------------------------------------------------------


async def test_curl_http_and_https(edge_env: EdgeEnv, web: str) -> None:
    with trio.fail_after(15):
        status, body = await curl("-H", f"Host: {web}", f"http://127.0.0.1:{edge_env.http_port}/hello")
        assert (status, body) == (200, b"hello from A\n")

        port = edge_env.https_port
        status, body = await curl("--cacert", str(edge_env.ca), "--resolve", f"{web}:{port}:127.0.0.1",
                                  f"https://{web}:{port}/hello")
        assert (status, body) == (200, b"hello from A\n")

        # The URL the agent reports works as-is (curl resolves the name through --resolve).
        agent_url = f"https://{web}:{port}/echo?x=1"
        status, body = await curl("--cacert", str(edge_env.ca), "--resolve", f"{web}:{port}:127.0.0.1",
                                  agent_url)
        assert status == 200
        assert json.loads(body)["target"] == "/echo?x=1"


async def test_forwarded_headers(edge_env: EdgeEnv, web: str, upstream: Upstream) -> None:
    with trio.fail_after(15):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/echo", web)
        seen = dict((k.lower(), v) for k, v in resp.json()["headers"])
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == web

        # A client's X-Forwarded-For is appended to; -Proto and -Host cannot be spoofed.
        resp = await client.request("GET", "/echo", f"{web}:{edge_env.http_port}", headers=[
            ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example")])
        pairs = [(k.lower(), v) for k, v in resp.json()["headers"]]
        assert [v for k, v in pairs if k == "x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
        assert [v for k, v in pairs if k == "x-forwarded-proto"] == ["http"]
        assert [v for k, v in pairs if k == "x-forwarded-host"] == [f"{web}:{edge_env.http_port}"]
        await client.aclose()

        # Over HTTPS the proto is https.
        port = edge_env.https_port
        status, body = await curl("--cacert", str(edge_env.ca), "--resolve", f"{web}:{port}:127.0.0.1",
                                  "-H", "X-Forwarded-For: 198.51.100.1, 198.51.100.2",
                                  f"https://{web}:{port}/echo")
        assert status == 200
        seen = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
        assert seen["x-forwarded-proto"] == "https"
        assert seen["x-forwarded-for"] == "198.51.100.1, 198.51.100.2, 127.0.0.1"
        assert seen["x-forwarded-host"] == f"{web}:{port}"


async def test_keep_alive_routes_each_request_by_host(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    up_a = await Upstream("A").start(nursery)
    up_b = await Upstream("B").start(nursery)
    _, host_a = await http_tunnel(edge_env, up_a.port, "a")
    _, host_b = await http_tunnel(edge_env, up_b.port, "b")
    with trio.fail_after(15):
        client = await RawClient.connect(edge_env.http_port)
        for host, name in [(host_a, "A"), (host_b, "B"), (host_b, "B"), (host_a, "A")]:
            resp = await client.request("GET", "/hello", host)
            assert resp.status == 200
            assert resp.header("X-Upstream") == name
            assert resp.body == f"hello from {name}\n".encode()

        # Pipelined: both requests in one write, answers in order.
        await client.send(request_bytes("GET", "/hello", host_b) + request_bytes("GET", "/hello", host_a))
        first = await client.read_response()
        second = await client.read_response()
        assert (first.header("X-Upstream"), second.header("X-Upstream")) == ("B", "A")

        # A keep-alive HEAD (no body follows) does not stall the next request.
        resp = await client.request("HEAD", "/hello", host_a)
        assert resp.status == 200 and resp.header("Content-Length") == "13" and resp.body == b""
        resp = await client.request("GET", "/hello", host_a)
        assert resp.body == b"hello from A\n"
        await client.aclose()
    assert [r["target"] for r in up_b.requests] == ["/hello"] * 3


async def test_absolute_form_target_routes_by_its_authority(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """RFC 9112 §3.2.2: the target's authority wins over Host, and the upstream sees it as Host."""
    up_a = await Upstream("A").start(nursery)
    up_b = await Upstream("B").start(nursery)
    _, host_a = await http_tunnel(edge_env, up_a.port, "a")
    _, host_b = await http_tunnel(edge_env, up_b.port, "b")
    with trio.fail_after(15):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", f"http://{host_a}/echo", host_b)
        assert resp.status == 200 and resp.header("X-Upstream") == "A"
        seen = dict((k.lower(), v) for k, v in resp.json()["headers"])
        assert seen["host"] == host_a and seen["x-forwarded-host"] == host_a
        await client.aclose()
    assert not up_b.requests


# --------------------------------------------------------------------------------------------
# Bodies, framing, protocol versions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def payload() -> bytes:
    return pattern(20 * MiB, 7)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_large_upload_content_length_and_chunked(edge_env: EdgeEnv, web: str, payload: bytes,
                                                       scheme: str) -> None:
    want = hashlib.sha256(payload).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1_000_003):
            yield payload[i:i + 1_000_003]

    client, base, ext = httpx_for(edge_env, scheme, web)
    with trio.fail_after(30):
        async with client:
            resp = await client.post(f"{base}/sha256", content=payload, extensions=ext)
            assert resp.status_code == 200
            assert resp.json() == {"length": len(payload), "sha256": want}

            resp = await client.post(f"{base}/sha256", content=chunks(), extensions=ext)
            assert resp.request.headers.get("transfer-encoding") == "chunked"
            assert resp.status_code == 200
            assert resp.json() == {"length": len(payload), "sha256": want}


async def test_chunked_response_streamed(edge_env: EdgeEnv, web: str) -> None:
    size = 20 * MiB + 123
    want = hashlib.sha256(pattern(size, 3)).hexdigest()
    with trio.fail_after(30):
        async with httpx_client(headers={"Host": web}) as client:
            url = f"http://127.0.0.1:{edge_env.http_port}/stream?size={size}&seed=3"
            async with client.stream("GET", url) as resp:
                assert resp.status_code == 200
                assert resp.headers.get("transfer-encoding") == "chunked"
                digest = hashlib.sha256()
                total = 0
                async for piece in resp.aiter_raw():
                    digest.update(piece)
                    total += len(piece)
            assert (total, digest.hexdigest()) == (size, want)
            # The same connection serves another request afterwards.
            resp2 = await client.get(f"http://127.0.0.1:{edge_env.http_port}/hello")
            assert resp2.text == "hello from A\n"


async def test_expect_100_continue_with_curl(edge_env: EdgeEnv, web: str, upstream: Upstream,
                                             tmp_path: Path) -> None:
    data = pattern(8 * MiB, 11)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    with trio.fail_after(15):
        # Were the 100 not relayed, curl would wait out the (long) expect timeout.
        status, body = await curl("--expect100-timeout", "60", "-H", "Expect: 100-continue",
                                  "-H", f"Host: {web}", "--data-binary", f"@{path}",
                                  f"http://127.0.0.1:{edge_env.http_port}/sha256")
    assert status == 200
    assert json.loads(body) == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert upstream.continues_sent == 1

    # The raw view: the 100 reaches the client before it sends a byte of body.
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(request_bytes("POST", "/sha256", web, headers=[
            ("Expect", "100-continue"), ("Content-Length", "5")]))
        interim = await client.read_response(interim=True)
        assert interim.status == 100
        await client.send(b"hello")
        resp = await client.read_response()
        assert resp.json()["sha256"] == hashlib.sha256(b"hello").hexdigest()
        await client.aclose()


async def test_head_request(edge_env: EdgeEnv, web: str) -> None:
    with trio.fail_after(10):
        proc = await trio.run_process(["curl", "-s", "-S", "-I", "-H", f"Host: {web}",
                                       f"http://127.0.0.1:{edge_env.http_port}/hello"], capture_stdout=True)
        text = proc.stdout.decode().lower()
        assert text.startswith("http/1.1 200")
        assert "content-length: 13" in text
        # A HEAD of a chunked resource: no body, and the connection stays usable.
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("HEAD", "/stream?size=100000", web)
        assert resp.status == 200 and resp.body == b""
        resp = await client.request("GET", "/hello", web)
        assert resp.body == b"hello from A\n"
        await client.aclose()


async def test_http10_client(edge_env: EdgeEnv, web: str) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/hello", web, version="1.0")
        assert resp.status == 200 and resp.body == b"hello from A\n"
        assert await client.at_eof()  # 1.0 without keep-alive: the edge closes

        # No Content-Length for a 1.0 client: the body is delimited by close, end to end.
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/stream?size=300000&seed=5", web, version="1.0")
        assert resp.status == 200
        assert resp.header("Transfer-Encoding") is None
        assert resp.body == pattern(300000, 5)
        await client.aclose()

        status, body = await curl("--http1.0", "-H", f"Host: {web}",
                                  f"http://127.0.0.1:{edge_env.http_port}/hello")
        assert (status, body) == (200, b"hello from A\n")


async def test_stray_crlf_between_requests(edge_env: EdgeEnv, web: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty lines between requests are ignored and do not start the head timeout."""
    monkeypatch.setattr(_edge, "HEAD_TIMEOUT", 0.3)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("POST", "/sha256", web, body=b"abc")
        assert resp.status == 200
        await client.send(b"\r\n")  # as some clients do after a POST body
        await trio.sleep(0.6)
        resp = await client.request("GET", "/hello", web)
        assert resp.status == 200, resp
        await client.send(b"\r\n\r\n" + request_bytes("GET", "/hello", web))
        assert (await client.read_response()).body == b"hello from A\n"
        await client.aclose()


async def test_connection_close(edge_env: EdgeEnv, web: str) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/hello", web, headers=[("Connection", "close")])
        assert resp.status == 200 and resp.body == b"hello from A\n"
        assert await client.at_eof()


# --------------------------------------------------------------------------------------------
# WebSocket, concurrency
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_websocket_echo(edge_env: EdgeEnv, nursery: trio.Nursery, scheme: str) -> None:
    ws_port = await ws_echo_server(nursery)
    agent, host = await http_tunnel(edge_env, ws_port, "ws")
    with trio.fail_after(15):
        if scheme == "http":
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", edge_env.http_port)
        else:
            ctx = ssl.create_default_context(cafile=str(edge_env.ca))
            tcp = await trio.open_tcp_stream("127.0.0.1", edge_env.https_port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
            await stream.do_handshake()
        async with trio.open_nursery() as ws_nursery:
            ws = await trio_websocket.wrap_client_stream(ws_nursery, stream, host, "/chat")
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            big = pattern(512 * 1024, 9)  # under the 1 MiB default message limit
            await ws.send_message(big)
            assert await ws.get_message() == big
            for i in range(20):
                await ws.send_message(f"m{i}")
            assert [await ws.get_message() for _ in range(20)] == [f"m{i}" for i in range(20)]
            await ws.aclose()


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_hundred_concurrent_requests(edge_env: EdgeEnv, web: str, scheme: str) -> None:
    results: list[int] = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    client, base, ext = httpx_for(edge_env, scheme, web, limits=limits)
    with trio.fail_after(30):
        async with client:

            async def one(i: int) -> None:
                resp = await client.get(f"{base}/echo", params={"i": str(i)}, extensions=ext)
                assert resp.status_code == 200
                assert resp.json()["target"] == f"/echo?i={i}"
                results.append(i)

            async with trio.open_nursery() as n:
                for i in range(100):
                    n.start_soon(one, i)
    assert sorted(results) == list(range(100))


# --------------------------------------------------------------------------------------------
# Errors generated by the edge and the agent
# --------------------------------------------------------------------------------------------


async def test_unknown_host_404(edge_env: EdgeEnv) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/", "nope.tunneld.test")
        assert resp.status == 404
        assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3200"
        assert b"nope.tunneld.test" in resp.body
        assert await client.at_eof()

        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("HEAD", "/", "nope.tunneld.test")
        assert resp.status == 404 and resp.header(ERROR_HEADER) == "ERR_TUNNELD_3200"
        assert await client.at_eof()  # and no body bytes after the head

        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/", "nope.tunneld.test", headers=[("Accept", "application/json")])
        assert resp.json()["error_code"] == "ERR_TUNNELD_3200"
        await client.aclose()

        # No Host header at all: HTTP/1.0 may omit it (no tunnel has the empty name) ...
        client = await RawClient.connect(edge_env.http_port)
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 404 and resp.header(ERROR_HEADER) == "ERR_TUNNELD_3200"
        await client.aclose()
        # ... HTTP/1.1 must not (RFC 9112 §3.2): a malformed request.
        client = await RawClient.connect(edge_env.http_port)
        await client.send(b"GET / HTTP/1.1\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 400 and resp.header(ERROR_HEADER) == "ERR_TUNNELD_3400"
        await client.aclose()


async def test_upstream_down_502(edge_env: EdgeEnv) -> None:
    _, host = await http_tunnel(edge_env, closed_port(), "down")
    with trio.fail_after(15):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/", host)
        assert resp.status == 502
        assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_8012"
        await client.aclose()
        status, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{edge_env.http_port}/")
        assert status == 502


async def test_oversized_head_431(edge_env: EdgeEnv, web: str, upstream: Upstream) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        head = request_bytes("GET", "/hello", web, headers=[("X-Big", "a" * (MiB + 10))])
        # The edge answers once it has read past the limit; it need not read the rest.
        async with trio.open_nursery() as n:
            n.start_soon(_send_ignoring_errors, client.stream, head)
            resp = await client.read_response()
        assert resp.status == 431
        assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3431"
        await client.aclose()
    assert upstream.requests == []


async def _send_ignoring_errors(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.mark.parametrize("head", [
    b"HELLO WORLD\r\nHost: {host}\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\nHost: other.tunneld.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\nBad Header Name: 1\r\n\r\n",
], ids=["request-line", "te-and-cl", "two-hosts", "bad-length", "bad-header"])
async def test_malformed_request_400(edge_env: EdgeEnv, upstream: Upstream, head: bytes) -> None:
    agent, host = await http_tunnel(edge_env, upstream.port)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(head.replace(b"{host}", host.encode()))
        resp = await client.read_response()
        assert resp.status == 400
        assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3400"
        assert await client.at_eof()
    # Never reached the agent, let alone the upstream.
    assert [t.metrics.conns_count for t in agent.tunnels] == [0, 0]
    assert upstream.requests == []


async def test_slow_head_408(edge_env: EdgeEnv, web: str, upstream: Upstream,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_edge, "HEAD_TIMEOUT", 0.5)
    with trio.fail_after(5):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(f"GET /hello HTTP/1.1\r\nHost: {web}\r\nX-Slow: ".encode())
        start = trio.current_time()
        resp = await client.read_response()
        assert resp.status == 408
        assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3408"
        assert 0.3 < trio.current_time() - start < 3
        assert await client.at_eof()
    assert upstream.requests == []


async def test_connect_405(edge_env: EdgeEnv, web: str, upstream: Upstream) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        for target in ("example.com:443", f"{web}:80"):
            await client.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            resp = await client.read_response()
            assert resp.status == 405
            assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3405"
            assert await client.at_eof()
            client = await RawClient.connect(edge_env.http_port)
        await client.aclose()
    assert upstream.requests == []


async def test_upstream_cannot_forge_error_header(edge_env: EdgeEnv, web: str) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/forge", web)
        assert resp.status == 200 and resp.body == b"forged"
        assert resp.header(ERROR_HEADER) is None
        assert resp.header("X-Other") == "kept"
        await client.aclose()


async def test_204_and_304_keep_alive(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    replies = [b"HTTP/1.1 204 No Content\r\n\r\n",
               b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n", OK]
    port = await scripted_upstream(nursery, replies)
    _, host = await http_tunnel(edge_env, port)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        assert [(await client.request("GET", "/", host)).status for _ in range(3)] == [204, 304, 200]
        await client.aclose()


async def test_chunked_request_with_extensions_and_trailers(edge_env: EdgeEnv, web: str) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        head = f"POST /sha256 HTTP/1.1\r\nHost: {web}\r\nTransfer-Encoding: chunked\r\n\r\n"
        await client.send(head.encode() + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")
        resp = await client.read_response()
        assert resp.json() == {"length": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}
        # Host matching ignores case, a trailing dot and the port.
        resp = await client.request("GET", "/hello", f"{web.upper()}.:{edge_env.http_port}")
        assert resp.status == 200 and resp.body == b"hello from A\n"
        await client.aclose()


async def test_upstream_closes_idle_keep_alive(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """An upstream dropping an idle kept-alive connection (its keep-alive timeout) is no error."""
    port = await scripted_upstream(nursery, [OK] * 5, idle_close=0.2)
    _, host = await http_tunnel(edge_env, port)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        for _ in range(3):
            resp = await client.request("GET", "/", host)
            assert resp.status == 200, (resp.status, resp.header(ERROR_HEADER), resp.body[:200])
            await trio.sleep(0.4)
        await client.aclose()


async def test_reused_upstream_connection_closing_is_retried(edge_env: EdgeEnv,
                                                             nursery: trio.Nursery) -> None:
    """The race behind an idle timeout: the upstream closes a reused connection instead of answering."""
    port = await scripted_upstream(nursery, [OK, b""])
    _, host = await http_tunnel(edge_env, port)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        for _ in range(3):
            assert (await client.request("GET", "/", host)).status == 200
        # A request with a body cannot be replayed: it fails as it did.
        resp = await client.request("POST", "/", host, body=b"data")
        assert resp.status == 502 and resp.header(ERROR_HEADER) == "ERR_TUNNELD_8012"
        assert await client.at_eof()


async def test_kept_alive_upstream_closed_while_idle_is_replaced_before_a_post(
        edge_env: EdgeEnv, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream connection idle past PROBE_AFTER_IDLE and closed by the upstream is not used:
    a POST (never replayed) goes out on a new one."""
    monkeypatch.setattr(http_agent, "PROBE_AFTER_IDLE", 0.05)
    port = await scripted_upstream(nursery, [OK])  # one answer per connection, then a silent close
    _, host = await http_tunnel(edge_env, port)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        assert (await client.request("GET", "/", host)).status == 200
        await trio.sleep(0.2)
        resp = await client.request("POST", "/", host, body=b"data")
        assert resp.status == 200, (resp.status, resp.header(ERROR_HEADER), resp.body[:200])
        await client.aclose()


# --------------------------------------------------------------------------------------------
# Upstream connections kept between public connections (_pool)
# --------------------------------------------------------------------------------------------


def idle_upstreams(port: int) -> int:
    """Connections to the upstream on ``port`` parked in the agent's pool (this Trio run's)."""
    pool = _pool._pools().get(f"http://127.0.0.1:{port}")
    return 0 if pool is None else len(pool.idle)


async def wait_for(condition: Any, what: str) -> None:
    with trio.move_on_after(5):
        while not condition():
            await trio.sleep(0.01)
    assert condition(), f"not within 5 s: {what}"


async def test_public_connections_reuse_an_idle_upstream_connection(edge_env: EdgeEnv,
                                                                    nursery: trio.Nursery) -> None:
    """One request per public connection, with ``Connection: close`` or without, with a body or
    without (a webhook): one upstream connection serves them all, and the client's close still
    closes the public connection."""
    up = await Upstream("P").start(nursery)
    _, host = await http_tunnel(edge_env, up.port, "pooled")
    with trio.fail_after(10):
        for close, body in ((False, b""), (True, b""), (True, b"{}"), (False, b"{}"), (True, b"")):
            client = await RawClient.connect(edge_env.http_port)
            headers = [("Connection", "close")] if close else []
            resp = await client.request("POST" if body else "GET", "/echo", host, headers=headers, body=body)
            assert resp.status == 200 and resp.json()["length"] == len(body)
            sent = [k.lower() for k, _ in resp.json()["headers"]]
            assert "connection" not in sent  # the public connection's close is not the upstream's
            if close:
                assert resp.header("Connection") == "close"
                assert await client.at_eof()
            await client.aclose()
            await wait_for(lambda: idle_upstreams(up.port) == 1, "the upstream connection parked")
        assert (up.accepted, up.open_connections) == (1, 1)


@attrs.define
class _BareTunnel:
    """Just enough of an AgentTunnelContext for ``serve_http_stream`` (no inspector, no options)."""

    upstream: str
    name: str = "bare"
    config: Any = attrs.field(factory=lambda: types.SimpleNamespace(options={}))

    def record_http(self, header: Any, head: bytes) -> None:
        return None

    def request_done(self, seconds: float) -> None:
        pass


async def test_the_agent_ends_a_public_connection_whose_request_said_close(nursery: trio.Nursery) -> None:
    """With the client's ``Connection: close`` kept from the upstream, the exchange runs as a
    keep-alive one, yet the agent still ends the public connection after the response (it does
    not wait for a request the client will not send) and parks the upstream connection."""
    up = await Upstream("P").start(nursery)
    edge_side, agent_side = trio.testing.memory_stream_pair()
    header = proto.ProxyHeader(id="t", client_addr="127.0.0.1:1", proto="http")
    got = bytearray()

    async def edge() -> None:
        await edge_side.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Content-Length: 2\r\n\r\n{}")
        while b"\r\n\r\n" not in got or not got.endswith(b"}"):
            got.extend(await edge_side.receive_some())

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(edge)
            await http_agent.serve_http_stream(_BareTunnel(f"http://127.0.0.1:{up.port}"), agent_side, header)
    assert got.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in got
    assert "connection" not in {k.lower() for k, _ in up.requests[0]["headers"]}
    assert idle_upstreams(up.port) == 1


async def test_an_idle_upstream_connection_the_upstream_closed_is_not_reused(edge_env: EdgeEnv,
                                                                             nursery: trio.Nursery) -> None:
    """The upstream closes after each answer without saying so: every parked connection is
    found closed before reuse, so a POST (never replayed) still succeeds."""
    port = await scripted_upstream(nursery, [OK])
    _, host = await http_tunnel(edge_env, port)
    with trio.fail_after(10):
        for _ in range(3):
            client = await RawClient.connect(edge_env.http_port)
            resp = await client.request("POST", "/", host, body=b"data")
            assert resp.status == 200, (resp.status, resp.header(ERROR_HEADER), resp.body[:200])
            await client.aclose()
            await wait_for(lambda: idle_upstreams(port) == 1, "the upstream connection parked")
            await trio.sleep(0.05)  # the upstream's FIN arrives


async def test_idle_upstream_connections_are_bounded_and_closed_in_time(
        edge_env: EdgeEnv, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool, "IDLE_TIMEOUT", 0.5)
    up = await Upstream("P").start(nursery)
    _, host = await http_tunnel(edge_env, up.port, "bounded")
    with trio.fail_after(10):
        clients = []
        for _ in range(_pool.MAX_IDLE + 4):
            client = await RawClient.connect(edge_env.http_port)
            assert (await client.request("GET", "/hello", host)).status == 200
            clients.append(client)
        assert up.open_connections == _pool.MAX_IDLE + 4
        for client in clients:
            await client.aclose()
        await wait_for(lambda: up.open_connections == _pool.MAX_IDLE, "the ones past MAX_IDLE closed")
        assert idle_upstreams(up.port) == _pool.MAX_IDLE
        closed_from = trio.current_time()
        await wait_for(lambda: up.open_connections == 0, "the sweeper closed the rest")
        assert trio.current_time() - closed_from < 2
        assert f"http://127.0.0.1:{up.port}" not in _pool._pools()
        # And the next public connection opens a new one.
        client = await RawClient.connect(edge_env.http_port)
        assert (await client.request("GET", "/hello", host)).status == 200
        await client.aclose()
        assert up.accepted == _pool.MAX_IDLE + 5


@pytest.mark.parametrize(("scheme", "next_status"), [("NTLM", 401), ("Negotiate", 401), ("Basic", 200)])
async def test_a_connection_bound_login_is_never_handed_to_another_client(
        edge_env: EdgeEnv, nursery: trio.Nursery, scheme: str, next_status: int) -> None:
    """NTLM and Negotiate log in the upstream connection: after one client's login its connection
    is closed with the client's, so the next client meets the challenge, not the login.  Basic
    authenticates each request: that connection is reused."""
    challenge = f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {scheme}\r\nContent-Length: 0\r\n\r\n"
    port = await scripted_upstream(nursery, [challenge.encode(), OK, OK])  # per upstream connection
    _, host = await http_tunnel(edge_env, port)
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        assert (await client.request("GET", "/", host)).status == 401
        resp = await client.request("GET", "/", host, headers=[("Authorization", f"{scheme} dG9rZW4=")])
        assert resp.status == 200
        await client.aclose()
        await trio.sleep(0.2)
        client = await RawClient.connect(edge_env.http_port)
        assert (await client.request("GET", "/", host)).status == next_status
        await client.aclose()


@pytest.mark.parametrize(("version", "headers", "body"), [
    ("1.1", [("Connection", "close, x-other")], b""),  # more than close
    ("1.1", [("Connection", "close, x-other")], b"data"),
    ("1.0", [("Connection", "close")], b""),
])
async def test_connection_close_reaches_the_upstream_unless_it_is_an_http11_requests_only_option(
        edge_env: EdgeEnv, nursery: trio.Nursery, version: str, headers: list[tuple[str, str]],
        body: bytes) -> None:
    up = await Upstream("P").start(nursery)
    _, host = await http_tunnel(edge_env, up.port, "unpooled")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("POST" if body else "GET", "/echo", host, headers=headers, body=body,
                                    version=version)
        assert resp.status == 200
        sent = {k.lower(): v for k, v in resp.json()["headers"]}
        assert sent["connection"] == headers[0][1]
        assert await client.at_eof()
        await client.aclose()
        await wait_for(lambda: up.open_connections == 0, "the upstream connection closed")
        assert idle_upstreams(up.port) == 0


async def test_bad_upstream_responses(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    garbage = await scripted_upstream(nursery, [b"garbage garbage\r\n\r\n"])
    smuggle = await scripted_upstream(nursery, [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                                                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
    silent = await scripted_upstream(nursery, [b""])
    truncated = await scripted_upstream(nursery, [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nshort"])
    with trio.fail_after(15):
        for port, code in [(garbage, "ERR_TUNNELD_3004"), (smuggle, "ERR_TUNNELD_3004"),
                           (silent, "ERR_TUNNELD_8012")]:
            _, host = await http_tunnel(edge_env, port, f"p{port}")
            client = await RawClient.connect(edge_env.http_port)
            resp = await client.request("GET", "/", host)
            assert (resp.status, resp.header(ERROR_HEADER)) == (502, code)
            await client.aclose()
        # A body cut short after the head went out: the client's connection is reset, so it can
        # tell the body is incomplete (never hung, never a clean end).
        _, host = await http_tunnel(edge_env, truncated, "truncated")
        client = await RawClient.connect(edge_env.http_port)
        await client.send(request_bytes("GET", "/", host))
        with trio.fail_after(3):
            with pytest.raises(trio.BrokenResourceError):
                await client.read_response()
        await client.aclose()


async def test_client_disconnect_closes_upstream(edge_env: EdgeEnv, web: str, upstream: Upstream) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(request_bytes("GET", f"/big?size={1024 * MiB}", web))
        assert await client.stream.receive_some(65536)
        assert upstream.open_connections == 1
        await client.aclose()
        while upstream.open_connections:
            await trio.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Failure isolation: agents that vanish or misbehave
# --------------------------------------------------------------------------------------------


async def _serve_steadily(port: int, host: str, stop: trio.Event, counter: list[int]) -> None:
    """Keep requesting ``host`` through the edge until ``stop``; every request must succeed."""
    client = await RawClient.connect(port)
    try:
        while not stop.is_set():
            resp = await client.request("GET", "/hello", host)
            assert resp.status == 200 and resp.body == b"hello from B\n", resp
            counter[0] += 1
            await trio.sleep(0.01)
    finally:
        await client.aclose()


async def test_agent_vanishes_mid_transfer(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    up_a = await Upstream("A").start(nursery)
    up_b = await Upstream("B").start(nursery)
    agent_a, scope_a = await start_cancellable_agent(
        edge_env, TunnelConfig(name="a", proto="http", addr=f"127.0.0.1:{up_a.port}"))
    host_a = host_of(agent_a)
    _, host_b = await http_tunnel(edge_env, up_b.port, "b")
    size = 1024 * MiB
    done = [0]
    with trio.fail_after(20):
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(_serve_steadily, edge_env.http_port, host_b, stop, done)
            client = await RawClient.connect(edge_env.http_port)
            await client.send(request_bytes("GET", f"/big?size={size}", host_a))
            got = 0
            while got < 2 * MiB:
                data = await client.stream.receive_some(256 * 1024)
                assert data
                got += len(data)
            # The agent disappears while the download is in flight.
            scope_a.cancel()
            with trio.fail_after(5):
                try:
                    while data := await client.stream.receive_some(256 * 1024):
                        got += len(data)
                except trio.BrokenResourceError:
                    pass
            assert got < size
            await client.aclose()
            # The route goes away with the session.
            with trio.fail_after(5):
                while True:
                    probe = await RawClient.connect(edge_env.http_port)
                    resp = await probe.request("GET", "/hello", host_a)
                    await probe.aclose()
                    if resp.status == 404:
                        break
                    await trio.sleep(0.05)
            assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3200"
            await trio.sleep(0.2)
            stop.set()
    assert done[0] > 3
    resp = await (await RawClient.connect(edge_env.http_port)).request("GET", "/hello", host_b)
    assert resp.body == b"hello from B\n"


async def test_agent_vanishes_before_response(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    port = await scripted_upstream(nursery, [OK], delay=30)
    agent, scope = await start_cancellable_agent(
        edge_env, TunnelConfig(name="slow", proto="http", addr=f"127.0.0.1:{port}"))
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(request_bytes("GET", "/", host_of(agent)))
        await trio.sleep(0.2)
        scope.cancel()
        with trio.fail_after(3):
            resp = await client.read_response()
        assert (resp.status, resp.header(ERROR_HEADER)) == (502, "ERR_TUNNELD_3210")
        assert await client.at_eof()


GARBAGE = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10
#: A DATA frame header (SYN, stream 3) announcing a 16 MiB - 1 payload.
OVERSIZED = b"\xff\xff\xff" + bytes([0x1 << 4 | 0x2]) + (3).to_bytes(4, "big") + b"\0" * 4096


@pytest.mark.parametrize("junk", [GARBAGE, OVERSIZED], ids=["garbage", "oversized-frame"])
async def test_misbehaving_agent_disconnected(edge_env: EdgeEnv, nursery: trio.Nursery, junk: bytes) -> None:
    up_b = await Upstream("B").start(nursery)
    _, host_b = await http_tunnel(edge_env, up_b.port, "b")
    sessions_before = len(edge_env.edge.sessions)
    done = [0]
    with trio.fail_after(15):
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(_serve_steadily, edge_env.http_port, host_b, stop, done)
            agent_port = edge_env.info.ports["agent"]
            bad = await open_tls_client("127.0.0.1", agent_port, client_context(edge_env.ca))
            try:
                await bad.send_all(junk)
            except trio.BrokenResourceError:
                pass
            with trio.fail_after(5):
                try:
                    while await bad.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
            await trio.aclose_forcefully(bad)
            with trio.fail_after(2):
                while len(edge_env.edge.sessions) != sessions_before:
                    await trio.sleep(0.02)
            await trio.sleep(0.2)
            stop.set()
    assert done[0] > 3
