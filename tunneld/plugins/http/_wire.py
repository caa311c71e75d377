"""Sans-IO HTTP/1.x message framing for the relays on the edge and the agent.

tunneld passes HTTP bytes through unchanged except for the request head; it only needs to know
where each message ends so that keep-alive connections can be routed request by request.
Heads are parsed with httptools (llhttp; ~12x cheaper than h11 per head).  Bodies are not
parsed at all: a Content-Length body is skipped by counting, and a chunked body by a small
scanner that walks chunk-size lines and jumps over chunk data without copying it.

Nothing here imports trio.
"""

from __future__ import annotations

import html
import json
from typing import Any

import attrs
import httptools

from tunneld.core import ERROR_HEADER, Code

__all__ = [
    "BadMessage",
    "BodyKind",
    "RequestHead",
    "ResponseHead",
    "ChunkedScanner",
    "find_head_end",
    "parse_request_head",
    "parse_response_head",
    "rewrite_head",
    "set_header",
    "error_response",
]

#: Largest request or response head accepted from a client or an upstream (431 beyond).
MAX_HEAD = 1024 * 1024
#: Largest request head the agent accepts from the edge.  The edge enforces MAX_HEAD on what
#: the client sent, then adds X-Forwarded-For/-Proto/-Host: at most a copy of the Host value
#: plus a few dozen bytes, so twice MAX_HEAD (plus slack) always fits.  Checking MAX_HEAD again
#: at the agent would refuse heads just under the limit that the client was promised.
MAX_FORWARDED_HEAD = 2 * MAX_HEAD + 4096
#: Largest chunk-size line or trailer line in a chunked body.
MAX_CHUNK_LINE = 8192


class BadMessage(Exception):
    """Malformed HTTP; ``status`` is the answer to give (400, 431, 502...)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class BodyKind:
    NONE = 0
    LENGTH = 1
    CHUNKED = 2
    UNTIL_CLOSE = 3


class _Head:
    """What both heads share: the raw bytes, and header access by name without a full split.

    llhttp has already checked the head strictly (no obsolete line folding, no bare LF, no
    space before a colon), so every CRLF before the blank line starts a header line and the
    lower-cased head can be searched for ``CRLF name:``.  Splitting every header line into
    Python objects cost more than the parse itself, and a relayed request needs two or three
    of them.
    """

    __slots__ = ()
    raw: bytes
    lower: bytes
    _headers: list[tuple[bytes, bytes]] | None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Header lines as (name, value), names in their original case, in order."""
        if self._headers is None:
            lines = self.raw[:-4].split(b"\r\n")
            self._headers = [(name, value.lstrip(b" \t"))
                             for name, _, value in (line.partition(b":") for line in lines[1:])]
        return self._headers

    def has(self, name: bytes) -> bool:
        """Whether a ``name`` header (lower case) is present."""
        return b"\r\n" + name + b":" in self.lower

    def values(self, name: bytes) -> list[bytes]:
        """The values of every ``name`` header (lower case), stripped, in order."""
        return _values(self.raw, self.lower, name)

    def value(self, name: bytes) -> bytes | None:
        """The first ``name`` header's value (lower case name), stripped, or None."""
        found = _values(self.raw, self.lower, name, first=True)
        return found[0] if found else None


def _values(raw: bytes, lower: bytes, name: bytes, *, first: bool = False) -> list[bytes]:
    key = b"\r\n" + name + b":"
    out: list[bytes] = []
    i = lower.find(key)
    while i >= 0:
        start = i + len(key)
        end = lower.find(b"\r\n", start)
        out.append(raw[start:end].strip(b" \t"))
        if first:
            break
        i = lower.find(key, end)
    return out


@attrs.define(slots=True)
class RequestHead(_Head):
    method: bytes
    target: bytes
    version: str
    host: str
    keep_alive: bool
    upgrade: bool
    body: int
    length: int
    expect_continue: bool
    raw: bytes = attrs.field(repr=False)
    lower: bytes = attrs.field(repr=False)
    _headers: list[tuple[bytes, bytes]] | None = attrs.field(default=None, repr=False, init=False)


