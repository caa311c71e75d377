"""Sans-IO reader of a TLS ClientHello: just enough of it to route a connection by SNI.

The edge peeks at the first bytes of every connection on its HTTPS port.  Feed them to
:meth:`ClientHelloParser.feed` as they arrive; each call answers

* :data:`NEED_MORE` — the ClientHello is not complete yet;
* :class:`Done` — its ``server_name`` (lower case, no trailing dot; None when the client sent
  no SNI) and how many input bytes the records holding it took (``consumed``);
* :class:`Error` — not TLS, malformed, or larger than the limit.

After Done or Error every further feed returns the same answer.  The parser never decrypts
or answers anything: the bytes themselves are forwarded (TLS tunnels) or replayed into the
edge's own TLS engine (HTTPS), which does the real validation.  It is strict about structure
anyway, because whatever it accepts decides where a connection goes.

Layout (RFC 8446 §5.1, §4.1.2; RFC 6066 §3)::

    record     type u8 = 22 (handshake) | version u16 (3.x) | length u16 (1..2^14) | fragment
    handshake  type u8 = 1 (ClientHello) | length u24 | body   (may span several records)
    body       version u16 | random [32] | session_id <0..32> | cipher_suites <2..2^16-2>
               | compression_methods <1..2^8-1> | extensions <0..2^16-1> (absent before TLS 1.2)
    server_name extension (type 0): list <1..2^16-1> of (name_type u8, name <1..2^16-1>)

Nothing here imports trio.
"""

from __future__ import annotations

import enum
import re

import attrs

__all__ = [
    "MAX_CLIENT_HELLO",
    "NEED_MORE",
    "Alert",
    "ClientHelloParser",
    "Done",
    "Error",
    "NeedMore",
    "alert_record",
]

#: Largest ClientHello accepted (handshake body bytes).  Real ones are 0.2-2 KiB; post-quantum
#: key shares add ~1.2 KiB.  ngrok's edge uses the same bound.
MAX_CLIENT_HELLO = 16 * 1024
#: Largest plaintext record fragment (2^14, RFC 8446 §5.1).
MAX_FRAGMENT = 16 * 1024

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0
#: What a server name may look like: DNS labels (A-labels for IDNs), underscores tolerated.
#: Used with fullmatch: "$" alone would also accept a trailing newline ("a.example\n").
_NAME = re.compile(rb"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?")


class Alert(enum.IntEnum):
    """TLS alert descriptions the edge may send before giving up on a connection."""

    HANDSHAKE_FAILURE = 40
    DECODE_ERROR = 50
    UNRECOGNIZED_NAME = 112


def alert_record(description: Alert) -> bytes:
    """A fatal plaintext alert record (what a TLS server sends to refuse a ClientHello)."""
    return bytes((21, 3, 3, 0, 2, 2, int(description)))


@attrs.frozen
class NeedMore:
    """The ClientHello is incomplete: feed more bytes."""


#: The one :class:`NeedMore` instance.
NEED_MORE = NeedMore()


@attrs.frozen
class Done:
    """A complete ClientHello."""

    #: The SNI host name, lower-cased without a trailing dot; None when the client sent none.
    server_name: str | None
    #: Input bytes taken by the records that carry the ClientHello.
    consumed: int


@attrs.frozen
class Error:
    """The input is not a usable ClientHello; the connection should be closed."""

    #: ``not_tls``, ``malformed`` or ``too_large`` (stable: it appears in access logs).
    kind: str
    #: A sentence for the log.
    reason: str


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked big-endian reads from one buffer; any overrun is :class:`_Malformed`."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def done(self) -> bool:
        return self._pos == len(self._data)

    def take(self, n: int, what: str) -> memoryview:
        end = self._pos + n
        if end > len(self._data):
            raise _Malformed(f"{what} runs past its enclosing block")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size: int, what: str, low: int = 0, high: int | None = None) -> memoryview:
        n = self.uint(size, f"{what} length")
        if n < low or (high is not None and n > high):
            raise _Malformed(f"{what} has {n} bytes (allowed {low}..{high if high is not None else 'any'})")
        return self.take(n, what)


