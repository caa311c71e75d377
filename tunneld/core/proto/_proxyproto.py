"""HAProxy PROXY protocol v1 (text) and v2 (binary) headers, sans-IO.

When a TCP or TLS Bind asks for ``ProxyProto`` 1 or 2, the edge writes one of these headers at
the start of every proxy stream, before the public client's first byte; the agent passes it on
to the upstream unchanged, so the upstream learns the real client address
(../shared/reference/ngrok-protocol.md §3.5: official SDKs expect the *edge* to write it).
Spec: haproxy.org/download/2.9/doc/proxy-protocol.txt.

:func:`encode_proxy_header` builds a header; :func:`parse_proxy_header` reads one back (the agent
uses it to find where the header ends when it terminates TLS itself, tests use it to check
what upstreams see).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from .._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROXY_V2_SIGNATURE",
    "ProxyProtocolInfo",
    "encode_proxy_header",
    "parse_proxy_header",
]

#: First 12 bytes of every v2 header.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line, CRLF included (spec §2.1).
V1_MAX = 107

_V2_HEAD = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_CMD_LOCAL = 0x20
_CMD_PROXY = 0x21
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class ProxyProtocolInfo:
    """One parsed PROXY header."""

    #: 1 or 2.
    version: int
    #: Source (the public client) as (ip, port); None for ``UNKNOWN`` / ``LOCAL`` headers.
    source: tuple[str, int] | None
    #: Destination (the address the client connected to); None like ``source``.
    destination: tuple[str, int] | None
    #: Bytes the header takes at the start of the stream.
    length: int


def _endpoint(addr: str) -> tuple[_IP, int] | None:
    """``1.2.3.4:5`` / ``[::1]:5`` → (address, port); None if it is no IP endpoint."""
    host, sep, port = addr.rpartition(":")
    # ASCII digits only: str.isdigit() also admits "²" (int() refuses it) and 5000-digit ports.
    if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped, int(port)  # a dual-stack listener's view of an IPv4 client
        if ip.scope_id is not None:
            # A zone ("fe80::1%eth0") means nothing to the upstream and may hold any text,
            # spaces and CR LF included, which would break (or inject into) a v1 line.
            ip = ipaddress.IPv6Address(ip.packed)
    return ip, int(port)


def _same_family(a: _IP, b: _IP) -> tuple[_IP, _IP]:
    if a.version == b.version:
        return a, b
    # One header carries one family: write the IPv4 side as IPv4-mapped IPv6.
    mapped = [ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x for x in (a, b)]
    return mapped[0], mapped[1]


def encode_proxy_header(version: int, source: str, destination: str) -> bytes:
    """The PROXY header announcing a TCP connection from ``source`` to ``destination``.

    Both are ``host:port`` strings (``[v6]:port`` for IPv6).  When either is not an IP
    endpoint the header says so (v1 ``UNKNOWN``, v2 ``LOCAL``) and the upstream uses the
    connection's own addresses.
    """
    if version not in (1, 2):
        raise LocalProtocolError(f"PROXY protocol version {version} does not exist (1 or 2)")
    src, dst = _endpoint(source), _endpoint(destination)
    if src is None or dst is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return _V2_HEAD.pack(PROXY_V2_SIGNATURE, _CMD_LOCAL, _FAM_UNSPEC, 0)
    (sip, sport), (dip, dport) = src, dst
    sip, dip = _same_family(sip, dip)
    if version == 1:
        family = "TCP4" if sip.version == 4 else "TCP6"
        return f"PROXY {family} {sip} {dip} {sport} {dport}\r\n".encode("ascii")
    if sip.version == 4:
        body = _V2_INET.pack(sip.packed, dip.packed, sport, dport)
        return _V2_HEAD.pack(PROXY_V2_SIGNATURE, _CMD_PROXY, _FAM_TCP4, len(body)) + body
    body = _V2_INET6.pack(sip.packed, dip.packed, sport, dport)
    return _V2_HEAD.pack(PROXY_V2_SIGNATURE, _CMD_PROXY, _FAM_TCP6, len(body)) + body


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyProtocolInfo | None:
    """Read the PROXY header at the start of ``data``; None while it is incomplete.

    Raises :class:`RemoteProtocolError` when ``data`` does not start with a valid header.
    """
    data = bytes(data[: 16 + 65535])
    sig = PROXY_V2_SIGNATURE
    if data[: len(sig)] == sig[: len(data)]:
        return _parse_v2(data) if len(data) >= len(sig) else None
    if b"PROXY "[: len(data)] == data[:6]:
        return _parse_v1(data) if len(data) >= 6 else None
    raise RemoteProtocolError("the stream does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyProtocolInfo | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise RemoteProtocolError("PROXY v1 line longer than 107 bytes")
        return None
    parts = data[:end].split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        return ProxyProtocolInfo(1, None, None, end + 2)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise RemoteProtocolError(f"bad PROXY v1 line {data[:end]!r}")
    want = 4 if parts[1] == b"TCP4" else 6
    try:
        sip, dip = (ipaddress.ip_address(p.decode("ascii")) for p in parts[2:4])
    except (ValueError, UnicodeDecodeError):
        raise RemoteProtocolError(f"bad address in PROXY v1 line {data[:end]!r}") from None
    ports = []
    for p in parts[4:6]:
        if not p.isdigit() or (len(p) > 1 and p.startswith(b"0")) or int(p) > 65535:
            raise RemoteProtocolError(f"bad port in PROXY v1 line {data[:end]!r}")
        ports.append(int(p))
    if sip.version != want or dip.version != want:
        raise RemoteProtocolError(f"address family does not match {parts[1].decode()}")
    return ProxyProtocolInfo(1, (str(sip), ports[0]), (str(dip), ports[1]), end + 2)


def _parse_v2(data: bytes) -> ProxyProtocolInfo | None:
    if len(data) < _V2_HEAD.size:
        return None
    _sig, ver_cmd, family, length = _V2_HEAD.unpack_from(data)
    if ver_cmd not in (_CMD_LOCAL, _CMD_PROXY):
        raise RemoteProtocolError(f"PROXY v2 version/command byte {ver_cmd:#04x}")
    total = _V2_HEAD.size + length
    if len(data) < total:
        return None
    body = data[_V2_HEAD.size : total]
    if ver_cmd == _CMD_LOCAL or family == _FAM_UNSPEC:
        return ProxyProtocolInfo(2, None, None, total)
    if family == _FAM_TCP4 and length >= _V2_INET.size:
        s, d, sport, dport = _V2_INET.unpack_from(body)
        return ProxyProtocolInfo(2, (str(ipaddress.IPv4Address(s)), sport),
                                 (str(ipaddress.IPv4Address(d)), dport), total)
    if family == _FAM_TCP6 and length >= _V2_INET6.size:
        s, d, sport, dport = _V2_INET6.unpack_from(body)
        return ProxyProtocolInfo(2, (str(ipaddress.IPv6Address(s)), sport),
                                 (str(ipaddress.IPv6Address(d)), dport), total)
    raise RemoteProtocolError(f"PROXY v2 family {family:#04x} with {length} address bytes")
