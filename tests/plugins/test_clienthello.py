"""The sans-IO ClientHello reader: real ClientHellos, hand-built ones, and hypothesis fuzzing.

Real ClientHellos come from Python's ssl and from pyOpenSSL (memory BIOs, no sockets) and from
the ``openssl s_client`` binary (captured from a loopback socket).  ``bench/fuzz_clienthello.py``
runs the same properties with far more examples.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from tunneld.plugins.tls._clienthello import (
    MAX_CLIENT_HELLO,
    NEED_MORE,
    Alert,
    ClientHelloParser,
    Done,
    Error,
    alert_record,
)

# ---- making ClientHellos ----------------------------------------------------------------------


def python_hello(server_hostname: str | None, *, alpn: list[str] | None = None,
                 maximum: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of a Python ssl client (records as they would go on the wire)."""
    ctx = ssl.create_default_context()
    if server_hostname is None or server_hostname[0].isdigit():
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def pyopenssl_hello(server_hostname: bytes | None) -> bytes:
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    if server_hostname is not None:
        conn.set_tlsext_host_name(server_hostname)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def openssl_cli_hello(servername: str) -> bytes:
    """The ClientHello of ``openssl s_client -servername NAME``, read off a loopback socket."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                 "-servername", servername],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                parser = ClientHelloParser()
                while True:
                    chunk = conn.recv(65536)
                    assert chunk, "openssl closed before its ClientHello was complete"
                    data += chunk
                    if parser.feed(chunk) is not NEED_MORE:
                        return data
        finally:
            proc.kill()
            proc.wait()


def handshake_of(records: bytes) -> bytes:
    """The handshake bytes carried by a run of records."""
    out = b""
    while records:
        length = struct.unpack("!H", records[3:5])[0]
        out += records[5:5 + length]
        records = records[5 + length:]
    return out


def as_records(handshake: bytes, sizes: list[int] | None = None, *, version: bytes = b"\x03\x01") -> bytes:
    """``handshake`` cut into records of the given fragment sizes (the rest in one last record)."""
    out = b""
    for size in sizes or []:
        if not handshake:
            break
        piece, handshake = handshake[:size], handshake[size:]
        out += b"\x16" + version + struct.pack("!H", len(piece)) + piece
    while handshake:
        piece, handshake = handshake[:16384], handshake[16384:]
        out += b"\x16" + version + struct.pack("!H", len(piece)) + piece
    return out


def sni_extension(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes([t]) + struct.pack("!H", len(n)) + n for t, n in entries)
    data = struct.pack("!H", len(names)) + names
    return struct.pack("!HH", 0, len(data)) + data


def build_hello(extensions: bytes | None = b"", *, session_id: bytes = b"", suites: bytes = b"\x13\x01",
                compression: bytes = b"\x00", trailing: bytes = b"") -> bytes:
    """A ClientHello handshake message (no record header) with the given raw extensions block."""
    body = b"\x03\x03" + bytes(32) + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites + bytes([len(compression)]) + compression
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    body += trailing
    return b"\x01" + len(body).to_bytes(3, "big") + body


def padding(n: int) -> bytes:
    return struct.pack("!HH", 21, n) + bytes(n)


def parse(data: bytes) -> object:
    return ClientHelloParser().feed(data)


# ---- the real ones ----------------------------------------------------------------------------

REAL: dict[str, tuple[bytes, str | None]] = {
    "python-tls13": (python_hello("Secure.Example.COM"), "secure.example.com"),
    "python-alpn": (python_hello("a.tunneld.test", alpn=["h2", "http/1.1"]), "a.tunneld.test"),
    "python-tls12": (python_hello("b.tunneld.test", maximum=ssl.TLSVersion.TLSv1_2), "b.tunneld.test"),
    "python-ip-no-sni": (python_hello("127.0.0.1"), None),
    "python-no-sni": (python_hello(None), None),
    "pyopenssl": (pyopenssl_hello(b"x1.tunneld.test"), "x1.tunneld.test"),
    "pyopenssl-no-sni": (pyopenssl_hello(None), None),
}


@pytest.fixture(scope="module")
def openssl_hello() -> bytes:
    return openssl_cli_hello("cli.tunneld.test")


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_client_hellos(name: str) -> None:
    data, sni = REAL[name]
    assert parse(data) == Done(sni, len(data))


def test_openssl_s_client_hello(openssl_hello: bytes) -> None:
    assert parse(openssl_hello) == Done("cli.tunneld.test", len(openssl_hello))


def test_byte_at_a_time_and_bytes_after_the_hello() -> None:
    data, sni = REAL["python-tls13"]
    parser = ClientHelloParser()
    for i in range(len(data) - 1):
        assert parser.feed(data[i:i + 1]) is NEED_MORE
    assert parser.feed(data[-1:] + b"\x17\x03\x03early data") == Done(sni, len(data))
    # Settled: more input changes nothing.
    assert parser.feed(b"garbage") == Done(sni, len(data))


def test_hello_spread_over_many_records() -> None:
    data, sni = REAL["python-alpn"]
    split = as_records(handshake_of(data), [1, 2, 3, 50, 7])
    assert parse(split) == Done(sni, len(split))


# ---- hand-built ones: SNI forms -------------------------------------------------------------------


@pytest.mark.parametrize(("ext", "expected"), [
    (sni_extension((0, b"Host.Example.")), Done("host.example", 0)),
    (sni_extension((0, b"under_score.example")), Done("under_score.example", 0)),
    (sni_extension((1, b"opaque"), (0, b"real.example")), Done("real.example", 0)),
    (sni_extension((1, b"only-unknown-types")), Done(None, 0)),
    (padding(10), Done(None, 0)),
    (None, Done(None, 0)),  # no extensions block at all (TLS 1.0/1.1 style)
], ids=["trailing-dot", "underscore", "other-type-first", "only-other-types", "no-sni-ext", "no-extensions"])
def test_sni_forms(ext: bytes | None, expected: Done) -> None:
    data = as_records(build_hello(ext))
    assert parse(data) == Done(expected.server_name, len(data))


@pytest.mark.parametrize(("hello", "why"), [
    (build_hello(sni_extension((0, b"a.example"), (0, b"b.example"))), "two host names"),
    (build_hello(sni_extension((0, b"bad name.example"))), "not a DNS name"),
    (build_hello(sni_extension((0, "é.example".encode()))), "not a DNS name"),
    (build_hello(sni_extension((0, b"a..example"))), "not a DNS name"),
    (build_hello(struct.pack("!HHH", 0, 2, 0)), "server name list"),  # an empty list
    (build_hello(sni_extension((0, b""))), "server name has 0 bytes"),
    (build_hello(struct.pack("!HHHBH", 0, 5, 3, 0, 9)), "runs past"),  # name longer than its list
    (build_hello(sni_extension((0, b"a.example")) * 2), "appears twice"),
    (build_hello(padding(4)[:-1]), "runs past"),
    (build_hello(b"", trailing=b"x"), "bytes after the extensions"),
    (build_hello(suites=b"\x13\x01\x13"), "odd cipher suite"),
    (build_hello(suites=b""), "cipher suites"),
    (build_hello(compression=b""), "compression methods"),
    (build_hello(session_id=bytes(33)), "session id"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_hellos_are_errors(hello: bytes, why: str) -> None:
    result = parse(as_records(hello))
    assert isinstance(result, Error) and result.kind == "malformed", result
    assert why in result.reason


@pytest.mark.parametrize(("data", "kind"), [
    (b"GET / HTTP/1.1\r\n", "not_tls"),
    (b"\x80\x2e\x01\x03\x01", "not_tls"),  # SSLv2-compatible ClientHello
    (b"\x16\x02\x00", "not_tls"),
    (b"\x16\x03\x01\x00\x00", "malformed"),  # empty handshake record
    (b"\x16\x03\x01\x40\x01", "malformed"),  # record longer than 2^14
    (as_records(b"\x02\x00\x00\x00"), "malformed"),  # a ServerHello
    (b"\x16\x03\x01\x00\x02\x01\x00" + b"\x15\x03\x01\x00\x02\x02\x28", "malformed"),
], ids=["http", "sslv2", "ssl2-version", "empty-record", "record-too-long", "server-hello", "alert-inside"])
def test_not_a_client_hello(data: bytes, kind: str) -> None:
    result = parse(data)
    assert isinstance(result, Error) and result.kind == kind, result


def test_garbage_is_refused_from_its_first_byte() -> None:
    # No waiting for the timeout: one byte that cannot start a handshake record is enough.
    assert isinstance(ClientHelloParser().feed(b"G"), Error)
    assert ClientHelloParser().feed(b"\x16") is NEED_MORE


def test_size_limit() -> None:
    base = len(build_hello(padding(0))) - 4
    at_limit = build_hello(padding(MAX_CLIENT_HELLO - base))
    assert len(at_limit) - 4 == MAX_CLIENT_HELLO
    assert parse(as_records(at_limit)) == Done(None, len(as_records(at_limit)))
    over = as_records(build_hello(padding(MAX_CLIENT_HELLO - base + 1)))
    # Refused as soon as the handshake header is in, without buffering the rest.
    result = parse(over[:5 + 4])
    assert isinstance(result, Error) and result.kind == "too_large"


def test_alert_record() -> None:
    assert alert_record(Alert.HANDSHAKE_FAILURE) == b"\x15\x03\x03\x00\x02\x02\x28"


# ---- properties (hypothesis) -----------------------------------------------------------------------

REAL_DATA = [data for data, _ in REAL.values()]
#: DNS names: 1-4 labels of letters, digits and inner hyphens.
LABEL = st.from_regex(r"\A[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?\Z")
NAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


def feed_in_pieces(data: bytes, cuts: list[int]) -> object:
    parser = ClientHelloParser()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    result: object = NEED_MORE
    for a, b in zip(points, points[1:], strict=False):
        result = parser.feed(data[a:b])
        if result is not NEED_MORE:
            break
    return result


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.sampled_from(REAL_DATA), cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_any_split_gives_the_same_answer(data: bytes, cuts: list[int]) -> None:
    assert feed_in_pieces(data, cuts) == parse(data)


@settings(max_examples=300)
@given(data=st.sampled_from(REAL_DATA), sizes=st.lists(st.integers(1, 400), max_size=12),
       cuts=st.lists(st.integers(0, 10_000), max_size=10))
def test_any_record_fragmentation_gives_the_same_name(data: bytes, sizes: list[int], cuts: list[int]) -> None:
    records = as_records(handshake_of(data), sizes)
    expected = parse(data)
    assert isinstance(expected, Done)
    assert feed_in_pieces(records, cuts) == Done(expected.server_name, len(records))


@settings(max_examples=300)
@given(data=st.sampled_from(REAL_DATA), keep=st.integers(0, 10_000))
def test_every_truncation_needs_more(data: bytes, keep: int) -> None:
    keep %= len(data)
    assert parse(data[:keep]) is NEED_MORE


@settings(max_examples=300)
@given(name=NAMES, dot=st.booleans(), sizes=st.lists(st.integers(1, 64), max_size=5))
def test_generated_names_round_trip(name: str, dot: bool, sizes: list[int]) -> None:
    hello = build_hello(padding(3) + sni_extension((0, (name + ("." if dot else "")).encode())))
    data = as_records(hello, sizes)
    assert parse(data) == Done(name.lower(), len(data))


@settings(max_examples=500)
@given(junk=st.binary(max_size=3000))
@example(junk=b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")
def test_random_bytes_never_crash(junk: bytes) -> None:
    result = parse(junk)
    assert result is NEED_MORE or isinstance(result, (Done, Error))
    if junk and junk[0] != 0x16:
        assert isinstance(result, Error) and result.kind == "not_tls"
    if isinstance(result, Done):
        assert 0 < result.consumed <= len(junk)


@settings(max_examples=500)
@given(data=st.sampled_from(REAL_DATA), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                                          min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_corrupted_hellos_never_crash(data: bytes, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    buf = bytearray(data)
    for pos, xor in flips:
        buf[pos % len(buf)] ^= xor
    result = parse(bytes(buf))
    assert result is NEED_MORE or isinstance(result, (Done, Error))
    # How the bytes arrive never changes the answer, whatever they are.
    assert feed_in_pieces(bytes(buf), cuts) == result
    if isinstance(result, Done) and result.server_name is not None:
        assert result.server_name == result.server_name.lower()
        assert " " not in result.server_name


# ---- layering -------------------------------------------------------------------------------------


def test_parser_module_does_not_import_trio() -> None:
    # Loaded on its own (the package __init__ imports trio for its hooks).
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tunneld", "plugins", "tls", "_clienthello.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('ch', {os.path.abspath(path)!r})\n"
            "mod = importlib.util.module_from_spec(spec); sys.modules['ch'] = mod\n"
            "spec.loader.exec_module(mod)\n"
            "assert mod.ClientHelloParser().feed(b'G').kind == 'not_tls'\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'tunneld'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr