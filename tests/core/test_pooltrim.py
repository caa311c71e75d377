"""``_pooltrim``: the empty pools of CPython's small-object allocator go back to the OS.

Each case runs in a fresh interpreter, so that its heap holds only what the case allocated.
The heap is laid out as after many sessions ended: a few long-lived objects allocated among
many short-lived ones, one survivor per eight pools, so no arena can be freed whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import require_compiled

_PROGRAM = r"""
import gc, json, os, re, sys, tempfile
from tunneld.core import _gcpace, _pooltrim

def rss_kib():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))

def stats():
    with tempfile.TemporaryFile() as tf:
        saved = os.dup(2)
        os.dup2(tf.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tf.seek(0)
        text = tf.read().decode()
    # Empty where Python's objects do not come from its own allocator (PYTHONMALLOC=malloc).
    arenas = re.search(r"arenas allocated current\s+=\s+([\d,]+)", text)
    unused = re.search(r"([\d,]+) unused pools", text)
    return tuple(int(m.group(1).replace(",", "")) if m else 0 for m in (arenas, unused))

def crowd(n):
    # 64-byte tuples (256 to a pool) and 8-character strings (about 300 to a pool)
    return [(i, -i, i + 1, "%08d" % i) for i in range(n)]

gc.disable()
report = {"supported": _pooltrim.supported()}
keep = []
rounds = []
for r in range(3):
    data = crowd(300_000)
    keep += data[::2048]        # one tuple survives in every eighth pool of tuples
    report["peak_arenas"] = max(report.get("peak_arenas", 0), stats()[0])
    del data
    gc.collect()
    before = rss_kib()
    arenas, unused = stats()
    released = _gcpace.release_empty_pools()
    rounds.append({"rss_before": before, "rss_after": rss_kib(), "released": released,
                   "unused_pools": unused, "arenas": arenas})
report["rounds"] = rounds
# What survived is intact, and the released pools serve new objects again: the same crowd fits
# in the arenas it had (with released pools whose blocks were lost, it would take new ones).
assert all(t == (t[0], -t[0], t[0] + 1, "%08d" % t[0]) for t in keep)
data = crowd(300_000)
assert all(t == (i, -i, i + 1, "%08d" % i) for i, t in enumerate(data))
report["arenas_again"] = stats()[0]
print(json.dumps(report))
"""


def _run(env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def _require_built() -> None:
    require_compiled("tunneld.core._pooltrim", "the pool release helper")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_vm_readv and /proc: Linux")
def test_empty_pools_are_given_back_and_serve_again() -> None:
    _require_built()
    report = _run()
    assert report["supported"], "CPython's pool layout was not recognised"
    for r in report["rounds"]:
        # ~7/8 of ~2,300 pools are empty after each round; 12 KiB of each 16 KiB pool goes back.
        assert r["unused_pools"] > 1500, r
        assert r["released"] >= r["unused_pools"] * 12 * 1024 * 0.9, r
        assert r["rss_before"] - r["rss_after"] >= r["released"] // 1024 * 0.8, r
    # Reused pools held their blocks: the last crowd needed no arena the first did not.
    assert report["arenas_again"] <= report["peak_arenas"] + 2, report


_PACED = r"""
import gc, re, sys
from tunneld.core import _gcpace

def rss_kib():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))

class Session:
    def __init__(self, i):
        self.me = self                      # a cycle: only the collector frees it
        self.parts = [(i, str(i)) for _ in range(8)]

_gcpace.install()
sessions, keep = [], []
for i in range(60_000):
    sessions.append(Session(i))
    if i % 200 == 0:
        keep.append(Session(-i))    # long-lived, allocated meanwhile: no arena empties whole
gc.collect()                        # survivors frozen
assert gc.get_freeze_count() > 0
del sessions
_gcpace.sessions_ended(60_000)
before = rss_kib()
assert _gcpace.maybe_reclaim(len(keep))
after = rss_kib()
assert gc.get_freeze_count() > 0, "the survivors are frozen again"
assert all(s.me is s and s.parts[7] == (s.parts[0][0], str(s.parts[0][0])) for s in keep)
print(before, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_vm_readv and /proc: Linux")
def test_reclaim_of_ended_sessions_releases_their_pools() -> None:
    """``maybe_reclaim`` (the edge's path): frozen cycles collected, then their empty pools go."""
    _require_built()
    out = subprocess.run([sys.executable, "-c", _PACED], capture_output=True, text=True, timeout=120,
                         check=True)
    before, after = map(int, out.stdout.split())
    # 60,000 sessions were freed (~90 MB resident -> ~40 here); without the release RSS does
    # not move at all, since every arena keeps one of the long-lived sessions.
    assert before - after > 30_000, (before, after)


def test_another_allocator_is_left_alone() -> None:
    """With the C allocator under Python's objects the layout check fails and nothing is touched."""
    _require_built()
    report = _run({"PYTHONMALLOC": "malloc"})
    assert not report["supported"]
    assert all(r["released"] == 0 for r in report["rounds"])


def test_debug_hooks_are_left_alone() -> None:
    """Debug hooks put guard bytes around each block: the blocks are not where pools put them."""
    _require_built()
    report = _run({"PYTHONMALLOC": "pymalloc_debug"})
    assert not report["supported"]
    assert all(r["released"] == 0 for r in report["rounds"])


def test_not_built_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunneld.core import _gcpace

    monkeypatch.setattr(_gcpace, "_release_free_pools", None)
    assert _gcpace.release_empty_pools() == 0


_RACE = r"""
import gc, random, sys, threading, time
from tunneld.core import _gcpace

stop = False
errors = []

def churn(seed):
    # Other threads allocate and free small objects all the while, and check what they hold.
    rnd = random.Random(seed)
    held = []
    while not stop:
        n = rnd.randint(100, 3000)
        x = [(i, "s%d" % i, [i] * rnd.randint(0, 40), {"k": i}) for i in range(n)]
        if any(t[0] != i or t[1] != "s%d" % i or t[3]["k"] != i or t[2].count(i) != len(t[2])
               for i, t in enumerate(x)):
            errors.append(seed)
        held.append(x[::rnd.randint(10, 300)])
        del held[:-30]
        if any(t[1] != "s%d" % t[0] for h in held for t in h):
            errors.append(seed)

threads = [threading.Thread(target=churn, args=(s,)) for s in range(3)]
for t in threads:
    t.start()
released = rounds = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    junk = [(i, str(i)) for i in range(100_000)]
    del junk
    gc.collect()
    released += _gcpace.release_empty_pools()
    rounds += 1
stop = True
for t in threads:
    t.join()
print(rounds, released, len(errors))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_vm_readv and /proc: Linux")
def test_release_while_other_threads_allocate() -> None:
    """Releases, one after another, while three threads allocate, free and check their objects:
    nothing they hold changes, and every released pool serves them again."""
    _require_built()
    out = subprocess.run([sys.executable, "-c", _RACE, "6"], capture_output=True, text=True, timeout=120,
                         check=True)
    rounds, released, errors = map(int, out.stdout.split())
    assert errors == 0
    assert rounds >= 5 and released > 0, (rounds, released)
