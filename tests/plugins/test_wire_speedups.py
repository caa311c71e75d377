"""The compiled fast path of the head parsers (tunneld/http1/_speedups.c) against the full parsers.

The contract: for any head, the fast path answers None (the full parser takes it) or exactly
the fields the full parser answers; it never accepts a head the full parser refuses.  Checked
on generated heads built from the parts the fast path reads (methods, targets, versions, the
headers that decide framing and keep-alive, in any case and with any whitespace), on mutations
of common heads, and on random bytes.  The heads that real clients and servers send most must
take the fast path, or it bought nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.http1 import _wire
from tunneld.http1._wire import BadMessage

from ..conftest import require_compiled_parser
from ..fuzz._limits import fuzz_settings
from ..fuzz.test_fuzz_http import heads_from

require_compiled_parser()
from tunneld.http1 import _speedups  # noqa: E402 - built, or the module was skipped above

FUZZ = fuzz_settings(3000)

_REQ_FIELDS = ("method", "target", "version", "host", "keep_alive", "upgrade", "body", "length",
               "expect_continue")
_RESP_FIELDS = ("status", "reason", "version", "keep_alive", "body", "length")


def full_request(head: bytes) -> tuple[Any, ...] | int:
    """The full parser's fields, or the status of its refusal."""
    try:
        req = _wire._parse_request_head(head)
    except BadMessage as exc:
        return exc.status
    return tuple(getattr(req, f) for f in _REQ_FIELDS)


def full_response(head: bytes, method: bytes) -> tuple[Any, ...] | int:
    try:
        resp = _wire._parse_response_head(head, method)
    except BadMessage as exc:
        return exc.status
    return tuple(getattr(resp, f) for f in _RESP_FIELDS)


def check_request(head: bytes) -> bool:
    """Whether the fast path took ``head``; fails if it answered otherwise than the full parser."""
    fast = _speedups.scan_request(head)
    if fast is None:
        return False
    assert fast == full_request(head), head
    # And the public entry point builds the same object the full parser does.
    assert _wire.parse_request_head(head) == _wire._parse_request_head(head)
    return True


def check_response(head: bytes, method: bytes) -> bool:
    fast = _speedups.scan_response(head, method)
    if fast is None:
        return False
    assert fast == full_response(head, method), (head, method)
    assert _wire.parse_response_head(head, method) == _wire._parse_response_head(head, method)
    return True


# --- the heads seen most: they must take the fast path ----------------------------------------

COMMON_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    b"GET /1k.bin HTTP/1.1\r\nHost: nginx.bench.localhost:37063\r\n\r\n",
    b"GET /static/app.js?v=3&x=%20y HTTP/1.1\r\nHost: app.example.com\r\nConnection: keep-alive\r\n"
    b"Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\n"
    b"Cookie: a=b; sid=\"x y\"\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: https\r\n\r\n",
    b"POST /api/items HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
    b"Content-Length: 27\r\n\r\n",
    b"PUT /upload HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"DELETE /items/7 HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n",  # ab -k
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHost: x.example.\r\n\r\n",
    b"OPTIONS /x HTTP/1.1\r\nHost: a_b.example:65535\r\nOrigin: http://c.example\r\n\r\n",
]
COMMON_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n"
    b"ETag: \"6571-400\"\r\nAccept-Ranges: bytes\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/html\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 21\r\n\r\n",
]


@pytest.mark.parametrize("head", COMMON_REQUESTS)
def test_common_requests_take_the_fast_path(head: bytes) -> None:
    assert check_request(head)


@pytest.mark.parametrize("head", COMMON_RESPONSES)
def test_common_responses_take_the_fast_path(head: bytes) -> None:
    assert check_response(head, b"GET")
    assert check_response(head, b"POST")