@attrs.define(slots=True)
class ResponseHead(_Head):
    status: int
    reason: bytes
    version: str
    keep_alive: bool
    body: int
    length: int
    raw: bytes = attrs.field(repr=False)
    lower: bytes = attrs.field(repr=False)
    _headers: list[tuple[bytes, bytes]] | None = attrs.field(default=None, repr=False, init=False)

    @property
    def interim(self) -> bool:
        """1xx other than 101: another response head follows."""
        return 100 <= self.status < 200 and self.status != 101


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line ending a head in ``buf``, or -1."""
    i = buf.find(b"\r\n\r\n", max(0, start - 3))
    return -1 if i < 0 else i + 4


class _Checked:
    """httptools protocol object: no per-header callbacks, only the target and the end."""

    __slots__ = ("url", "complete", "parser", "keep_alive")

    def __init__(self) -> None:
        self.url = b""
        self.complete = False
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.complete = True
        # Asked here, not after feed_data(): a message without a body (Content-Length: 0)
        # completes within the same call, and llhttp then answers False for responses.
        if self.parser is not None:
            self.keep_alive = self.parser.should_keep_alive()


def _framing(raw: bytes, lower: bytes, *, request: bool) -> tuple[int, int]:
    has_te = b"\r\ntransfer-encoding:" in lower
    has_cl = b"\r\ncontent-length:" in lower
    if has_te:
        if has_cl:
            # Both framings at once is the classic request-smuggling vector: refuse it.
            raise BadMessage("both Transfer-Encoding and Content-Length")
        codings = [c.strip() for c in b",".join(_values(lower, lower, b"transfer-encoding")).split(b",")
                   if c.strip()]
        if codings and codings[-1] == b"chunked":
            return BodyKind.CHUNKED, 0
        if request:
            raise BadMessage("request Transfer-Encoding is not chunked")
        return BodyKind.UNTIL_CLOSE, 0
    if has_cl:
        values = _values(raw, lower, b"content-length")
        text = values[-1]
        if any(v != text for v in values):
            raise BadMessage("conflicting Content-Length headers")
        if not text.isdigit() or len(text) > 18:
            raise BadMessage("malformed Content-Length")
        n = int(text)
        return (BodyKind.LENGTH, n) if n else (BodyKind.NONE, 0)
    return (BodyKind.NONE, 0) if request else (BodyKind.UNTIL_CLOSE, 0)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (through the blank line); BadMessage if malformed."""
    c = _Checked()
    parser = httptools.HttpRequestParser(c)
    c.parser = parser
    upgrade = False
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError as exc:
        raise BadMessage(f"malformed request: {exc}") from None
    if not c.complete:
        raise BadMessage("incomplete request head")
    method = parser.get_method()
    version = parser.get_http_version()
    if version not in ("1.0", "1.1"):
        raise BadMessage(f"unsupported HTTP version {version}", 505)
    target = c.url
    lower = head.lower()
    hosts = _values(head, lower, b"host") if b"\r\nhost:" in lower else []
    if len(hosts) > 1:
        raise BadMessage("more than one Host header")
    host = hosts[0].decode("latin-1") if hosts else ""
    if not host and target[:8].lower().startswith((b"http://", b"https://")):
        host = target.split(b"/", 3)[2].decode("latin-1")
    expect = b"\r\nexpect:" in lower and b"100-continue" in _values(lower, lower, b"expect")
    body, length = _framing(head, lower, request=True)
    return RequestHead(
        method=method,
        target=target,
        version=version,
        host=host,
        keep_alive=c.keep_alive,
        upgrade=upgrade or method == b"CONNECT",
        body=body,
        length=length,
        expect_continue=expect,
        raw=head,
        lower=lower,
    )


def parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """Parse a complete response head; the request method decides whether a body follows."""
    c = _Checked()
    parser = httptools.HttpResponseParser(c)
    c.parser = parser
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise BadMessage(f"malformed response: {exc}", 502) from None
    if not c.complete:
        raise BadMessage("incomplete response head", 502)
    status = parser.get_status_code()
    first_line = head[:head.index(b"\r\n")]
    reason = first_line.split(b" ", 2)[2] if first_line.count(b" ") >= 2 else b""
    lower = head.lower()
    if 100 <= status < 200 or status in (204, 304) or request_method == b"HEAD":
        body, length = BodyKind.NONE, 0
    else:
        try:
            body, length = _framing(head, lower, request=False)
        except BadMessage as exc:
            raise BadMessage(str(exc), 502) from None
    return ResponseHead(
        status=status,
        reason=reason,
        version=parser.get_http_version(),
        keep_alive=c.keep_alive and body != BodyKind.UNTIL_CLOSE,
        body=body,
        length=length,
        raw=head,
        lower=lower,
    )


