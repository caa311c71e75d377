"""The compiled head-parser fast path under AddressSanitizer and UBSan; not run in CI.

    python bench/fuzz_speedups.py                  # 20,000 inputs per parser
    python bench/fuzz_speedups.py --examples 100000

Builds ``tunneld/http1/_speedups.c`` with ``-fsanitize=address,undefined`` into a temp dir,
re-runs this script under ``LD_PRELOAD=libasan libubsan`` with ``PYTHONMALLOC=malloc`` (so that
the bytes it parses come from instrumented memory), and feeds it the generated, mutated and
random heads of ``tests/plugins/test_wire_speedups.py`` plus every 7th prefix of each: any
read out of bounds or undefined behaviour aborts the run, and every head the fast path takes
must parse to the same fields in the full parser.  Needs gcc with libasan/libubsan (Debian:
``apt-get install gcc python3-dev``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tunneld" / "http1" / "_speedups.c"


def build(out: Path) -> Path:
    so = out / ("_speedups" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                    "-fno-sanitize-recover=all", "-fPIC", "-shared",
                    "-I" + sysconfig.get_paths()["include"], str(SOURCE), "-o", str(so)], check=True)
    return so


def fuzz(so: Path, examples: int) -> None:
    spec = importlib.util.spec_from_file_location("_speedups", so)
    assert spec is not None and spec.loader is not None
    fast = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fast)
    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.fuzz.test_fuzz_http import heads_from
    from tests.plugins.test_wire_speedups import (
        COMMON_REQUESTS,
        COMMON_RESPONSES,
        full_request,
        full_response,
        request_heads,
        response_heads,
    )

    run = settings(max_examples=examples, database=None, deadline=None,
                   suppress_health_check=list(HealthCheck))
    taken = [0, 0]

    @run
    @given(st.one_of(request_heads(), heads_from(COMMON_REQUESTS)))
    def requests(head: bytes) -> None:
        for k in range(0, len(head), 7):
            fast.scan_request(head[:k])
        fields = fast.scan_request(head)
        if fields is not None:
            taken[0] += 1
            assert fields == full_request(head), head

    @run
    @given(st.one_of(response_heads(), heads_from(COMMON_RESPONSES)),
           st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"", b"HEAD\0"]))
    def responses(head: bytes, method: bytes) -> None:
        for k in range(0, len(head), 7):
            fast.scan_response(head[:k], method)
        fields = fast.scan_response(head, method)
        if fields is not None:
            taken[1] += 1
            assert fields == full_response(head, method), (head, method)

    requests()
    responses()
    print(f"clean under ASan/UBSan: {examples} requests ({taken[0]} took the fast path), "
          f"{examples} responses ({taken[1]})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20000, help="inputs per parser")
    ap.add_argument("--so", help=argparse.SUPPRESS)  # the re-run under the sanitizers
    args = ap.parse_args()
    if args.so:
        fuzz(Path(args.so), args.examples)
        return 0
    with tempfile.TemporaryDirectory(prefix="tunneld-asan-") as tmp:
        so = build(Path(tmp))
        libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                               check=True).stdout.strip() for lib in ("libasan.so", "libubsan.so")]
        env = {**os.environ, "LD_PRELOAD": " ".join(libs), "PYTHONMALLOC": "malloc",
               "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
        return subprocess.run([sys.executable, __file__, "--so", str(so), "--examples",
                               str(args.examples)], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
