"""Sans-IO HTTP/1.x message framing for the relays on the edge and the agent.

tunneld passes HTTP bytes through unchanged except for the request head; it only needs to know
where each message ends so that keep-alive connections can be routed request by request.
Heads are parsed with httptools (llhttp; ~12x cheaper than h11 per head).  Bodies are not
parsed at all: a Content-Length body is skipped by counting, and a chunked body by a small
scanner that walks chunk-size lines and jumps over chunk data without copying it.

Framing is strict (RFC 9112; issue 11): whatever a lenient parser would guess at -- chunk sizes
with signs or prefixes, bare LFs, ambiguous transfer codings, a Host that is not a host -- is
refused, because a relay that reads a message differently from the hop behind it lets one
request smuggle another.  llhttp's strict mode does most of the head; the rest is checked here
with precompiled regexes and a small cache of valid Host values: +0.3-0.5 us per head.

Where it is built, a compiled fast path (``_speedups.c``) reads heads of the simple common
shape in one pass and hands everything else to the parsers here: it accepts a subset of what
they accept and answers the same fields (``tests/plugins/test_wire_speedups.py``).

Nothing here imports trio.
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
from typing import Any

import attrs
import httptools

from tunneld.plugin import ERROR_HEADER, Code

try:
    from ._speedups import scan_request as _scan_request
    from ._speedups import scan_response as _scan_response
except ImportError:  # not built (no C compiler at install time): the parsers below do it all
    _scan_request = None  # type: ignore[assignment]
    _scan_response = None  # type: ignore[assignment]

#: Whether the compiled fast path of the head parsers is in use.
SPEEDUPS = _scan_request is not None

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
            # The slot is the subclasses' (attrs), which mypy cannot see from here.
            self._headers = [(name, value.lstrip(b" \t"))  # type: ignore[misc]
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


# RFC 9110 / 9112 grammar, precompiled once: the head checks run on every request and response.
#: tchar (RFC 9110 §5.6.2).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: quoted-string (RFC 9110 §5.6.4): qdtext or quoted-pair, obs-text allowed in both.
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
#: chunk-size [chunk-ext] (RFC 9112 §7.1, §7.1.1), without its CRLF.  The size is 1*HEXDIG and
#: nothing else (no sign, 0x, whitespace or underscore: what int(x, 16) would also take), at
#: most 16 digits.  BWS is allowed around ";" and "=" only, as the grammar says.  Every part
#: is delimited by a character the part before it cannot contain, so matching is linear.
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*")
#: field-line (RFC 9112 §5): no whitespace before the colon; the value is field-vchars, SP and
#: HTAB (OWS and inner spaces alike), no CTL.  A leading SP/HTAB (obs-fold) fails the token.
_FIELD_LINE = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*")
#: transfer-coding (RFC 9110 §10.1.4): token *( OWS ";" OWS token BWS "=" BWS value ).
_CODING = re.compile(_TOKEN + rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"[ \t]*=[ \t]*(?:" + _TOKEN + rb"|"
                     + _QUOTED + rb"))*")
#: Host = uri-host [":" port] (RFC 9112 §3.2, RFC 3986 §3.2.2): a reg-name of non-empty labels
#: with at most one trailing dot, or an IP-literal; a numeric port.  IPv4 addresses are
#: reg-names syntactically.  Percent signs are checked separately (rare, and cheaper so).
_HOST = re.compile(rb"(?:[A-Za-z0-9\-_~!$&'()*+,;=%]+(?:\.[A-Za-z0-9\-_~!$&'()*+,;=%]+)*\.?"
                   rb"|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: absolute-form request target (RFC 9112 §3.2.2) of the two schemes an edge can route.
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)")
#: reason-phrase (RFC 9112 §4): no CTL but HTAB.
_REASON = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")

#: Bounds of a chunked body's trailer section (lines, and bytes with their CRLFs).
MAX_TRAILER_LINES = 64
MAX_TRAILER_BYTES = 64 * 1024
#: Largest chunk size accepted: what a signed 64-bit length holds, as in most servers.
_MAX_CHUNK_SIZE = 2**63 - 1


#: Host values already found valid.  An edge sees the same few names over and over, and a set
#: lookup costs a tenth of the regex; bounded in entries and entry size (<= ~1 MiB in all).
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_MAX = 4096


def _check_host(value: bytes, what: str) -> None:
    """BadMessage unless ``value`` is a valid non-empty ``uri-host [":" port]``."""
    if value in _VALID_HOSTS:
        return
    m = _HOST.fullmatch(value)
    if m is None:
        raise BadMessage(f"invalid {what} {value[:64]!r}")
    if m.lastindex is None:  # a name without a port: the usual Host on :80 and :443
        literal = port = None
    else:
        literal, port = m.groups()
    if port is not None and len(port) == 5 and int(port) > 65535:
        raise BadMessage(f"invalid port in {what} {value[:64]!r}")
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            raise BadMessage(f"invalid IPv6 literal in {what} {value[:64]!r}") from None
    elif b"%" in value and _BAD_PERCENT.search(value):
        raise BadMessage(f"invalid percent-encoding in {what} {value[:64]!r}")
    if len(value) <= 256:
        if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(value)


def _target_authority(method: bytes, target: bytes) -> bytes | None:
    """Check the request target's form (RFC 9112 §3.2); the authority of an absolute-form one.

    llhttp takes fragments, any scheme and ``*`` with any method; none of them is a valid
    target, and an absolute-form target names the host the request is for.
    """
    if target[:1] == b"/":  # origin-form: nearly every request
        if b"#" in target:
            raise BadMessage("fragment in request target")
        return None
    if method == b"CONNECT":  # authority-form: refused by the edge with its own answer
        return None
    if target == b"*":
        if method != b"OPTIONS":
            raise BadMessage("asterisk-form request target is for OPTIONS only")
        return None
    m = _ABSOLUTE.match(target)
    if m is None:
        raise BadMessage(f"request target is not an http(s) URI {target[:64]!r}")
    if b"#" in target:
        raise BadMessage("fragment in request target")
    authority = m.group(1)
    if b"@" in authority:
        # RFC 9110 §4.2.4: userinfo is deprecated in http(s) URIs, and a classic way to make
        # two parsers see two different hosts.
        raise BadMessage("userinfo in request target")
    _check_host(authority, "request target authority")
    return authority


_CL_KEY = b"\r\ncontent-length:"
_HOST_KEY = b"\r\nhost:"


def _framing(raw: bytes, lower: bytes, *, request: bool, http10: bool) -> tuple[int, int]:
    """The body framing of RFC 9112 §6.3; BadMessage(400) for any ambiguity (callers remap)."""
    has_te = b"\r\ntransfer-encoding:" in lower
    has_cl = b"\r\ncontent-length:" in lower
    if has_te:
        if has_cl:
            # Both framings at once is the classic request-smuggling vector: refuse it.
            raise BadMessage("both Transfer-Encoding and Content-Length")
        if http10:
            # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; an
            # HTTP/1.0 hop behind us may well read it by another rule.
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 message")
        values = _values(lower, lower, b"transfer-encoding")
        if values == [b"chunked"]:  # nearly always: skip the general parse below
            return BodyKind.CHUNKED, 0
        # Empty list elements are allowed (RFC 9110 §5.6.1); a comma inside a quoted parameter
        # splits it into invalid pieces, which only makes us stricter.
        codings = [c for c in (c.strip(b" \t") for c in b",".join(values).split(b",")) if c]
        if not codings:
            raise BadMessage("empty Transfer-Encoding")
        for coding in codings:
            if _CODING.fullmatch(coding) is None:
                raise BadMessage(f"malformed Transfer-Encoding {coding[:40]!r}")
        names = [c.split(b";", 1)[0].rstrip(b" \t") for c in codings]
        if b"chunked" in names[:-1]:
            # RFC 9112 §6.1: chunked is applied once, and last.
            raise BadMessage("chunked is not the last transfer coding, or is applied twice")
        if names[-1] == b"chunked":
            if codings[-1] != b"chunked":
                raise BadMessage("parameters on the chunked transfer coding")
            return BodyKind.CHUNKED, 0
        if request:
            raise BadMessage("request Transfer-Encoding is not chunked")
        return BodyKind.UNTIL_CLOSE, 0
    if has_cl:
        # One Content-Length line (nearly always) is read in place; several must all agree.
        start = lower.find(_CL_KEY) + len(_CL_KEY)
        end = lower.find(b"\r\n", start)
        text = raw[start:end].strip(b" \t")
        if lower.find(_CL_KEY, end) >= 0:
            values = _values(raw, lower, b"content-length")
            text = values[-1]
            if any(v != text for v in values):
                raise BadMessage("conflicting Content-Length headers")
        # isdigit() on bytes is ASCII only: no sign, space, underscore or comma list.
        if not text.isdigit() or len(text) > 18:
            raise BadMessage("malformed Content-Length")
        n = int(text)
        return (BodyKind.LENGTH, n) if n else (BodyKind.NONE, 0)
    return (BodyKind.NONE, 0) if request else (BodyKind.UNTIL_CLOSE, 0)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (through the blank line); BadMessage if malformed.

    Heads of the simple common shape take the compiled fast path where it is built.
    """
    if _scan_request is not None:
        fields = _scan_request(head)
        if fields is not None:
            method, target, version, host, keep_alive, upgrade, body, length, expect = fields
            return RequestHead(method, target, version, host, keep_alive, upgrade, body, length, expect,
                               head, head.lower())
    return _parse_request_head(head)


