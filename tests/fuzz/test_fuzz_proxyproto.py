"""Fuzz tests of the PROXY protocol header writer and reader (tunneld.core.proto._proxyproto).

Properties: the writer round-trips every pair of IP endpoints (v4, v6, IPv4-mapped, mixed
families) in both versions and, given any strings at all, writes a header the reader takes back
whole (never raising); the reader, on arbitrary bytes and on mutated headers, gives a header, None
(incomplete) or RemoteProtocolError, and once it found a header every shorter prefix is
incomplete.  Every call answers within the time budget.  The long run is bench/fuzz.py.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.core._errors import LocalProtocolError, RemoteProtocolError
from tunneld.core.proto._proxyproto import (
    PROXY_V2_SIGNATURE,
    V1_MAX,
    ProxyProtocolInfo,
    encode_proxy_header,
    parse_proxy_header,
)

from ._limits import budget, fuzz_settings

FUZZ = fuzz_settings(120)


def read(data: bytes) -> ProxyProtocolInfo | None | str:
    """The reader's answer, checked: a header's length fits and its prefixes are incomplete."""
    try:
        with budget():
            info = parse_proxy_header(data)
    except RemoteProtocolError:
        return "error"
    if info is None:
        assert len(data) < 16 + 65535
        return None
    assert 0 < info.length <= len(data)
    assert parse_proxy_header(data[: info.length]) == info
    for k in {0, 1, 5, 6, 12, 15, info.length // 2, info.length - 1}:
        if k < info.length:
            assert parse_proxy_header(data[:k]) is None, k
    assert (info.source is None) == (info.destination is None)
    return info


def hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def unmapped(ip: Any) -> Any:
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


ips = st.one_of(
    st.ip_addresses(v=4), st.ip_addresses(v=6),
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
)
ports = st.integers(0, 65535)


@FUZZ
@given(version=st.sampled_from([1, 2]), src=ips, sport=ports, dst=ips, dport=ports,
       tail=st.binary(max_size=20))
def test_writer_round_trip(version: int, src: Any, sport: int, dst: Any, dport: int, tail: bytes) -> None:
    with budget():
        head = encode_proxy_header(version, hostport(src, sport), hostport(dst, dport))
    info = read(head + tail)
    assert isinstance(info, ProxyProtocolInfo) and info.length == len(head) and info.version == version
    assert info.source is not None and info.destination is not None
    s, d = unmapped(src), unmapped(dst)
    if s.version == d.version:
        assert info.source == (str(s), sport) and info.destination == (str(d), dport)
    else:  # one header carries one family: the IPv4 side is written IPv4-mapped
        assert unmapped(ipaddress.ip_address(info.source[0])) == s and info.source[1] == sport
        assert unmapped(ipaddress.ip_address(info.destination[0])) == d and info.destination[1] == dport
    if version == 1:
        assert len(head) <= V1_MAX and head.count(b"\r\n") == 1


addr_text = st.text(max_size=30) | st.builds(
    lambda h, p: f"{h}:{p}",
    st.sampled_from(["1.2.3.4", "[::1]", "::1", "[fe80::1%eth0]", "[fe80::1%a\r\nb c]", "[::ffff:1.2.3.4]",
                     "[1.2.3.4]", "localhost", ""]),
    st.sampled_from(["80", "65535", "65536", "0", "²", "١٢", "-1", "", "9" * 5000, "080", " 80"]),
)


@FUZZ
@given(version=st.sampled_from([1, 2]), src=addr_text, dst=addr_text)
def test_writer_any_strings(version: int, src: str, dst: str) -> None:
    """Whatever the addresses, the writer answers (UNKNOWN/LOCAL if unusable) with a clean header."""
    with budget():
        head = encode_proxy_header(version, src, dst)
    info = read(head + b"GET / HTTP/1.1\r\n")
    assert isinstance(info, ProxyProtocolInfo) and info.length == len(head)
    if version == 1:
        assert len(head) <= V1_MAX and head.endswith(b"\r\n") and head.count(b"\r\n") == 1
        assert head.isascii()


def test_writer_refuses_unknown_versions() -> None:
    for version in (0, 3, -1):
        with pytest.raises(LocalProtocolError):
            encode_proxy_header(version, "1.2.3.4:1", "5.6.7.8:2")


@FUZZ
@given(data=st.binary(max_size=300) | st.binary(max_size=60).map(lambda b: b"PROXY " + b)
       | st.binary(max_size=60).map(lambda b: PROXY_V2_SIGNATURE + b))
def test_reader_arbitrary_bytes(data: bytes) -> None:
    read(data)


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([1, 2]))
    src, dst = draw(ips), draw(ips)
    buf = bytearray(encode_proxy_header(version, hostport(src, draw(ports)), hostport(dst, draw(ports))))
    tokens = [b" ", b"\r\n", b"UNKNOWN", b"TCP4", b"TCP6", b"0", b"65536", b"\xff", b"%eth0", b":", b".",
              b"\x00\x0c", b"\xff\xff", b"\x20", b"\x22", b"\x31"]
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.integers(0, 2))
        if op == 0:
            buf[pos:pos] = draw(st.sampled_from(tokens) | st.binary(min_size=1, max_size=3))
        elif op == 1:
            del buf[pos : pos + draw(st.integers(1, 4))]
        elif buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
    return bytes(buf) + draw(st.binary(max_size=10))


@FUZZ
@given(data=mutated_headers())
def test_reader_mutated_headers(data: bytes) -> None:
    info = read(data)
    if isinstance(info, ProxyProtocolInfo) and info.source is not None and info.destination is not None:
        # What the reader accepted, the writer writes back the same way.
        src, dst = (ipaddress.ip_address(info.source[0]), ipaddress.ip_address(info.destination[0]))
        again = parse_proxy_header(encode_proxy_header(info.version, hostport(src, info.source[1]),
                                                       hostport(dst, info.destination[1])))
        assert again is not None
        if "%" not in info.source[0] + info.destination[0]:
            assert (again.source, again.destination) == (info.source, info.destination)


def test_regression_unicode_and_huge_ports() -> None:
    """``str.isdigit`` admits "²" (int() then raised ValueError) and 5000-digit ports (int()
    raised ValueError past 4300 digits): the writer raised instead of writing UNKNOWN/LOCAL."""
    for port in ("²", "1²", "9" * 5000):
        assert encode_proxy_header(1, f"1.2.3.4:{port}", "5.6.7.8:80") == b"PROXY UNKNOWN\r\n"
        assert parse_proxy_header(encode_proxy_header(2, "5.6.7.8:80", f"1.2.3.4:{port}")) == \
            ProxyProtocolInfo(2, None, None, 16)


def test_regression_ipv6_zone_cannot_inject_into_v1_line() -> None:
    """A zone id ("fe80::1%eth0") was written into the v1 line as is, spaces and CR LF included."""
    head = encode_proxy_header(1, "[fe80::1%x\r\nGET evil]:1", "[::1]:2")
    assert head == b"PROXY TCP6 fe80::1 ::1 1 2\r\n"
    info = parse_proxy_header(encode_proxy_header(2, "[fe80::1%eth0]:1", "[::1]:2"))
    assert info is not None and info.source == ("fe80::1", 1)
