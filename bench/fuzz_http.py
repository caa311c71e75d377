"""Long fuzzing of the HTTP/1 framing in tunneld/http1/_wire.py; not run in CI.

    python bench/fuzz_http.py                          # 1,000,000 inputs per target, atheris if installed
    python bench/fuzz_http.py --runs 200000 --targets chunked
    python bench/fuzz_http.py --engine python          # the pure-Python mutation fuzzer instead

Targets (each in its own process; the report gives inputs run, corpus size and peak RSS):

- ``request``: ``find_head_end`` + ``parse_request_head`` on the input, then, for a chunked
  request, a ``ChunkedScanner`` over the rest -- the edge's path for a client's bytes;
- ``response``: ``parse_response_head`` after a GET, HEAD or POST (chosen by the first byte);
- ``chunked``: a ``ChunkedScanner`` fed the input whole and in pieces (split points from the
  first bytes of the input).

Every input must give a result or ``BadMessage`` (any other exception is a finding), the same
answer however it is split, ``feed()`` must consume everything it is given until the body ends,
the scanner's line buffer must stay within ``MAX_CHUNK_LINE + 1`` bytes, and each input must
finish within ``--time-limit`` seconds.

Engines: ``atheris`` (coverage-guided libFuzzer, ``pip install atheris``; the test suite never
needs it) or ``python``, a mutation fuzzer over a seed corpus that keeps inputs reaching a new
outcome.  The atheris corpus lives in ``--corpus-dir`` (default: a temp dir) and is reused by
later runs.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ("request", "response", "chunked")

SEEDS_CHUNKED = [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;a=b\r\nhello\r\n1a;name=\"quoted \\\" value\"\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n",
    b"5 ; a = b\r\nhello\r\n0\r\nExpires: never\r\nX-T:\tv \r\n\r\n",
    b"0000000000000003\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
    b"7fffffffffffffff\r\n",
    b"1\r\nA\r\n-5\r\nX",
    b"0x0\r\n\r\n",
    b"5\nhello\n0\n\n",
    b"0\r\nA: b\r\n c\r\n\r\n",
]
SEEDS_REQUEST = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a.example:8080\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: [::1]:80\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"1;x=y\r\nA\r\n0\r\nT: 1\r\n\r\n",
    b"GET http://a.example/x?y HTTP/1.1\r\nHost: b.example\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a.\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
]
SEEDS_RESPONSE = [
    b"\x00HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"\x01HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"\x02HTTP/1.0 200 OK\r\n\r\n",
    b"\x00HTTP/1.1 204 No Content\r\n\r\n",
    b"\x00HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"\x00HTTP/1.1 100 Continue\r\n\r\n",
    b"\x02HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
]
# A chunked input starts with its split count and sizes (see check_chunked): whole, and in 1, 3, 16 and
# 5 byte pieces.
SEEDS = {"request": SEEDS_REQUEST, "response": SEEDS_RESPONSE,
         "chunked": [p + s for s in SEEDS_CHUNKED for p in (b"\x00", b"\x04\x00\x02\x0f\x04")]}
MAX_LEN = {"request": 4096, "response": 4096, "chunked": 10000}
METHODS = (b"GET", b"HEAD", b"POST")


class Finding(Exception):
    """A property of the framing code does not hold for an input."""


def _scan(data: bytes, pieces: list[int]) -> tuple[str, int]:
    """Feed ``data`` to a fresh scanner in ``pieces`` (sizes, cycled); (outcome, body length)."""
    from tunneld.http1._wire import MAX_CHUNK_LINE, BadMessage, ChunkedScanner

    scanner = ChunkedScanner()
    pos = 0
    i = 0
    try:
        while pos < len(data) and not scanner.done:
            n = pieces[i % len(pieces)] if pieces else len(data)
            i += 1
            piece = data[pos:pos + n]
            used = scanner.feed(piece)
            if not 0 <= used <= len(piece) or (used < len(piece) and not scanner.done):
                raise Finding(f"feed consumed {used} of {len(piece)} bytes, done={scanner.done}")
            if len(scanner._line) > MAX_CHUNK_LINE + 1:
                raise Finding(f"line buffer grew to {len(scanner._line)} bytes")
            pos += used
    except BadMessage as exc:
        if exc.status != 400:
            raise Finding(f"scanner BadMessage status {exc.status}") from None
        return "bad", -1
    return ("done" if scanner.done else "more"), pos


def check_chunked(data: bytes) -> str:
    # First byte: how many split sizes follow; then the sizes (1..64); then the body.
    k = data[0] % 8 if data else 0
    pieces = [b % 64 + 1 for b in data[1:1 + k]]
    body = data[1 + k:]
    whole = _scan(body, [])
    split = _scan(body, pieces)
    if whole != split:
        raise Finding(f"whole {whole} != split {split} (pieces {pieces})")
    return whole[0]


def check_request(data: bytes) -> str:
    from tunneld.http1._wire import BadMessage, BodyKind, find_head_end, parse_request_head

    end = find_head_end(data)
    if end < 0:
        return "no-head"
    try:
        req = parse_request_head(data[:end])
    except BadMessage as exc:
        if exc.status not in (400, 505):
            raise Finding(f"request BadMessage status {exc.status}") from None
        return "bad-head"
    if not isinstance(req.host, str) or req.body not in (BodyKind.NONE, BodyKind.LENGTH, BodyKind.CHUNKED):
        raise Finding(f"odd request head {req!r}")
    if req.version == "1.1" and not req.has(b"host"):
        raise Finding("HTTP/1.1 request without Host accepted")
    if req.body == BodyKind.CHUNKED:
        rest = data[end:]
        pieces = [b % 32 + 1 for b in rest[:4]]
        whole, split = _scan(rest, []), _scan(rest, pieces)
        if whole != split:
            raise Finding(f"whole {whole} != split {split}")
        return "chunked-" + whole[0]
    return "ok"


def check_response(data: bytes) -> str:
    from tunneld.http1._wire import BadMessage, find_head_end, parse_response_head

    if not data:
        return "empty"
    method = METHODS[data[0] % 3]
    end = find_head_end(data, 1)
    if end < 0:
        return "no-head"
    try:
        resp = parse_response_head(data[1:end], method)
    except BadMessage as exc:
        if exc.status != 502:
            raise Finding(f"response BadMessage status {exc.status}") from None
        return "bad-head"
    if not 100 <= resp.status <= 599:
        raise Finding(f"status {resp.status} accepted")
    return "ok"


CHECKS: dict[str, Callable[[bytes], str]] = {
    "request": check_request, "response": check_response, "chunked": check_chunked}


def timed(check: Callable[[bytes], str], limit: float, *, alarm: bool = False) -> Callable[[bytes], str]:
    """``check`` with a time limit; ``alarm`` also ends a call that never returns (not under
    libFuzzer, whose own -timeout uses SIGALRM)."""
    def on_alarm(_signum: int, _frame: object) -> None:
        raise Finding(f"hang: no answer within {4 * limit} s")

    if alarm:
        signal.signal(signal.SIGALRM, on_alarm)

    def run(data: bytes) -> str:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 4 * limit)
        start = time.perf_counter()
        try:
            outcome = check(data)
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        took = time.perf_counter() - start
        if took > limit:
            raise Finding(f"input took {took:.3f} s (limit {limit} s)")
        return outcome
    return run


# --- pure-Python engine ----------------------------------------------------------------------

_DICT = [b"\r\n", b"\n", b"\r", b";", b"=", b"\"", b"\\", b" ", b"\t", b":", b"0", b"-", b"+", b"0x",
         b"_", b"ffffffffffffffff", b"chunked", b"Transfer-Encoding: ", b"Content-Length: ", b"Host: ",
         b"HTTP/1.1", b"HTTP/1.0", b"http://", b"@", b"[", b"]", b"%", b"#", b"..", b"\x00", b"\x7f", b"\xff"]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 5)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(_DICT)
        elif op == 2 and buf:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            other = rng.choice(corpus)
            a = rng.randrange(len(other) + 1)
            buf[pos:pos] = other[a:a + rng.randint(1, 64)]
        elif op == 4:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 5 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice(b"0123456789abcdefABCDEF \t;=\r\n:-+x")
        elif op == 6 and len(buf) > 1:
            a = rng.randrange(len(buf))
            buf[pos:pos] = buf[a:a + rng.randint(1, 32)]
    return bytes(buf)


def python_engine(target: str, runs: int, limit: float, seed: int) -> tuple[int, int, int]:
    """(inputs run, corpus entries, corpus bytes); exits 1 on a finding."""
    import tunneld.http1._wire  # noqa: F401 - imported before the clock starts

    rng = random.Random(seed)
    check = timed(CHECKS[target], limit, alarm=True)
    corpus = list(SEEDS[target])
    seen: set[tuple[str, int]] = set()
    for n in range(runs):
        if n < len(SEEDS[target]):
            data = corpus[n]
        else:
            data = mutate(rng, rng.choice(corpus), corpus)[:MAX_LEN[target]]
        try:
            outcome = check(data)
        except Exception as exc:  # noqa: BLE001 - every exception is a finding here
            print(f"FINDING ({target}, input #{n}): {exc!r}\n  input hex: {data.hex()}", file=sys.stderr)
            sys.exit(1)
        # Keep inputs that reach an outcome at a length bucket not seen yet: a cheap stand-in
        # for coverage that steers towards longer, deeper bodies.
        key = (outcome, len(data).bit_length())
        if key not in seen:
            seen.add(key)
            corpus.append(data)
    return runs, len(corpus), sum(map(len, corpus))


# --- atheris engine --------------------------------------------------------------------------

def atheris_worker(target: str, limit: float, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        import tunneld.http1._wire  # noqa: F401
    check = timed(CHECKS[target], limit)

    def one_input(data: bytes) -> None:
        check(data)

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


def run_atheris(target: str, runs: int, limit: float, corpus_root: Path) -> tuple[int, int, int, float]:
    """Run one target in a child process; (runs, corpus entries, corpus bytes, peak RSS MB)."""
    corpus = corpus_root / target
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[target]):
        path = corpus / f"seed-{i}"
        if not path.exists():
            path.write_bytes(seed)
    dictionary = corpus_root / "http.dict"
    dictionary.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in word) + '"\n' for word in _DICT))
    args = [f"-runs={runs}", f"-max_len={MAX_LEN[target]}", f"-timeout={max(2, int(limit * 4))}",
            f"-dict={dictionary}",
            "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={corpus_root}/{target}-",
            str(corpus)]
    cmd = [sys.executable, __file__, "--worker", target, "--time-limit", str(limit), "--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    log = proc.stdout + proc.stderr
    (corpus_root / f"{target}.log").write_text(log)
    if proc.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        print(f"FINDING in target {target}: libFuzzer exit {proc.returncode}, artifacts in {corpus_root}",
              file=sys.stderr)
        sys.exit(1)
    done = re.search(r"Done (\d+) runs", log)
    rss = re.search(r"stat::peak_rss_mb:\s*(\d+)", log)
    files = [p for p in corpus.iterdir() if p.is_file()]
    return (int(done.group(1)) if done else -1, len(files), sum(p.stat().st_size for p in files),
            float(rss.group(1)) if rss else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--engine", choices=("auto", "atheris", "python"), default="auto")
    parser.add_argument("--time-limit", type=float, default=0.5, help="seconds per input")
    parser.add_argument("--corpus-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None, help="python engine only")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        atheris_worker(args.worker, args.time_limit, args.rest)
        return
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "python"
    targets = [t for t in args.targets.split(",") if t]
    corpus_root = args.corpus_dir or Path(tempfile.mkdtemp(prefix="tunneld-fuzz-http-"))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"engine {engine}; {args.runs} inputs per target; time limit {args.time_limit} s per input"
          + (f"; corpus {corpus_root}" if engine == "atheris" else f"; seed {seed}"), flush=True)
    for target in targets:
        start = time.monotonic()
        if engine == "atheris":
            runs, entries, size, rss = run_atheris(target, args.runs, args.time_limit, corpus_root)
        else:
            runs, entries, size = python_engine(target, args.runs, args.time_limit, seed)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        took = time.monotonic() - start
        print(f"{target:9s} {runs} inputs in {took:.0f} s ({runs / took:.0f}/s); corpus {entries} inputs, "
              f"{size} bytes; peak RSS {rss:.0f} MB", flush=True)
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"no finding; peak RSS of any process {peak / 1024:.0f} MB")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
