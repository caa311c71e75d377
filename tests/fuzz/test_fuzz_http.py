"""Fuzz tests of the HTTP/1 framing (tunneld.http1._wire); the long run is bench/fuzz_http.py.

Properties, for random bytes, mutated valid messages and worst-case inputs for the regexes, fed
whole and in arbitrary splits: the head parsers answer a head or BadMessage (400/505 for
requests, 502 for responses), never another exception; the chunked scanner answers the same
however its input is split, consumes everything it is given until the body ends, never holds
more than one line (MAX_CHUNK_LINE + 1 bytes), and stays done once done; every call answers
within the time budget.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.http1._wire import (
    MAX_CHUNK_LINE,
    BadMessage,
    BodyKind,
    ChunkedScanner,
    find_head_end,
    parse_request_head,
    parse_response_head,
)

from ._limits import budget, fuzz_settings, split

#: Every test here runs with the compiled fast path of the head parsers and without it.
pytestmark = pytest.mark.usefixtures("both_head_parsers")

FUZZ = fuzz_settings(1000)


# --- inputs ----------------------------------------------------------------------------------

DICT = [b"\r\n", b"\n", b"\r", b";", b"=", b'"', b"\\", b" ", b"\t", b":", b"0", b"-", b"+", b"0x", b"_",
        b"ffffffffffffffff", b"chunked", b"Transfer-Encoding: ", b"Content-Length: ", b"Host: ", b"HTTP/1.1",
        b"HTTP/1.0", b"http://", b"@", b"[", b"]", b"%", b"#", b"..", b"\x00", b"\x7f", b"\xff", b",", b"*"]
REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a.example:8080\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    b"GET http://a.example/x?y HTTP/1.1\r\nHost: b.example\r\n\r\n",
    b"OPTIONS * HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
]
BODIES = [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b'5;a=b\r\nhello\r\n1a;name="quoted \\" value"\r\n' + b"x" * 26 + b"\r\n0\r\n\r\n",
    b"5 ; a = b\r\nhello\r\n0\r\nExpires: never\r\nX-T:\tv \r\n\r\n",
    b"0000000000000003\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
    b"7fffffffffffffff\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte flips, dictionary inserts, deletions and splices."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(buf)))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            buf[pos:pos] = draw(st.sampled_from(DICT))
        elif op == 2:
            del buf[pos:pos + draw(st.integers(1, 8))]
        elif op == 3:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            other = draw(st.sampled_from(seeds))
            a = draw(st.integers(0, len(other)))
            buf[pos:pos] = other[a:a + draw(st.integers(1, 40))]
    return bytes(buf)


def heads_from(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Complete heads (through the first blank line), as read_head() hands them over."""
    def cut(data: bytes) -> bytes:
        end = find_head_end(data)
        return data[:end] if end > 0 else data + b"\r\n\r\n"
    return st.one_of(mutated(seeds), st.binary(max_size=200)).map(cut)


# --- head parsers ----------------------------------------------------------------------------

def check_request(head: bytes) -> None:
    with budget():
        try:
            req = parse_request_head(head)
        except BadMessage as exc:
            assert exc.status in (400, 505), exc.status
            return
    assert req.body in (BodyKind.NONE, BodyKind.LENGTH, BodyKind.CHUNKED)
    assert req.length >= 0 and isinstance(req.host, str)
    assert " " not in req.host and "\t" not in req.host
    assert req.version == "1.0" or req.has(b"host")
    assert b"#" not in req.target


def check_response(head: bytes, method: bytes) -> None:
    with budget():
        try:
            resp = parse_response_head(head, method)
        except BadMessage as exc:
            assert exc.status == 502, exc.status
            return
    assert 100 <= resp.status <= 599 and resp.length >= 0
    assert resp.body in (BodyKind.NONE, BodyKind.LENGTH, BodyKind.CHUNKED, BodyKind.UNTIL_CLOSE)


