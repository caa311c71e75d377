"""Long fuzzing of the ClientHello reader (tunneld/plugins/tls/_clienthello.py); not run in CI.

    python bench/fuzz_clienthello.py                    # hypothesis 20000 examples/property + 60 s mutation
    python bench/fuzz_clienthello.py --examples 200000 --seconds 600

Two parts (atheris is not packaged here, so both are pure Python):

1. the hypothesis properties of ``tests/plugins/test_clienthello.py`` with many more examples;
2. a time-boxed mutation fuzzer seeded with real ClientHellos (Python ssl, pyOpenSSL, with and
   without SNI, TLS 1.2 and 1.3): byte flips, inserts, deletes, splices, length-field edits
   and re-fragmentation into records, each result fed whole and in random pieces.

Every input must give NEED_MORE, Done or Error (never an exception), the same answer however
it is split, ``0 < consumed <= len(input)`` for Done, and a lower-case name without spaces.
Exits 1 on the first counterexample and prints it in hex.
"""

from __future__ import annotations

import argparse
import random
import ssl
import struct
import sys
import time
from pathlib import Path

from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunneld.plugins.tls._clienthello import NEED_MORE, ClientHelloParser, Done, Error  # noqa: E402


def python_hello(name: str | None, maximum: ssl.TLSVersion | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def pyopenssl_hello(name: bytes | None) -> bytes:
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    if name is not None:
        conn.set_tlsext_host_name(name)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


SEEDS = [python_hello("a.example.com"), python_hello(None), python_hello("b.example", ssl.TLSVersion.TLSv1_2),
         pyopenssl_hello(b"c.example.org"), pyopenssl_hello(None)]


def handshake_of(records: bytes) -> bytes:
    out = b""
    while len(records) >= 5:
        n = struct.unpack("!H", records[3:5])[0]
        out += records[5:5 + n]
        records = records[5 + n:]
    return out


def refragment(rng: random.Random, data: bytes) -> bytes:
    hs = handshake_of(data)
    out = b""
    while hs:
        n = rng.randint(1, min(len(hs), 16384))
        out += b"\x16\x03\x01" + struct.pack("!H", n) + hs[:n]
        hs = hs[n:]
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and buf:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            other = rng.choice(SEEDS)
            a = rng.randrange(len(other))
            buf[pos:pos] = other[a:a + rng.randint(1, 64)]
        elif op == 4 and len(buf) > pos + 2:
            # length-like fields: nudge a big-endian u16
            (v,) = struct.unpack_from("!H", buf, pos)
            struct.pack_into("!H", buf, pos, (v + rng.choice([-2, -1, 1, 2, 256, -256])) & 0xFFFF)
        elif op == 5:
            buf = bytearray(refragment(rng, bytes(buf)) or buf)
        elif op == 6:
            del buf[pos:]
    return bytes(buf)


def check(data: bytes, rng: random.Random) -> None:
    whole = ClientHelloParser().feed(data)
    assert whole is NEED_MORE or isinstance(whole, (Done, Error)), whole
    if isinstance(whole, Done):
        assert 0 < whole.consumed <= len(data), whole
        name = whole.server_name
        assert name is None or (name == name.lower() and " " not in name and not name.endswith(".")), whole
    parser = ClientHelloParser()
    pos = 0
    piecewise: object = NEED_MORE
    while pos < len(data) and piecewise is NEED_MORE:
        n = rng.randint(1, 64) if rng.random() < 0.7 else rng.randint(1, len(data))
        piecewise = parser.feed(data[pos:pos + n])
        pos += n
    assert piecewise == whole, (piecewise, whole)


def run_hypothesis(examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    common = settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(seed=st.sampled_from(SEEDS), junk=st.binary(max_size=64), pos=st.integers(0, 5000),
           r=st.randoms(use_true_random=False))
    def spliced(seed: bytes, junk: bytes, pos: int, r: random.Random) -> None:
        pos %= len(seed) + 1
        check(seed[:pos] + junk + seed[pos:], r)

    @common
    @given(data=st.binary(max_size=4096), r=st.randoms(use_true_random=False))
    def random_bytes(data: bytes, r: random.Random) -> None:
        check(data, r)

    @common
    @given(data=st.binary(max_size=2048), r=st.randoms(use_true_random=False))
    def random_records(data: bytes, r: random.Random) -> None:
        # Random bytes behind a plausible record + handshake header reach the body parser.
        body = b"\x01" + len(data).to_bytes(3, "big") + data
        check(refragment(r, b"\x16\x03\x01" + struct.pack("!H", len(body)) + body), r)

    for prop in (spliced, random_bytes, random_records):
        start = time.monotonic()
        prop()
        took = time.monotonic() - start
        print(f"hypothesis {prop.__name__}: {examples} examples in {took:.1f}s", flush=True)


def run_mutation(seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    count = 0
    kinds: dict[str, int] = {}
    while time.monotonic() < deadline:
        for _ in range(200):
            data = mutate(rng, rng.choice(SEEDS))
            try:
                check(data, rng)
            except AssertionError:
                print(f"counterexample (seed {seed}, #{count}): {data.hex()}", file=sys.stderr)
                raise
            result = ClientHelloParser().feed(data)
            key = type(result).__name__ + (f":{result.kind}" if isinstance(result, Error) else "")
            kinds[key] = kinds.get(key, 0) + 1
            count += 1
    print(f"mutation: {count} inputs in {seconds:.0f}s; outcomes {dict(sorted(kinds.items()))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000, help="hypothesis examples per property")
    parser.add_argument("--seconds", type=float, default=60.0, help="mutation fuzzing time")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}", flush=True)
    try:
        run_hypothesis(args.examples)
        run_mutation(args.seconds, seed)
    except AssertionError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
    print("no counterexample found")


if __name__ == "__main__":
    main()
