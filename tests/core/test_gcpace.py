"""``_gcpace``: survivors of full collections are frozen; ended sessions' cycles are reclaimed.

Run in a child interpreter: freezing is process-wide and must not touch the test runner's heap.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, time, weakref
    from tunneld.core import _gcpace

    class Session:
        pass

    def cycle():
        s = Session()
        s.me = s  # only the cycle collector can free it
        return s

    assert not _gcpace.maybe_reclaim(0)  # not installed: nothing happens
    _gcpace.install()
    _gcpace.install()  # idempotent
    assert gc.callbacks.count(_gcpace._on_collection) == 1

    s = cycle()
    ref = weakref.ref(s)
    gc.collect()  # a full collection: its survivors (s among them) are frozen
    frozen = gc.get_freeze_count()
    assert frozen > 0, frozen
    del s
    gc.collect()
    assert ref() is not None, "a frozen cycle is not examined"

    _gcpace.sessions_ended(1)
    assert not _gcpace.maybe_reclaim(10)  # 1 ended of 10 alive: not yet
    assert ref() is not None
    assert _gcpace.maybe_reclaim(4)  # a quarter: collected
    assert ref() is None
    assert gc.get_freeze_count() > 0  # the survivors are frozen again
    assert not _gcpace.maybe_reclaim(0)  # nothing ended since

    s = cycle()
    ref = weakref.ref(s)
    gc.collect()
    del s
    _gcpace.sessions_ended(1)
    assert not _gcpace.maybe_reclaim(1000)
    assert _gcpace.maybe_reclaim(1000, now=time.monotonic() + _gcpace.RECLAIM_AFTER + 1)  # too old
    assert ref() is None
    print("ok")
    """
)


TYPE_CACHE_SCRIPT = textwrap.dedent(
    """
    import gc, tracemalloc
    from tunneld.core import _gcpace

    class Stop(Exception):
        pass

    # Splitting an exception group (as Trio does with every Cancelled a nursery collects) looks
    # up ``derive`` by a name it makes afresh; CPython's attribute cache keeps that name, one per
    # group type, after the group itself is gone.
    groups = [type(f"Group{i}", (ExceptionGroup,), {}) for i in range(300)]

    def split_all():
        for group in groups:
            group("x", [Stop(), ValueError()]).split(Stop)  # SPLIT

    tracemalloc.start()
    split_all()
    gc.collect()

    def held():
        stats = tracemalloc.take_snapshot().statistics("lineno")
        return sum(st.count for st in stats if st.traceback[0].filename == "<string>"
                   and st.traceback[0].lineno == SPLIT_LINE)

    before = held()
    _gcpace.install()
    _gcpace.sessions_ended(1)
    assert _gcpace.maybe_reclaim(0)
    print(before, held())
    """
)


def test_reclaim_empties_the_attribute_cache() -> None:
    """What only CPython's attribute cache still held is freed by the reclaim: left there, such
    blocks keep whole arenas of CPython's allocator from going back to the OS."""
    split_line = next(n for n, text in enumerate(TYPE_CACHE_SCRIPT.splitlines(), 1) if "# SPLIT" in text)
    script = TYPE_CACHE_SCRIPT.replace("SPLIT_LINE", str(split_line))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert before >= 20, before  # the cache alone held these
    assert after <= before // 10, (before, after)


def test_freeze_and_reclaim() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


UNINSTALLED_SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from tunneld.core import _gcpace

    class Conn:
        pass

    gc.collect()
    gc.freeze()  # what freeze_startup_objects does in the agent
    kept = Conn()
    kept.me = kept
    gc.freeze()
    frozen = gc.get_freeze_count()
    ref_kept = weakref.ref(kept)
    del kept

    young = Conn()
    young.me = young
    ref_young = weakref.ref(young)
    del young
    _gcpace.reclaim_now()  # not installed: what a crowd's going does in the agent
    assert ref_young() is None, "the young cycle is collected"
    assert ref_kept() is not None, "what was frozen stays frozen, and is not collected"
    assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
    print("ok")
    """
)


def test_reclaim_now_leaves_a_startup_freeze_alone() -> None:
    """Not installed (the agent), the give-back after a crowd collects the young objects and
    neither unfreezes what the process froze at start-up nor freezes anything new."""
    out = subprocess.run([sys.executable, "-c", UNINSTALLED_SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
