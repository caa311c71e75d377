"""The WebSocket carrier: the same mux inside binary WebSocket messages, over TLS.

For agents behind proxies or firewalls that pass only HTTPS.  The agent dials
``wss://HOST[:PORT][/PATH]`` (``--server-addr``); the edge serves it on its agent listener,
telling the two carriers apart by the first bytes after the TLS handshake: a muxado peer
always opens with a DATA+SYN frame (type/flags byte ``0x12``) while a WebSocket client sends
``GET /``.  Mux frames are packed into messages as the mux's writer flushes them; message
boundaries mean nothing to the receiver.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream, wrap_server_stream

from ._errors import RemoteProtocolError
from ._tls import open_tls_client

#: The receive buffer the issue asks for: large enough that one read takes a whole 256 KiB frame.
RECEIVE_BUFFER = 256 * 1024
#: Largest message accepted; the mux's outbox never flushes more than a few MiB at once.
MAX_MESSAGE = 16 * 1024 * 1024
#: Messages read ahead of the mux (flow control stays the mux's job).
QUEUE = 4
DEFAULT_PATH = "/tunneld"


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
    """A byte stream over a WebSocket connection's binary messages."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._buf = memoryview(b"")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.ws.send_message(bytes(data))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError(f"websocket closed: {exc.reason}") from None

    async def send_all_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """One message per flush of the mux writer (fewer, larger frames)."""
        await self.send_all(b"".join(parts))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._buf:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return b""
            if isinstance(message, str):
                raise RemoteProtocolError("text message on the tunnel carrier; expected binary")
            self._buf = memoryview(message)
            if not self._buf:
                return await self.receive_some(max_bytes)
        n = len(self._buf) if max_bytes is None else max_bytes
        data, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return data

    async def aclose(self) -> None:
        await self.ws.aclose()


async def connect_websocket(nursery: trio.Nursery, url: str, context: object, *,
                            timeout: float = 10) -> WebSocketStream:
    """Dial ``url`` over TLS (``context``, as for the plain carrier) and open the WebSocket.

    The connection's reader task runs in ``nursery``.
    """
    host, port, resource = parse_websocket_url(url)
    tls = await open_tls_client(host, port, context, timeout=timeout)  # type: ignore[arg-type]
    try:
        with trio.fail_after(timeout):
            ws = await wrap_client_stream(nursery, tls, f"{host}:{port}", resource,  # type: ignore[arg-type]
                                          message_queue_size=QUEUE, max_message_size=MAX_MESSAGE,
                                          receive_buffer_size=RECEIVE_BUFFER)
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return WebSocketStream(ws)


async def accept_websocket(nursery: trio.Nursery, stream: trio.abc.Stream, *,
                           timeout: float = 10) -> WebSocketStream:
    """Complete the server side of the WebSocket handshake on ``stream`` (any path)."""
    with trio.fail_after(timeout):
        request = await wrap_server_stream(nursery, stream, message_queue_size=QUEUE,
                                           max_message_size=MAX_MESSAGE, receive_buffer_size=RECEIVE_BUFFER)
        ws = await request.accept()
    return WebSocketStream(ws)


def looks_like_websocket(head: bytes) -> bool:
    """Whether the first bytes from an agent are an HTTP request (a WebSocket upgrade)."""
    return head[:4] == b"GET "