@FUZZ
@given(heads_from(REQUESTS))
def test_request_heads(head: bytes) -> None:
    check_request(head)


@FUZZ
@given(heads_from(RESPONSES), st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT"]))
def test_response_heads(head: bytes, method: bytes) -> None:
    check_response(head, method)


# --- chunked scanner -------------------------------------------------------------------------

def scan(pieces: list[bytes]) -> tuple[str, int]:
    """Feed ``pieces`` to one scanner; ("done"|"more", body bytes) or ("bad", -1)."""
    scanner = ChunkedScanner()
    total = 0
    try:
        for piece in pieces:
            with budget():
                used = scanner.feed(piece)
            total += used
            assert len(scanner._line) <= MAX_CHUNK_LINE + 1, len(scanner._line)
            if scanner.done:
                assert 0 <= used <= len(piece)
                assert scanner.feed(b"more") == 0  # sticky
                return "done", total
            assert used == len(piece)  # no stall: everything is consumed until the end
    except BadMessage as exc:
        assert exc.status == 400
        return "bad", -1
    return "more", total


def check_body(data: bytes, cuts: list[int]) -> None:
    whole = scan([data])
    assert whole == scan(split(data, cuts)), (whole, data)
    assert whole == scan([data[i:i + 1] for i in range(len(data))]) or len(data) > 600


@FUZZ
@given(st.one_of(mutated(BODIES), st.binary(max_size=300)), st.lists(st.integers(0, 2000), max_size=8))
def test_chunked_bodies(data: bytes, cuts: list[int]) -> None:
    check_body(data, cuts)


@FUZZ
@given(mutated([r + b for r in REQUESTS[1:2] for b in BODIES]), st.lists(st.integers(0, 2000), max_size=8))
def test_chunked_requests(data: bytes, cuts: list[int]) -> None:
    """The edge's path: a head, then, for a chunked request, the scanner over the rest."""
    end = find_head_end(data)
    if end < 0:
        return
    check_request(data[:end])
    try:
        req = parse_request_head(data[:end])
    except BadMessage:
        return
    if req.body == BodyKind.CHUNKED:
        check_body(data[end:], cuts)


# Inputs built to make a backtracking regex or a line loop work hard: every one must still be
# answered within the budget.
SLOW = MAX_CHUNK_LINE - 64
WORST_BODIES = [
    b"5" + b";a" * (SLOW // 2) + b"\x01\r\n",
    b"5" + b" ;a= b" * (SLOW // 6) + b" \r\n",
    b'5;a="' + b"\\\"" * (SLOW // 2) + b"\r\n",
    b"5;" + b"a" * SLOW + b"=\r\n",
    b"0\r\nX:" + b" " * SLOW + b"\x01\r\n",
    b"0\r\n" + b"a" * SLOW + b"\r\n",
    b"\r" * (MAX_CHUNK_LINE + 1) + b"\n",
    b"0" * MAX_CHUNK_LINE + b"\r\n",
]
WORST_HOSTS = [b"a." * 5000 + b"\x01", b"a" * 10000 + b":", b"[" + b":" * 10000 + b"]", b"%" * 10000,
               b"a" * 10000 + b"..", b"a;" * 5000 + b"\x00"[:0] + b" x"]


@pytest.mark.parametrize("body", WORST_BODIES, ids=range(len(WORST_BODIES)))
def test_worst_case_lines(body: bytes) -> None:
    assert scan([body])[0] in ("bad", "done", "more")
    assert scan(split(body, [7, 100, 4000]))[0] == scan([body])[0]


@pytest.mark.parametrize("host", WORST_HOSTS, ids=range(len(WORST_HOSTS)))
def test_worst_case_hosts(host: bytes) -> None:
    check_request(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    check_request(b"GET http://" + host + b"/ HTTP/1.1\r\nHost: a\r\n\r\n")
    te = b"Transfer-Encoding: " + b"gzip;q=" * (len(host) // 7) + b"x, chunked"
    check_request(b"POST / HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n\r\n")