@pytest.mark.parametrize("head, method", [
    (b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", None),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", None),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n", None),
    (b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", None),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD"),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", b"GET"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"GET"),
])
def test_what_the_fast_path_leaves_to_the_full_parser(head: bytes, method: bytes | None) -> None:
    if method is None:
        assert _speedups.scan_request(head) is None
    else:
        assert _speedups.scan_response(head, method) is None


def test_refused_heads_are_refused_either_way() -> None:
    for head in (b"GET / HTTP/1.1\r\n\r\n",  # no Host
                 b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
                 b"GET /#f HTTP/1.1\r\nHost: a\r\n\r\n",
                 b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\n X: folded\r\n\r\n",
                 b"GET / HTTP/1.1\nHost: a\r\n\r\n"):
        assert _speedups.scan_request(head) is None, head
        with pytest.raises(BadMessage):
            _wire.parse_request_head(head)


def test_only_exact_bytes_objects() -> None:
    head = COMMON_REQUESTS[0]
    assert _speedups.scan_request(bytearray(head)) is None
    assert _speedups.scan_response(bytearray(COMMON_RESPONSES[0]), b"GET") is None
    with pytest.raises(TypeError):
        _speedups.scan_response(COMMON_RESPONSES[0])  # type: ignore[call-arg]


# --- generated heads: the parts the fast path reads, right and wrong --------------------------

