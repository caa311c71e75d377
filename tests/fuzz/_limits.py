"""What every fuzz module shares: the hypothesis profile, a per-input time budget, random splits."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: Seconds one input may take (twice that and an alarm ends a loop that never returns).
BUDGET = 1.0


def fuzz_settings(examples: int) -> Any:
    """Deterministic and database-free, so CI runs the same inputs every time."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def budget(seconds: float = BUDGET) -> Iterator[None]:
    """Fail if the block takes ``seconds`` or more; an alarm also ends a loop that never returns."""

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise AssertionError(f"hang: no answer within {2 * seconds:.1f}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 2 * seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    took = time.perf_counter() - start
    assert took < seconds, f"one input took {took:.2f}s"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


def mutate(draw: st.DrawFn, buf: bytearray) -> bytes:
    """``buf`` after 1-4 byte flips, insertions, deletions or duplications of its own bytes."""
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(buf)))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == 2:
            del buf[pos : pos + draw(st.integers(1, 9))]
        else:
            buf[pos:pos] = buf[pos : pos + draw(st.integers(1, 40))]
    return bytes(buf)