def rewrite_head(raw: bytes, *, drop: frozenset[bytes] = frozenset(),
                 add: list[tuple[bytes, bytes]] | tuple[()] = ()) -> bytes:
    """Copy ``raw`` (a whole head) without headers named in ``drop`` (lower case), plus ``add``."""
    lines = raw[:-4].split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name not in drop:
            out.append(line)
    for name, value in add:
        out.append(name + b": " + value)
    out.append(b"")
    out.append(b"")
    return b"\r\n".join(out)


def set_header(raw: bytes, name: bytes, value: bytes) -> bytes:
    """Copy ``raw`` (a whole head) with every ``name`` header replaced by one ``name: value``.

    The new line takes the place of the first old one, so header order is kept.
    """
    lname = name.lower()
    lines = raw[:-4].split(b"\r\n")
    out = [lines[0]]
    done = False
    for line in lines[1:]:
        if line.split(b":", 1)[0].strip().lower() == lname:
            if not done:
                out.append(name + b": " + value)
                done = True
            continue
        out.append(line)
    if not done:
        out.append(name + b": " + value)
    out.append(b"")
    out.append(b"")
    return b"\r\n".join(out)


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first ``name`` header's value (``name`` in lower case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value.strip()
    return None


class ChunkedScanner:
    """Finds the end of a chunked body without copying it.

    :meth:`feed` returns how many bytes of the given data belong to the body; once
    :attr:`done` is true the rest belongs to the next message.
    """

    __slots__ = ("done", "_state", "_left", "_line")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self.done = False
        self._state = self._SIZE
        self._left = 0
        self._line = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            if self._state == self._DATA:
                n = min(self._left, end - pos)
                pos += n
                self._left -= n
                if self._left == 0:
                    self._state = self._DATA_END
                continue
            nl = bytes(data[pos : min(end, pos + MAX_CHUNK_LINE)]).find(b"\n")
            if nl < 0:
                self._line += data[pos:end]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise BadMessage("chunked body line too long")
                pos = end
                break
            self._line += data[pos : pos + nl]
            pos += nl + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            if len(line) > MAX_CHUNK_LINE:
                raise BadMessage("chunked body line too long")
            if self._state == self._SIZE:
                size_text = line.split(b";", 1)[0].strip()
                try:
                    if not size_text or len(size_text) > 15:
                        raise ValueError
                    size = int(size_text, 16)
                except ValueError:
                    raise BadMessage(f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._left = size
                    self._state = self._DATA
            elif self._state == self._DATA_END:
                if line:
                    raise BadMessage("chunk data longer than its size")
                self._state = self._SIZE
            else:  # trailer section: header lines until the empty line
                if not line:
                    self.done = True
        return pos


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def error_response(status: int, code: Code, message: str, *, json_body: bool = False,
                   head_only: bool = False, extra_headers: list[tuple[str, str]] | None = None) -> bytes:
    """A complete error response generated by tunneld, carrying its code in a header."""
    reason = _REASONS.get(status, "Error")
    if json_body:
        body_obj: dict[str, Any] = {"error_code": code.label, "status_code": status, "msg": message}
        body = json.dumps(body_obj).encode()
        ctype = "application/json"
    else:
        body = (
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{status} {reason}</title></head><body>"
            f"<h1>{status} {html.escape(reason)}</h1><p>{html.escape(message)}</p>"
            f"<p><code>{code.label}</code> &middot; tunneld</p></body></html>\n"
        ).encode()
        ctype = "text/html; charset=utf-8"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        f"{ERROR_HEADER}: {code.label}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    for name, value in extra_headers or ():
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def wants_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"accept":
            return b"application/json" in value and b"text/html" not in value
    return False