def _case(draw: st.DrawFn, word: bytes) -> bytes:
    """``word`` in a random mix of upper and lower case."""
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return bytes((c ^ 32) if f and chr(c).isalpha() else c for c, f in zip(word, flips, strict=True))


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad``: most generated heads are worth a full answer."""
    return st.sampled_from(range(10)).flatmap(lambda i: good if i else bad)


_WS = st.sampled_from([b""] * 4 + [b" "] * 3 + [b"\t", b"  ", b" \t"])
_ODD = [b"\x00", b"\x7f", b"\x80", b"\xff", b"\r", b"\n", b" ", b"\t", b"#", b"[", b"]", b"\"", b"<",
        b"{", b"|", b"\\", b"^", b"`", b",", b";", b"%", b"@", b":", b"+", b"-", b"0x"]


@st.composite
def _pieces(draw: st.DrawFn, base: str, odd: float = 0.15) -> bytes:
    """Text from ``base``, now and then with an odd byte spliced in."""
    out = draw(st.text(alphabet=base, max_size=12)).encode()
    if draw(st.sampled_from(range(100))) < odd * 100:
        at = draw(st.integers(0, len(out)))
        out = out[:at] + draw(st.sampled_from(_ODD)) + out[at:]
    return out


_HOST_CHARS = "abcxyz019-_.:"
_TARGET_CHARS = "/abz09-._~!$&'()*+,;=:@?%"
_VALUE_CHARS = "abcXYZ 09,;=/\t\"()-*"


_KINDS = (["other"] * 8 + ["content-length", "transfer-encoding", "connection"] * 2
          + ["host", "proxy-connection", "upgrade", "expect"])


@st.composite
def header_line(draw: st.DrawFn) -> bytes:
    """A header line, mostly well-formed; the ones the fast path reads are drawn more often."""
    kind = draw(mostly(st.sampled_from(_KINDS), st.just("broken")))
    if kind == "broken":
        return draw(_pieces(_VALUE_CHARS + ":", odd=0.5))
    if kind == "other":
        name = draw(_pieces("abcXYZ-_019!#$%&'*+.^`|~", odd=0.05)) or b"x"
        value = draw(_pieces(_VALUE_CHARS, odd=0.05))
    else:
        name = _case(draw, kind.encode())
        value = {
            "host": lambda: draw(hosts()),
            "content-length": lambda: draw(st.sampled_from([
                b"0", b"5", b"00", b"1024", b"9" * 18, b"0", b"5", b"1024", b"1" * 19, b"", b"-1", b"+5",
                b"5 5", b"0x5", b"1,1", b"\xd9\xa3"])),
            "transfer-encoding": lambda: _case(draw, draw(st.sampled_from([
                b"chunked", b"chunked", b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity",
                b"chunked;a=b", b"", b"chunked,"]))),
            "connection": lambda: _case(draw, draw(st.sampled_from([
                b"close", b"keep-alive", b"close", b"keep-alive", b"upgrade", b"keep-alive, close",
                b"Keep-Alive, Upgrade", b"", b"closed", b"te"]))),
        }.get(kind, lambda: draw(_pieces(_VALUE_CHARS, odd=0.05)))()
    return name + b":" + draw(_WS) + value + draw(_WS)


@st.composite
def hosts(draw: st.DrawFn) -> bytes:
    """Host values: mostly plain names and addresses with or without a port, some odd ones."""
    if draw(st.sampled_from(range(10))) == 0:
        return draw(_pieces(_HOST_CHARS + "[]%@", odd=0.2))
    labels = draw(st.lists(st.text(alphabet="aZ09-_", min_size=1, max_size=5), min_size=1, max_size=4))
    host = ".".join(labels) + draw(st.sampled_from(["", "", "", "."]))
    port = draw(mostly(st.sampled_from(["", ":80", ":8080", ":65535", ":0", ":08"]),
                       st.sampled_from([":65536", ":99999", ":", ":123456"])))
    return (host + port).encode()


_METHODS = mostly(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
                  st.sampled_from([b"TRACE", b"CONNECT", b"get", b"GETX", b"FOO", b"", b"G ET"]))
_VERSIONS = mostly(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
                   st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 ",
                                    b"HTTP/11"]))


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method = draw(_METHODS)
    target = draw(mostly(st.just(b"/"), st.sampled_from([b"*", b"http://a/", b"", b"a"])))
    target += draw(_pieces(_TARGET_CHARS, odd=0.05))
    line = method + b" " + target + b" " + draw(_VERSIONS)
    lines = draw(st.lists(header_line(), max_size=5))
    if draw(st.sampled_from(range(5))):
        lines.insert(draw(st.integers(0, len(lines))), b"Host: " + draw(hosts()))
    return b"\r\n".join([line, *lines]) + b"\r\n\r\n"


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = draw(mostly(st.sampled_from([b"200", b"201", b"404", b"500", b"599", b"302"]),
                         st.sampled_from([b"204", b"304", b"101", b"100", b"199", b"600", b"099", b"20",
                                          b"2000", b"2x0"])))
    reason = draw(mostly(st.sampled_from([b" OK", b" ", b" Not Found", b" a\tb"]),
                         st.sampled_from([b"", b" \xe9t\xe9", b" x\x01"])))
    line = draw(_VERSIONS) + b" " + status + reason
    lines = draw(st.lists(header_line(), max_size=5))
    return b"\r\n".join([line, *lines]) + b"\r\n\r\n"


@FUZZ
@given(st.one_of(request_heads(), heads_from(COMMON_REQUESTS)))
def test_requests_fast_path_answers_as_the_full_parser(head: bytes) -> None:
    check_request(head)


@FUZZ
@given(st.one_of(response_heads(), heads_from(COMMON_RESPONSES)),
       st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"PUT"]))
def test_responses_fast_path_answers_as_the_full_parser(head: bytes, method: bytes) -> None:
    check_response(head, method)


def test_the_generators_reach_the_fast_path() -> None:
    """The generated heads are not all bailed on: the properties above check real answers."""
    taken: list[bool] = []

    @fuzz_settings(300)
    @given(request_heads())
    def requests(head: bytes) -> None:
        taken.append(check_request(head))

    @fuzz_settings(300)
    @given(response_heads())
    def responses(head: bytes) -> None:
        taken.append(check_response(head, b"GET"))

    requests()
    assert sum(taken) >= 45, f"{sum(taken)} of {len(taken)} requests took the fast path"
    taken.clear()
    responses()
    assert sum(taken) >= 45, f"{sum(taken)} of {len(taken)} responses took the fast path"
