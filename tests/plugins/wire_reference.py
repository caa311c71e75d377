"""The head parser tunneld used until it searched the lowered head instead of taking a
callback per header: kept as the oracle for tests/plugins/test_wire.py.
"""

from __future__ import annotations

import httptools

from tunneld.http1._wire import BadMessage, BodyKind


class _Collector:
    __slots__ = ("url", "headers", "complete", "parser", "keep_alive")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True
        # Asked here, not after feed_data(): a message without a body (Content-Length: 0)
        # completes within the same call, and llhttp then answers False for responses.
        if self.parser is not None:
            self.keep_alive = self.parser.should_keep_alive()


def _framing(headers: list[tuple[bytes, bytes]], *, request: bool) -> tuple[int, int]:
    te: bytes | None = None
    cl: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            te = value if te is None else te + b"," + value
        elif lname == b"content-length":
            if cl is not None and cl.strip() != value.strip():
                raise BadMessage("conflicting Content-Length headers")
            cl = value
    if te is not None:
        if cl is not None:
            # Both framings at once is the classic request-smuggling vector: refuse it.
            raise BadMessage("both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for c in te.split(b",") if c.strip()]
        if codings and codings[-1] == b"chunked":
            return BodyKind.CHUNKED, 0
        if request:
            raise BadMessage("request Transfer-Encoding is not chunked")
        return BodyKind.UNTIL_CLOSE, 0
    if cl is not None:
        text = cl.strip()
        if not text.isdigit() or len(text) > 18:
            raise BadMessage("malformed Content-Length")
        n = int(text)
        return (BodyKind.LENGTH, n) if n else (BodyKind.NONE, 0)
    return (BodyKind.NONE, 0) if request else (BodyKind.UNTIL_CLOSE, 0)


def parse_request_head(head: bytes) -> dict[str, object]:
    """Parse a complete request head (through the blank line); BadMessage if malformed."""
    c = _Collector()
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
    host = ""
    expect = False
    hosts = 0
    for name, value in c.headers:
        lname = name.lower()
        if lname == b"host":
            hosts += 1
            host = value.decode("latin-1").strip()
        elif lname == b"expect" and value.strip().lower() == b"100-continue":
            expect = True
    if hosts > 1:
        raise BadMessage("more than one Host header")
    if not host and c.url.lower().startswith((b"http://", b"https://")):
        host = c.url.split(b"/", 3)[2].decode("latin-1")
    body, length = _framing(c.headers, request=True)
    return dict(
        method=method,
        target=c.url,
        version=version,
        headers=c.headers,
        host=host,
        keep_alive=c.keep_alive,
        upgrade=upgrade or method == b"CONNECT",
        body=body,
        length=length,
        expect_continue=expect,
    )


def parse_response_head(head: bytes, request_method: bytes) -> dict[str, object]:
    """Parse a complete response head; the request method decides whether a body follows."""
    c = _Collector()
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
    first_line = head.split(b"\r\n", 1)[0]
    reason = first_line.split(b" ", 2)[2] if first_line.count(b" ") >= 2 else b""
    if 100 <= status < 200 or status in (204, 304) or request_method == b"HEAD":
        body, length = BodyKind.NONE, 0
    else:
        try:
            body, length = _framing(c.headers, request=False)
        except BadMessage as exc:
            raise BadMessage(str(exc), 502) from None
    return dict(
        status=status,
        reason=reason,
        version=parser.get_http_version(),
        headers=c.headers,
        keep_alive=c.keep_alive and body != BodyKind.UNTIL_CLOSE,
        body=body,
        length=length,
    )
