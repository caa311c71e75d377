"""Replaying captured requests, as captured or modified (the local API's ``POST /api/requests/http``).

A replay takes the path of a public request: the request bytes are handed to the tunnel type's
``agent_handle`` on an in-memory stream, as if the edge had opened a proxy stream carrying
them, so ``--host-header``, the upstream's keep-alive handling and the 502 pages all apply,
and the request is captured again — marked ``replay_of`` through :data:`REPLAY_OF`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import proto
from ._capture import REPLAY_OF, CapturedExchange, parse_head

if TYPE_CHECKING:
    from ._agent import AgentTunnel

#: Longest a replay may take before it is abandoned (its entry then has no response).
REPLAY_TIMEOUT = 60.0
#: Bytes of the response kept by the in-memory client (the capture keeps what it needs).
_KEEP_RESPONSE = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Headers describing a body's framing: rebuilt whenever a request is modified.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class ReplayError(ValueError):
    """The replay cannot be built: a bad modification, or a body the capture did not keep whole."""


@attrs.frozen
class Modification:
    """Fields of a request to replace (modify-and-replay); None leaves the original's."""

    method: str | None = None
    path: str | None = None
    headers: list[tuple[str, str]] | None = None
    trailers: list[tuple[str, str]] | None = None
    body: bytes | None = None

    @classmethod
    def from_json(cls, data: object) -> Modification:
        """Validate the API's ``modify`` object; ReplayError naming the bad field."""
        if not isinstance(data, Mapping):
            raise ReplayError("modify: expected an object")
        unknown = set(data) - {"method", "path", "headers", "trailers", "body"}
        if unknown:
            raise ReplayError(f"modify: unknown field {sorted(unknown)[0]!r}")
        method = data.get("method")
        if method is not None and (not isinstance(method, str) or not _TOKEN.fullmatch(method)):
            raise ReplayError("modify.method: expected an HTTP method token (GET, POST, ...)")
        path = data.get("path")
        if path is not None and (not isinstance(path, str) or not _TARGET.fullmatch(path)
                                 or not (path.startswith("/") or path == "*" or "://" in path)):
            raise ReplayError("modify.path: expected a request target such as /path?query "
                              "(printable ASCII, no spaces)")
        body = data.get("body")
        if body is not None:
            if not isinstance(body, str):
                raise ReplayError("modify.body: expected a base64 string")
            try:
                body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise ReplayError("modify.body: not valid base64") from None
        return cls(method, path, _fields("headers", data.get("headers")),
                   _fields("trailers", data.get("trailers")), body)


def _fields(key: str, value: Any) -> list[tuple[str, str]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ReplayError(f"modify.{key}: expected a list of [name, value] pairs")
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ReplayError(f"modify.{key}[{i}]: expected [name, value] (two strings)")
        name, val = pair
        if not _TOKEN.fullmatch(name):
            raise ReplayError(f"modify.{key}[{i}]: {name[:64]!r} is not a valid header name")
        if _BAD_VALUE.search(val):
            raise ReplayError(f"modify.{key}[{i}]: the value of {name} has control characters")
        try:
            val.encode("latin-1")
        except UnicodeEncodeError:
            raise ReplayError(f"modify.{key}[{i}]: the value of {name} is not latin-1") from None
        out.append((name, val.strip(" \t")))
    return out


def dechunk(data: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """Body and trailers of a chunked body (as captured whole); ReplayError if malformed."""
    body = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise ReplayError("the captured chunked body is malformed")
        size_text = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ReplayError("the captured chunked body is malformed") from None
        pos = end + 2
        if size == 0:
            break
        body += data[pos:pos + size]
        pos += size + 2
    trailers = []
    for line in data[pos:].decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            trailers.append((name.strip(), value.strip()))
    return bytes(body), trailers


def build_request(entry: CapturedExchange, modify: Modification | None = None) -> bytes:
    """The bytes to replay for ``entry``: as captured, or with ``modify``'s fields replaced.

    A modified request is framed afresh: Content-Length for its body, or chunked encoding when
    it has trailers.
    """
    req = entry.request
    if modify is None:
        if req.truncated:
            raise ReplayError(f"the request body was captured truncated ({len(req.body)} of "
                              f"{req.body_size} bytes): replay it with a modified body")
        return req.raw
    (method, target, version), _ = parse_head(req.head)
    lines = req.head.decode("latin-1").split("\r\n")
    original = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]
    chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in original)
    body, trailers = modify.body, modify.trailers
    if body is None or (trailers is None and chunked):
        if req.truncated:
            raise ReplayError(f"the request body was captured truncated ({len(req.body)} of "
                              f"{req.body_size} bytes): give a body to replay it")
        old_body, old_trailers = dechunk(req.body) if chunked else (req.body, [])
        body = old_body if body is None else body
        trailers = old_trailers if trailers is None else trailers
    method = modify.method or method
    target = modify.path or target
    headers = modify.headers if modify.headers is not None else original
    if not any(n.lower() == "host" for n, _ in headers):
        # HTTP/1.1 requires one: keep the original's rather than have the request refused.
        headers = [*[(n, v) for n, v in original if n.lower() == "host"], *headers]
    head = [f"{method} {target} {version or 'HTTP/1.1'}"]
    head += [f"{n}: {v}" for n, v in headers if n.lower() not in _FRAMING]
    if trailers:
        head.append("Transfer-Encoding: chunked")
        out = "\r\n".join(head).encode("latin-1") + b"\r\n\r\n"
        if body:
            out += b"%x\r\n%s\r\n" % (len(body), body)
        out += b"0\r\n" + "".join(f"{n}: {v}\r\n" for n, v in trailers).encode("latin-1") + b"\r\n"
        return out
    if body or method.upper() not in _BODYLESS:
        head.append(f"Content-Length: {len(body)}")
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


class _ReplayClient(trio.abc.HalfCloseableStream):
    """The public client of a replay: sends the request bytes, then EOF; keeps a little of the answer."""

    def __init__(self, request: bytes) -> None:
        self._request = memoryview(request)
        self.response = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        n = len(self._request) if max_bytes is None else max_bytes
        data, self._request = bytes(self._request[:n]), self._request[n:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        room = _KEEP_RESPONSE - len(self.response)
        if room > 0:
            self.response += bytes(data[:room])

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def replay(tunnel: AgentTunnel, entry: CapturedExchange, modify: Modification | None = None,
                 *, timeout: float = REPLAY_TIMEOUT) -> bytes:
    """Send ``entry``'s request (or its modification) through ``tunnel`` as a public request would go.

    Returns the start of the response the relay wrote (the full exchange is captured as a new
    entry with ``replay_of`` set).  Raises ReplayError when the request cannot be built.
    """
    request = build_request(entry, modify)
    client = _ReplayClient(request)
    addr = f"[{entry.remote_addr}]:0" if ":" in entry.remote_addr else f"{entry.remote_addr}:0"
    header = proto.ProxyHeader(id=tunnel.tunnel_id, client_addr=addr, proto=tunnel.proto or "http")
    token = REPLAY_OF.set(entry.id)
    try:
        with trio.move_on_after(timeout):
            await tunnel.type.agent_handle(tunnel.context, client, header)
    finally:
        REPLAY_OF.reset(token)
    return bytes(client.response)
