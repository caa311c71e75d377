"""The head parser against the callback-per-header parser it replaced (wire_reference.py).

Every head hypothesis builds, valid or not, must get the same answer from both: the same
fields, or a BadMessage with the same status -- except where the parser is stricter on purpose
(issue 11: request line, target form, Host syntax, Host required in HTTP/1.1, transfer codings,
status range, reason phrase): there it may refuse what the reference took, with one of the
reasons in STRICTER, and the host of an absolute-form target is its authority (RFC 9112 §3.2.2).
"""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.http1._wire import BadMessage, BodyKind, parse_request_head, parse_response_head

from . import wire_reference as ref

#: Every test here runs with the compiled fast path of the head parsers and without it.
pytestmark = pytest.mark.usefixtures("both_head_parsers")

NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding",
         b"transfer-encoding", b"Expect", b"X-Forwarded-For", b"x-forwarded-for", b"Connection",
         b"Upgrade", b"Tunneld-Error-Code", b"Accept", b"Location", b"X-Host", b"Hostname",
         b"Content-Lengthx", b"X-Content-Length", b"Authorization"]
VALUES = [b"", b"a", b"example.test", b"example.test:8080", b"0", b"1", b"12", b"007", b"-1",
          b"1, 2", b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"CHUNKED",
          b"100-continue", b"100-Continue", b"close", b"keep-alive", b"Upgrade", b"websocket",
          b"1.2.3.4", b"1.2.3.4, 5.6.7.8", b"application/json", b"x" * 40, b"99999999999999999999"]

name = st.one_of(st.sampled_from(NAMES), st.binary(min_size=0, max_size=6))
value = st.one_of(
    st.sampled_from(VALUES),
    st.builds(lambda v, pre, post: pre + v + post, st.sampled_from(VALUES),
              st.sampled_from([b"", b" ", b"  ", b"\t"]), st.sampled_from([b"", b" ", b"\t "])),
    st.binary(max_size=8),
)
sep = st.sampled_from([b":", b": ", b":\t", b" :", b""])
# An empty line would end the head early: callers only ever pass one complete head.
line = st.builds(lambda n, s, v: n + s + v, name, sep, value).filter(lambda x: x != b"")
request_line = st.one_of(
    st.sampled_from([b"GET / HTTP/1.1", b"POST /upload HTTP/1.1", b"GET /a?b=c HTTP/1.0",
                     b"HEAD / HTTP/1.1", b"GET http://abs.test/x HTTP/1.1", b"CONNECT a:443 HTTP/1.1",
                     b"GET HTTPS://Abs.test:8443/x HTTP/1.1", b"GET / HTTP/2.0", b"GET  / HTTP/1.1",
                     b"OPTIONS * HTTP/1.1", b"get / HTTP/1.1"]),
    st.binary(max_size=20),
)
status_line = st.one_of(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified",
                     b"HTTP/1.0 200 OK", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 100 Continue",
                     b"HTTP/1.1 302 Found", b"HTTP/1.1 200", b"HTTP/1.1 404 Not Found here"]),
    st.binary(max_size=20),
)


def head_of(first: bytes, lines: list[bytes]) -> bytes:
    """The head up to its first blank line: what read_head() hands the parsers."""
    head = b"\r\n".join([first, *lines]) + b"\r\n\r\n"
    return head[:head.index(b"\r\n\r\n") + 4]


def outcome(parse, head: bytes, *args):  # type: ignore[no-untyped-def]
    try:
        result = parse(head, *args)
    except BadMessage as exc:
        return ("error", exc.status)
    if isinstance(result, dict):
        return result
    fields = {k: getattr(result, k) for k in ref_keys(result)}
    fields["headers"] = result.headers
    return fields


def ref_keys(result) -> list[str]:  # type: ignore[no-untyped-def]
    if hasattr(result, "method"):
        return ["method", "target", "version", "host", "keep_alive", "upgrade", "body", "length",
                "expect_continue"]
    return ["status", "reason", "version", "keep_alive", "body", "length"]


#: Reasons the strict parser gives for heads the reference accepted (see the module docstring).
STRICTER = ("invalid Host header", "invalid port in Host header", "invalid IPv6 literal",
            "invalid percent-encoding", "invalid request target authority", "invalid port in request target",
            "fragment in request target", "userinfo in request target", "asterisk-form request target",
            "request target is not an http(s) URI", "HTTP/1.1 request without a Host header",
            "malformed request line", "Transfer-Encoding in an HTTP/1.0 message", "empty Transfer-Encoding",
            "malformed Transfer-Encoding", "chunked is not the last transfer coding",
            "parameters on the chunked transfer coding", "invalid status code", "control character in reason")


def strict_outcome(parse, head: bytes, *args):  # type: ignore[no-untyped-def]
    """outcome(), with the reason of a refusal that the reference may not share."""
    try:
        parse(head, *args)
    except BadMessage as exc:
        return ("error", exc.status), str(exc).startswith(STRICTER)
    return outcome(parse, head, *args), False


@settings(max_examples=1500, deadline=None)
@given(request_line, st.lists(line, max_size=6))
def test_requests_parse_as_before(first: bytes, lines: list[bytes]) -> None:
    head = head_of(first, lines)
    got, stricter = strict_outcome(parse_request_head, head)
    expected = outcome(ref.parse_request_head, head)
    if stricter:
        return
    if isinstance(got, dict) and isinstance(expected, dict) and b"://" in got["target"]:
        # Only http(s) absolute-form targets are accepted: their authority is the host.
        expected["host"] = urllib.parse.urlsplit(got["target"].decode("latin-1")).netloc
    assert got == expected


@settings(max_examples=1500, deadline=None)
@given(status_line, st.lists(line, max_size=6), st.sampled_from([b"GET", b"HEAD", b"POST"]))
def test_responses_parse_as_before(first: bytes, lines: list[bytes], method: bytes) -> None:
    head = head_of(first, lines)
    got, stricter = strict_outcome(parse_response_head, head, method)
    if not stricter:
        assert got == outcome(ref.parse_response_head, head, method)


def test_transfer_codings_from_every_header_line() -> None:
    req = parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n"
                             b"Transfer-Encoding: CHUNKED\r\n\r\n")
    assert req.body == BodyKind.CHUNKED


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: folded\r\n  line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\nX: bare LF\r\n\r\n",
])
def test_smuggling_shapes_are_refused(head: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_request_head(head)


def test_header_access_by_name() -> None:
    req = parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For:  1.1.1.1 \r\n"
                             b"x-forwarded-for: 2.2.2.2\r\nAccept: text/html\r\n\r\n")
    assert req.values(b"x-forwarded-for") == [b"1.1.1.1", b"2.2.2.2"]
    assert req.value(b"accept") == b"text/html"
    assert req.value(b"missing") is None
    assert req.has(b"host") and not req.has(b"hos")
    assert req.headers[1] == (b"X-Forwarded-For", b"1.1.1.1 ")  # as llhttp reports values