def _server_name(data: memoryview) -> str | None:
    outer = _Reader(data)
    names = _Reader(outer.vector(2, "server name list", low=1))
    if not outer.done():
        raise _Malformed("bytes after the server name list")
    host: str | None = None
    while not names.done():
        name_type = names.uint(1, "server name type")
        name = bytes(names.vector(2, "server name", low=1))
        if name_type != _NAME_TYPE_HOST:
            continue  # other name types are undefined but skippable (RFC 6066 §3)
        if host is not None:
            raise _Malformed("two host names in the server_name extension")
        text = name.lower()
        if text.endswith(b"."):
            text = text[:-1]
        if not _NAME.fullmatch(text) or b".." in text:
            raise _Malformed(f"server name {name[:64]!r} is not a DNS name")
        host = text.decode("ascii")
    return host


def _parse_body(body: memoryview) -> str | None:
    r = _Reader(body)
    r.take(2, "client version")
    r.take(32, "random")
    r.vector(1, "session id", high=32)
    suites = r.vector(2, "cipher suites", low=2)
    if len(suites) % 2:
        raise _Malformed("odd cipher suite list length")
    r.vector(1, "compression methods", low=1)
    if r.done():
        return None  # no extensions at all (allowed before TLS 1.2)
    extensions = _Reader(r.vector(2, "extensions"))
    if not r.done():
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    host: str | None = None
    while not extensions.done():
        ext_type = extensions.uint(2, "extension type")
        ext_data = extensions.vector(2, f"extension {ext_type}")
        if ext_type in seen:
            raise _Malformed(f"extension {ext_type} appears twice")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            host = _server_name(ext_data)
    return host


class ClientHelloParser:
    """Incremental ClientHello reader; see the module docstring."""

    def __init__(self, max_size: int = MAX_CLIENT_HELLO) -> None:
        self.max_size = max_size
        self._buf = bytearray()  # bytes not yet taken as whole records
        self._hello = bytearray()  # handshake bytes reassembled from record fragments
        self._consumed = 0
        self._records = 0
        self._result: Done | Error | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> NeedMore | Done | Error:
        """Add bytes that arrived; see the module docstring for the answers."""
        if self._result is not None:
            return self._result
        self._buf += data
        result = self._step()
        if result is not NEED_MORE:
            assert isinstance(result, (Done, Error))
            self._result = result
            self._buf = bytearray()
            self._hello = bytearray()
        return result

    def _step(self) -> NeedMore | Done | Error:
        buf = self._buf
        while True:
            # Judge each header byte as soon as it arrives: a plain-HTTP client on the HTTPS
            # port is turned away at once instead of after the ClientHello timeout.
            if buf and buf[0] != _CONTENT_HANDSHAKE:
                if self._records == 0:
                    what = "an SSLv2 ClientHello" if buf[0] & 0x80 else f"first byte {buf[0]:#04x}"
                    return Error("not_tls", f"not a TLS handshake ({what})")
                return Error("malformed", f"record type {buf[0]} inside the ClientHello")
            if len(buf) >= 2 and buf[1] != 3:
                return Error("not_tls" if self._records == 0 else "malformed",
                             f"record version {buf[1]}.x is not TLS")
            if len(buf) < 5:
                return NEED_MORE
            length = int.from_bytes(buf[3:5], "big")
            if not 0 < length <= MAX_FRAGMENT:
                return Error("malformed", f"handshake record of {length} bytes")
            if len(buf) < 5 + length:
                # Judge the handshake header before the record is complete: an oversized
                # ClientHello is refused without buffering it.
                if len(self._hello) < 4:
                    return self._check_header(self._hello + buf[5:9]) or NEED_MORE
                return NEED_MORE
            self._hello += buf[5 : 5 + length]
            del buf[: 5 + length]
            self._consumed += 5 + length
            self._records += 1
            hello = self._hello
            if len(hello) < 4:
                continue
            error = self._check_header(hello)
            if error is not None:
                return error
            size = int.from_bytes(hello[1:4], "big")
            if len(hello) < 4 + size:
                continue
            try:
                name = _parse_body(memoryview(hello)[4 : 4 + size])
            except _Malformed as exc:
                return Error("malformed", f"malformed ClientHello: {exc}")
            return Done(name, self._consumed)

    def _check_header(self, hello: bytes | bytearray) -> Error | None:
        """An Error if the handshake header (once 4 bytes are known) is no acceptable ClientHello."""
        if len(hello) < 4:
            return None
        if hello[0] != _HANDSHAKE_CLIENT_HELLO:
            return Error("malformed", f"handshake message type {hello[0]} where a ClientHello belongs")
        size = int.from_bytes(hello[1:4], "big")
        if size > self.max_size:
            return Error("too_large", f"ClientHello of {size} bytes (limit {self.max_size})")
        return None