def _parse_request_head(head: bytes) -> RequestHead:
    """The full request head parser (what the fast path hands over, and its reference).

    Beyond llhttp's strict mode: exactly one SP between the three parts of the request line,
    a valid target form, a valid Host (required in HTTP/1.1), and unambiguous body framing.
    ``host`` is the absolute-form target's authority when there is one (RFC 9112 §3.2.2),
    else the Host header's value ("" when there is none, HTTP/1.0 only).
    """
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
    # llhttp skips runs of spaces between the parts, which a hop behind us may read otherwise:
    # the line must be exactly method SP target SP "HTTP/x.y".
    if head.index(b"\r\n") != len(method) + len(target) + 10:
        raise BadMessage("malformed request line")
    if target[:1] == b"/" and b"#" not in target:
        authority = None  # origin-form, nearly every request: skip the call
    else:
        authority = _target_authority(method, target)
    lower = head.lower()
    i = lower.find(_HOST_KEY)
    if i >= 0:
        start = i + len(_HOST_KEY)
        end = lower.find(b"\r\n", start)
        if lower.find(_HOST_KEY, end) >= 0:
            raise BadMessage("more than one Host header")
        host = head[start:end].strip(b" \t")
        if host:  # empty is allowed: RFC 9112 §3.2, for targets without an authority
            _check_host(host, "Host header")
    elif version == "1.1":
        raise BadMessage("HTTP/1.1 request without a Host header")
    else:
        host = b""
    if authority is not None:
        host = authority
    expect = b"\r\nexpect:" in lower and b"100-continue" in _values(lower, lower, b"expect")
    body, length = _framing(head, lower, request=True, http10=version == "1.0")
    return RequestHead(
        method=method,
        target=target,
        version=version,
        host=host.decode("latin-1"),
        keep_alive=c.keep_alive,
        upgrade=upgrade or method == b"CONNECT",
        body=body,
        length=length,
        expect_continue=expect,
        raw=head,
        lower=lower,
    )


def parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """Parse a complete response head; the request method decides whether a body follows.

    Every fault is BadMessage(502): the upstream, not the client, sent it.  Heads of the simple
    common shape take the compiled fast path where it is built.
    """
    if _scan_response is not None:
        fields = _scan_response(head, request_method)
        if fields is not None:
            status, reason, version, keep_alive, body, length = fields
            return ResponseHead(status, reason, version, keep_alive, body, length, head, head.lower())
    return _parse_response_head(head, request_method)


def _parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """The full response head parser (what the fast path hands over, and its reference)."""
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
    if not 100 <= status <= 599:
        raise BadMessage(f"invalid status code {status}", 502)  # RFC 9110 §15
    version = parser.get_http_version()
    first_line = head[:head.index(b"\r\n")]
    reason = first_line.split(b" ", 2)[2] if first_line.count(b" ") >= 2 else b""
    if _REASON.fullmatch(reason) is None:
        raise BadMessage("control character in reason phrase", 502)
    lower = head.lower()
    if 100 <= status < 200 or status in (204, 304) or request_method == b"HEAD":
        body, length = BodyKind.NONE, 0
    else:
        try:
            body, length = _framing(head, lower, request=False, http10=version == "1.0")
        except BadMessage as exc:
            raise BadMessage(str(exc), 502) from None
    return ResponseHead(
        status=status,
        reason=reason,
        version=version,
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


# ChunkedScanner states.
_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER = range(5)


class ChunkedScanner:
    """Finds the end of a chunked body (RFC 9112 §7.1) without copying its data.

    :meth:`feed` returns how many bytes of the given data belong to the body: all of them until
    :attr:`done` turns true; the rest belongs to the next message.  Anything but exactly
    ``1*HEXDIG [chunk-ext] CRLF``, chunk data, ``CRLF``, ..., ``0 CRLF``, trailer field lines
    and ``CRLF`` raises BadMessage(400), whatever lenient parsers would make of it: a relay that
    guesses differently from the next hop where a body ends lets one request smuggle another.
    Line ends are CRLF only, as in llhttp's strict mode (a bare LF is refused).

    At most one line (MAX_CHUNK_LINE + 1 bytes) is ever buffered, whatever the input.
    """

    __slots__ = ("done", "_state", "_left", "_line", "_trailer_lines", "_trailer_bytes")

    def __init__(self) -> None:
        self.done = False
        self._state = _SIZE
        self._left = 0  # chunk data still to skip, >= 1 in the _DATA state
        self._line = bytearray()  # a size or trailer line read so far, CR included
        self._trailer_lines = 0
        self._trailer_bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        pos = 0
        end = len(data)
        # Every branch consumes at least one byte (or raises): _left >= 1 while in _DATA, and
        # _take_line always reads to a LF or to the end of its window.  Sizes come from hex
        # digits only, so nothing can move ``pos`` backwards.
        while pos < end and not self.done:
            state = self._state
            if state == _DATA:
                n = min(self._left, end - pos)
                pos += n
                self._left -= n
                if not self._left:
                    self._state = _DATA_CR
            elif state == _DATA_CR:
                if data[pos] != 13:
                    raise BadMessage("chunk data not followed by CRLF")
                pos += 1
                self._state = _DATA_LF
            elif state == _DATA_LF:
                if data[pos] != 10:
                    raise BadMessage("chunk data not followed by CRLF")
                pos += 1
                self._state = _SIZE
            else:
                pos = self._take_line(data, pos, end)
        return pos

    def _take_line(self, data: bytes | bytearray | memoryview, pos: int, end: int) -> int:
        """Read a size or trailer line up to its LF; the position after what was read (> pos)."""
        room = MAX_CHUNK_LINE + 2 - len(self._line)  # content, CR and LF still allowed (>= 1)
        stop = min(end, pos + room)
        if isinstance(data, memoryview):
            i = bytes(data[pos:stop]).find(b"\n")
            nl = -1 if i < 0 else pos + i
        else:
            nl = data.find(b"\n", pos, stop)
        if nl < 0:
            if stop - pos == room:
                raise BadMessage("chunked body line too long")
            self._line += data[pos:stop]
            return stop
        self._line += data[pos:nl]
        line = bytes(self._line)
        self._line.clear()
        if line[-1:] != b"\r":
            raise BadMessage("chunked body line not ended by CRLF")
        self._line_done(line[:-1])
        return nl + 1

    def _line_done(self, line: bytes) -> None:
        if self._state == _SIZE:
            m = _CHUNK_SIZE_LINE.fullmatch(line)
            if m is None:
                raise BadMessage(f"bad chunk size line {line[:40]!r}")
            size = int(m.group(1), 16)
            if size > _MAX_CHUNK_SIZE:
                raise BadMessage("chunk size too large")
            if size:
                self._left = size
                self._state = _DATA
            else:
                self._state = _TRAILER
        elif not line:
            self.done = True
        else:
            self._trailer_lines += 1
            self._trailer_bytes += len(line) + 2
            if self._trailer_lines > MAX_TRAILER_LINES or self._trailer_bytes > MAX_TRAILER_BYTES:
                raise BadMessage("trailer section too large")
            if _FIELD_LINE.fullmatch(line) is None:
                raise BadMessage(f"malformed trailer line {line[:40]!r}")


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
