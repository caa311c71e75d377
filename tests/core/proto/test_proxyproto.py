"""PROXY protocol v1/v2 headers: exact bytes from the spec, round trips, and incremental parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.core import proto
from tunneld.core.proto import ProxyProtocolInfo, RemoteProtocolError, encode_proxy_header, parse_proxy_header

SIG = proto.PROXY_V2_SIGNATURE


def test_v1_bytes() -> None:
    assert encode_proxy_header(1, "192.0.2.1:56324", "198.51.100.7:443") == \
        b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    assert encode_proxy_header(1, "[2001:db8::1]:5", "[::1]:443") == b"PROXY TCP6 2001:db8::1 ::1 5 443\r\n"


def test_v2_bytes() -> None:
    assert encode_proxy_header(2, "192.0.2.1:56324", "198.51.100.7:443") == (
        SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7]) + (56324).to_bytes(2, "big")
        + (443).to_bytes(2, "big"))
    v6 = encode_proxy_header(2, "[2001:db8::1]:5", "[::1]:443")
    assert v6[:16] == SIG + b"\x21\x21\x00\x24" and len(v6) == 16 + 36


def test_dual_stack_listener_sees_mapped_ipv4() -> None:
    # A "::" listener reports IPv4 clients as ::ffff:a.b.c.d: the header says TCP4.
    assert encode_proxy_header(1, "[::ffff:192.0.2.1]:7", "[::ffff:127.0.0.1]:443") == \
        b"PROXY TCP4 192.0.2.1 127.0.0.1 7 443\r\n"
    # Mixed families: the IPv4 side is written IPv4-mapped.
    mixed = parse_proxy_header(encode_proxy_header(2, "192.0.2.1:7", "[2001:db8::2]:443"))
    assert mixed is not None and mixed.source == ("::ffff:c000:201", 7)


def test_unknown_addresses() -> None:
    assert encode_proxy_header(1, "pipe", "0.0.0.0:0") == b"PROXY UNKNOWN\r\n"
    assert encode_proxy_header(2, "?", "?") == SIG + b"\x20\x00\x00\x00"
    assert parse_proxy_header(b"PROXY UNKNOWN\r\nrest") == ProxyProtocolInfo(1, None, None, 15)
    assert parse_proxy_header(SIG + b"\x20\x00\x00\x00") == ProxyProtocolInfo(2, None, None, 16)


def test_bad_version() -> None:
    with pytest.raises(proto.LocalProtocolError):
        encode_proxy_header(3, "1.2.3.4:5", "1.2.3.4:6")


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"x" * 120,
    SIG + b"\x22\x11\x00\x0c" + bytes(12),
    SIG + b"\x21\x11\x00\x04" + bytes(4),
    SIG + b"\x21\x31\x00\x00",
])
def test_parse_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_proxy_header(data)


IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
IPV6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None).map(str)
PORT = st.integers(0, 65535)


def endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@settings(max_examples=300)
@given(version=st.sampled_from([1, 2]), family=st.sampled_from([IPV4, IPV6]), data=st.data(),
       sport=PORT, dport=PORT, tail=st.binary(max_size=20), cut=st.integers(0, 200))
def test_round_trip(version: int, family: st.SearchStrategy[str], data: st.DataObject, sport: int, dport: int,
                    tail: bytes, cut: int) -> None:
    src, dst = data.draw(family), data.draw(family)
    header = encode_proxy_header(version, endpoint(src, sport), endpoint(dst, dport))
    info = parse_proxy_header(header + tail)
    assert info == ProxyProtocolInfo(version, (src, sport), (dst, dport), len(header))
    # Any strict prefix is incomplete, never an error.
    assert parse_proxy_header(header[: cut % len(header)]) is None
    if version == 1:
        assert len(header) <= 107


@settings(max_examples=300)
@given(junk=st.binary(max_size=200))
def test_parser_never_crashes(junk: bytes) -> None:
    try:
        info = parse_proxy_header(junk)
    except RemoteProtocolError:
        return
    assert info is None or 0 < info.length <= len(junk)
