"""The WebSocket carrier: the same mux inside binary WebSocket messages, over TLS.

For agents behind proxies or firewalls that pass only HTTPS.  The agent dials
``wss://HOST[:PORT][/PATH]`` (``--server-addr``); the edge serves it on its agent listener,
telling the two carriers apart by the first bytes after the TLS handshake: a muxado peer
always opens with a DATA+SYN frame (type/flags byte ``0x12``) while a WebSocket client sends
``GET /``.  Mux frames are packed into one binary frame per flush of the mux's writer;
frame and message boundaries mean nothing to the receiver, which hands payloads on as they
arrive.  The upgrade's heads are read by h11 (bounded at 16 KiB); the framing is
:mod:`.proto._wsframes`, with compiled masking where it was built (the agent masks all it
sends and the edge unmasks it: RFC 6455 5.3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from urllib.parse import urlsplit

import h11
import trio

from ._errors import RemoteProtocolError
from ._tls import CARRIER_SEND_CHUNK, start_tls_client
from .proto._wsframes import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    close_payload,
    frame_header,
    mask,
    parse_close,
)

#: What one read of the carrier asks the TLS layer for (the mux reads 1 MiB at a time too).
RECEIVE_SIZE = 1024 * 1024
#: Largest frame accepted; the mux's outbox never flushes more than a few MiB at once.
MAX_MESSAGE = 16 * 1024 * 1024
#: Longest upgrade request or response head (h11's default bound for an incomplete one).
MAX_UPGRADE_HEAD = 16 * 1024
#: How long closing waits to send its close frame.
CLOSE_TIMEOUT = 1.0
DEFAULT_PATH = "/tunneld"

Buffer = bytes | bytearray | memoryview


class HandshakeError(RemoteProtocolError):
    """The WebSocket upgrade failed: refused by the peer, or not a valid upgrade."""


def is_websocket_url(server_addr: str) -> bool:
    return server_addr.lower().startswith("wss://")


def parse_websocket_url(url: str) -> tuple[str, int, str]:
    """``wss://host[:port][/path]`` → (host, port, resource); ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "wss":
        raise ValueError(f"expected a wss:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    resource = (parts.path or DEFAULT_PATH) + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, resource


def check_server_addr(server_addr: str) -> None:
    """ValueError unless ``server_addr`` is ``HOST[:PORT]`` (443 implied) or a ``wss://`` URL."""
    from ._util import split_host_port

    if is_websocket_url(server_addr):
        parse_websocket_url(server_addr)
    else:
        split_host_port(server_addr, default_port=443)


class WebSocketStream(trio.abc.Stream):
    """A byte stream over binary WebSocket frames, on an upgraded TLS connection.

    Each send is one frame (one per flush of the mux's writer); received payloads are handed
    on as they arrive.  Pings are answered; a close frame is answered and reads as the end of
    the stream.  A frame the RFC forbids is a :class:`RemoteProtocolError`, after a close
    frame that says so.
    """

    def __init__(self, transport: trio.abc.Stream, *, client: bool, initial: bytes = b"") -> None:
        self.transport = transport
        self._client = client
        self._reader = FrameReader(masked=not client, max_frame=MAX_MESSAGE)
        self._reader.feed(initial)
        self._send_lock = trio.StrictFIFOLock()
        self._transport_parts = getattr(transport, "send_all_parts", None)
        self._close_sent = False
        self._eof = False

    def _frame(self, opcode: int, parts: list[Buffer]) -> list[Buffer]:
        """Header and payload of one frame, masked if this end is the client."""
        length = sum(map(len, parts))
        if not self._client:
            return [frame_header(opcode, length), *parts]
        key = os.urandom(4)
        out: list[Buffer] = [frame_header(opcode, length, key)]
        offset = 0
        for part in parts:
            out.append(mask(part, key, offset))
            offset += len(part)
        return out

    async def _send_frame(self, opcode: int, parts: list[Buffer]) -> None:
        frame = self._frame(opcode, parts)
        async with self._send_lock:
            if self._close_sent:
                raise trio.ClosedResourceError("the WebSocket carrier is closing")
            if opcode == OP_CLOSE:
                self._close_sent = True
            if self._transport_parts is not None:
                await self._transport_parts(frame)
            else:
                await self.transport.send_all(b"".join(frame))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            await trio.lowlevel.checkpoint()
            return
        await self._send_frame(OP_BINARY, [data])

    async def send_all_parts(self, parts: list[Buffer]) -> None:
        """One frame per flush of the mux writer, its pieces not joined."""
        await self._send_frame(OP_BINARY, parts)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = RECEIVE_SIZE if max_bytes is None else max_bytes
        reader = self._reader
        while not self._eof:
            try:
                event = reader.next(limit)
            except RemoteProtocolError as exc:
                await self._fail(exc)
                raise
            if event is None:
                data = await self.transport.receive_some(RECEIVE_SIZE)
                if not data:
                    if reader.in_frame:
                        raise RemoteProtocolError("the WebSocket carrier ended inside a frame")
                    self._eof = True
                    break
                reader.feed(data)
                continue
            opcode, payload = event
            if opcode == OP_BINARY:
                if payload:
                    return payload
            elif opcode == OP_PING:
                await self._reply(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                code, _reason = parse_close(payload)
                await self._reply(OP_CLOSE, close_payload(code) if code is not None else b"")
                self._eof = True
            # OP_PONG: we send no pings; an unsolicited pong is allowed and means nothing.
        await trio.lowlevel.checkpoint()
        return b""

    async def _reply(self, opcode: int, payload: bytes) -> None:
        """Answer a ping or a close; a carrier already closing or broken needs no answer."""
        try:
            await self._send_frame(opcode, [payload])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _fail(self, exc: RemoteProtocolError) -> None:
        """Tell the peer why before the error ends the session (section 7.1.7)."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._reply(OP_CLOSE, close_payload(CLOSE_PROTOCOL_ERROR, str(exc)[:100]))

    async def aclose(self) -> None:
        try:
            if not self._close_sent:
                # Not shielded: a forceful close (already cancelled) sends nothing.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reply(OP_CLOSE, close_payload(CLOSE_NORMAL))
        finally:
            await self.transport.aclose()


#: RFC 6455 4.2.2: the server proves it read the key by hashing it with this.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` answer to a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated tokens of every ``name`` field, lower-cased (h11 lower-cases names)."""
    return [t.strip().lower() for n, v in headers if n == name for t in v.split(b",") if t.strip()]


def _field(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The one value of ``name``; None if it is absent or repeated."""
    values = [v for n, v in headers if n == name]
    return values[0] if len(values) == 1 else None


def _upgrade_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What makes these heads' fields no WebSocket upgrade (RFC 6455 4.1 and 4.2.1), if anything."""
    if b"websocket" not in _tokens(headers, b"upgrade"):
        return "no Upgrade: websocket"
    if b"upgrade" not in _tokens(headers, b"connection"):
        return "no Connection: Upgrade"
    if _tokens(headers, b"sec-websocket-extensions"):
        return "WebSocket extensions are not supported"
    return None


async def connect_websocket(url: str, context: object, *, timeout: float = 10) -> WebSocketStream:
    """Dial ``url`` over TLS (``context``, as for the plain carrier) and upgrade, within ``timeout``.

    :class:`HandshakeError` if the server refuses the upgrade or answers with something else.
    """
    host, port, resource = parse_websocket_url(url)
    with trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(host, port)
        tls = await start_tls_client(tcp, context, server_hostname=host,  # type: ignore[arg-type]
                                     lean_io=True, send_chunk=CARRIER_SEND_CHUNK)
        try:
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return await _client_upgrade(tls, authority, resource)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise


async def _client_upgrade(tls: trio.abc.Stream, authority: str, resource: str) -> WebSocketStream:
    conn = h11.Connection(h11.CLIENT)
    key = base64.b64encode(os.urandom(16))
    request = h11.Request(method="GET", target=resource, headers=[
        (b"Host", authority.encode("idna")), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", key), (b"Sec-WebSocket-Version", b"13")])
    await tls.send_all(conn.send(request) or b"")
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeError(f"bad WebSocket upgrade response: {exc}") from None
        if event is h11.NEED_DATA:
            data = await _read_head(tls, b"", "server")
            if data is None:
                raise HandshakeError(f"bad WebSocket upgrade response: head over {MAX_UPGRADE_HEAD} bytes")
            if _bare_lf(data):
                raise HandshakeError("bad WebSocket upgrade response: bare LF (lines must end with CRLF)")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = list(event.headers)
            problem = _upgrade_problem(headers)
            if problem is None and _field(headers, b"sec-websocket-accept") != accept_token(key):
                problem = "wrong Sec-WebSocket-Accept"
            if problem is None and _field(headers, b"sec-websocket-protocol") is not None:
                problem = "a subprotocol nobody asked for"
            if problem is not None:
                raise HandshakeError(f"bad WebSocket upgrade response: {problem}")
            return WebSocketStream(tls, client=True, initial=conn.trailing_data[0])
        if isinstance(event, h11.Response):
            raise HandshakeError(f"WebSocket upgrade refused: HTTP {event.status_code}")
        # Another 1xx (100 Continue, 103 Early Hints): the answer is still to come.


async def accept_websocket(stream: trio.abc.Stream, head: bytes, *, timeout: float = 10) -> WebSocketStream:
    """Complete the server side of the WebSocket upgrade (any path) on ``stream``, whose first
    bytes, already read, are ``head``; a request that is no valid upgrade gets a 400 (426 for
    another WebSocket version) and a :class:`HandshakeError`.
    """
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    with trio.fail_after(timeout):
        data = await _read_head(stream, head, "client")
        if data is None:
            await _refuse(stream, conn, 431, [])
            raise HandshakeError(f"bad WebSocket upgrade request: head over {MAX_UPGRADE_HEAD} bytes")
        if _bare_lf(data):
            await _refuse(stream, conn, 400, [])
            raise HandshakeError("bad WebSocket upgrade request: bare LF (lines must end with CRLF)")
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await _refuse(stream, conn, exc.error_status_hint, [])
                raise HandshakeError(f"bad WebSocket upgrade request: {exc}") from None
            if event is h11.NEED_DATA:  # a body h11 waits for (already refused) or a head cut short
                raise HandshakeError("the client closed the connection during the WebSocket upgrade")
            if isinstance(event, h11.Request):
                request = event
                headers = list(event.headers)
                problem = _upgrade_problem(headers)
                key = _field(headers, b"sec-websocket-key")
                if problem is None and event.method != b"GET":
                    problem = f"method {event.method.decode('ascii', 'replace')}"
                if problem is None and event.http_version != b"1.1":
                    problem = f"HTTP/{event.http_version.decode('ascii', 'replace')}"
                if problem is None and (_field(headers, b"content-length") is not None
                                        or _field(headers, b"transfer-encoding") is not None):
                    problem = "a body"
                if problem is None and (key is None or not _is_key(key)):
                    problem = "no valid Sec-WebSocket-Key"
                if problem is None and _field(headers, b"sec-websocket-version") != b"13":
                    await _refuse(stream, conn, 426, [("Sec-WebSocket-Version", "13")])
                    raise HandshakeError("bad WebSocket upgrade request: WebSocket version is not 13")
                if problem is not None:
                    await _refuse(stream, conn, 400, [])
                    raise HandshakeError(f"bad WebSocket upgrade request: {problem}")
                continue
            if event is h11.PAUSED and request is not None:
                key = _field(list(request.headers), b"sec-websocket-key")
                assert key is not None
                answer = h11.InformationalResponse(status_code=101, headers=[
                    (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                    (b"Sec-WebSocket-Accept", accept_token(key))])
                await stream.send_all(conn.send(answer) or b"")
                return WebSocketStream(stream, client=False, initial=conn.trailing_data[0])
            # EndOfMessage of the request: h11 pauses next, the upgrade being proposed.
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise HandshakeError("the client closed the connection during the WebSocket upgrade")


async def _read_head(stream: trio.abc.Stream, data: bytes, peer: str) -> bytes | None:
    """``data`` and what follows up to the end of an HTTP head (and whatever came with it);
    None if the head runs past :data:`MAX_UPGRADE_HEAD` bytes.

    h11 bounds only the part of a head it is still waiting for: one read can bring a whole
    head of any size, so the bound is kept here.
    """
    buf = bytearray(data)
    while buf.find(b"\r\n\r\n", 0, MAX_UPGRADE_HEAD) < 0:
        if len(buf) >= MAX_UPGRADE_HEAD:
            return None
        chunk = await stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            raise HandshakeError(f"the {peer} closed the connection during the WebSocket upgrade")
        buf += chunk
    return bytes(buf)


def _bare_lf(data: bytes) -> bool:
    """Whether the head at the start of ``data`` has a line ending in LF alone (h11 takes those)."""
    head = data[:data.find(b"\r\n\r\n") + 4]
    return head.count(b"\n") != head.count(b"\r\n")


def _is_key(key: bytes) -> bool:
    """A ``Sec-WebSocket-Key``: 16 bytes in base64 (RFC 6455 4.1)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


async def _refuse(stream: trio.abc.Stream, conn: h11.Connection, status: int,
                  headers: list[tuple[str, str]]) -> None:
    """Answer a request that is no valid upgrade, as far as the connection still allows."""
    body = b"not a valid WebSocket upgrade\n"
    response = h11.Response(status_code=status, headers=[*headers, ("Content-Type", "text/plain"),
                                                         ("Content-Length", str(len(body))),
                                                         ("Connection", "close")])
    try:
        data = conn.send(response) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:  # the request was too broken to answer in HTTP
        return
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def looks_like_websocket(head: bytes) -> bool:
    """Whether the first bytes from an agent are an HTTP request (a WebSocket upgrade)."""
    return head[:4] == b"GET "
