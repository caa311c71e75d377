"""Fuzz tests of the ClientHello/SNI reader (tunneld.plugins.tls._clienthello); long run: bench/fuzz.py.

Properties, for raw bytes, generated ClientHellos (any extensions, any SNI bytes, any record
fragmentation) and mutations of them, fed in arbitrary splits: every answer is NEED_MORE, Done or
Error; the same however the input is split; Done names are DNS-like (lower case, no dots at the
ends, no control characters) and ``0 < consumed <= len(input)``; between calls the parser holds
less than one record (+ header) of unparsed input and less than one ClientHello of reassembled
handshake bytes; every call answers within the time budget.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tunneld.plugins.tls._clienthello import (
    MAX_CLIENT_HELLO,
    MAX_FRAGMENT,
    NEED_MORE,
    ClientHelloParser,
    Done,
    Error,
)

from ._limits import budget, fuzz_settings, split

FUZZ = fuzz_settings(120)
NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


def parse(chunks: list[bytes], max_size: int) -> Any:
    parser = ClientHelloParser(max_size)
    result: Any = NEED_MORE
    for chunk in chunks:
        with budget():
            result = parser.feed(chunk)
        if result is not NEED_MORE:
            assert parser.feed(b"more") == result  # sticky
            return result
        assert len(parser._buf) < 5 + MAX_FRAGMENT, len(parser._buf)
        assert len(parser._hello) < 4 + max_size, len(parser._hello)
    return result


def check(data: bytes, cuts: list[int], max_size: int = MAX_CLIENT_HELLO) -> Any:
    whole = parse([data], max_size)
    assert whole == parse(split(data, cuts), max_size)
    assert whole is NEED_MORE or isinstance(whole, (Done, Error))
    if isinstance(whole, Done):
        assert 0 < whole.consumed <= len(data)
        name = whole.server_name
        assert name is None or (NAME.fullmatch(name) and ".." not in name), name
    elif isinstance(whole, Error):
        assert whole.kind in ("not_tls", "malformed", "too_large")
    return whole


def vec(size: int, data: bytes) -> bytes:
    return len(data).to_bytes(size, "big") + data


def extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!H", ext_type) + vec(2, data)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    return vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names))


def hello_body(extensions: list[bytes] | None, session: bytes = b"", suites: bytes = b"\x13\x01") -> bytes:
    body = b"\x03\x03" + bytes(32) + vec(1, session) + vec(2, suites) + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, b"".join(extensions))
    return body


def records(handshake: bytes, sizes: list[int]) -> bytes:
    """``handshake`` cut into TLS records of the given sizes (cycled; each 1..2^14)."""
    out, pos, i = b"", 0, 0
    while pos < len(handshake):
        n = max(1, min(MAX_FRAGMENT, sizes[i % len(sizes)] if sizes else MAX_FRAGMENT))
        out += b"\x16\x03" + bytes([1]) + vec(2, handshake[pos : pos + n])
        pos, i = pos + n, i + 1
    return out


dns_labels = st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?", fullmatch=True)
good_names = st.lists(dns_labels, min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 253)
any_names = good_names.map(str.encode) | st.binary(min_size=1, max_size=40) | st.sampled_from(
    [b"a.example\n", b"a..b", b".a", b"a.", b"a b", b"-a", b"\x00", b"A.EXAMPLE.", b"x" * 300])
other_extensions = st.builds(extension, st.integers(1, 0xFFFF), st.binary(max_size=40))


@st.composite
def hellos(draw: st.DrawFn) -> tuple[bytes, bytes | None, int]:
    """(records + trailing bytes, the SNI name sent or None, the records' length)."""
    name = draw(st.none() | any_names)
    exts = draw(st.lists(other_extensions, max_size=4, unique_by=lambda e: e[:2]))
    if name is not None:
        exts.insert(draw(st.integers(0, len(exts))), extension(0, sni(name)))
    body = hello_body(draw(st.none() | st.just(exts)) if name is None else exts,
                      session=draw(st.binary(max_size=32)))
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    data = records(handshake, draw(st.lists(st.integers(1, 300), max_size=4)))
    return data + draw(st.binary(max_size=8)), name, len(data)


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(hellos())[0])
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.integers(0, 3))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == 2:
            del buf[pos : pos + draw(st.integers(1, 4))]
        elif len(buf) >= pos + 2:  # nudge a u16 length field
            (v,) = struct.unpack_from("!H", buf, pos) if pos + 2 <= len(buf) else (0,)
            if pos + 2 <= len(buf):
                struct.pack_into("!H", buf, pos, (v + draw(st.sampled_from([-1, 1, 256, -256]))) & 0xFFFF)
    return bytes(buf)


cuts = st.lists(st.integers(0, 20_000), max_size=12)
sizes = st.sampled_from([MAX_CLIENT_HELLO, 64, 0])


@FUZZ
@given(data=st.binary(max_size=600), cuts=cuts, max_size=sizes)
def test_raw_bytes(data: bytes, cuts: list[int], max_size: int) -> None:
    check(data, cuts, max_size)


@FUZZ
@given(data=st.binary(max_size=400), cuts=cuts)
def test_raw_bytes_behind_record_header(data: bytes, cuts: list[int]) -> None:
    """Random handshake bytes behind a plausible record + ClientHello header reach the body parser."""
    check(records(b"\x01" + len(data).to_bytes(3, "big") + data, [len(data) + 4]), cuts)


@FUZZ
@given(hello=hellos(), cuts=cuts)
def test_generated_hellos(hello: tuple[bytes, bytes | None, int], cuts: list[int]) -> None:
    data, name, size = hello
    result = check(data, cuts)
    if name is not None and re.fullmatch(rb"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?", name) \
            and b".." not in name and len(name) <= 253:
        assert result == Done(name.decode().lower().rstrip("."), size)
    elif name is None:
        assert result == Done(None, size)
    else:
        assert isinstance(result, (Done, Error))


@FUZZ
@given(data=mutated_hellos(), cuts=cuts, max_size=sizes)
def test_mutated_hellos(data: bytes, cuts: list[int], max_size: int) -> None:
    check(data, cuts, max_size)


def test_regression_server_name_with_trailing_newline() -> None:
    """``re.match`` with ``$`` accepted "a.example\\n" as a host name (routing/log injection)."""
    for name in (b"a.example\n", b"a.example\n.", b"A.EXAMPLE\n"):
        data = records(b"\x01" + vec(3, hello_body([extension(0, sni(name))])), [])
        result = ClientHelloParser().feed(data)
        assert isinstance(result, Error) and result.kind == "malformed", (name, result)
    ok = records(b"\x01" + vec(3, hello_body([extension(0, sni(b"A.Example."))])), [])
    assert ClientHelloParser().feed(ok) == Done("a.example", len(ok))


def test_oversized_hello_refused_before_buffering() -> None:
    parser = ClientHelloParser()
    head = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    assert parser.feed(head).kind == "too_large"  # type: ignore[union-attr]
