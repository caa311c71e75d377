"""``tune_malloc``: the relay's 1 MiB buffers stay in glibc's heap instead of faulting pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunneld.core import _util

pytestmark = pytest.mark.skipif(_util._glibc_handle() is None, reason="glibc's mallopt only")

# A relay holds a few 1 MiB reads at once, then lets them go: the heap's top grows and shrinks.
_CYCLES = r"""
import resource, sys
from tunneld.core._util import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
elif sys.argv[1] == "cli":
    from tunneld import cli
    sys.argv = ["tunneld", "--version"]
    try:
        cli.main()
    except SystemExit:
        pass

def cycle():
    held = [b"x" * (1 << 20) for _ in range(6)]
    del held

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, timeout=60,
                         env=env, check=True).stdout
    return int(out.split()[-1])  # the last line (`tunneld --version` prints before it)


def test_tuned_heap_stops_faulting_relay_buffers_in() -> None:
    default, tuned = _page_faults("default"), _page_faults("tuned")
    # 50 cycles of 6 MiB: glibc's own thresholds give the top back each time (~1,500 faults a
    # cycle); tuned, the memory is reused in place.
    assert default > 10_000, default
    assert tuned < default // 20, (tuned, default)


@pytest.mark.parametrize("name, value", [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                         ("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_MMAP_THRESHOLD_", "0")])
def test_the_users_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert _util.tune_malloc() is False


def test_the_command_line_tunes_its_process() -> None:
    # `tunneld --version` run in-process first: the heap then behaves as tuned.
    assert _page_faults("cli") < _page_faults("default") // 20
