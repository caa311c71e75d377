from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tunneld.core._ratelimit import FailureLimiter


def test_backoff_schedule() -> None:
    lim = FailureLimiter()  # threshold 3, base 0.5, cap 30
    delays = []
    for i in range(12):
        delays.append(lim.delay("a", float(i)))
        lim.record_failure("a", float(i))
    # The first three attempts are free; then 0.5 doubling up to the 30 s cap.
    assert delays == [0, 0, 0, 0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert lim.delay("b", 12.0) == 0  # per address


def test_success_clears() -> None:
    lim = FailureLimiter(threshold=1)
    lim.record_failure("a", 0)
    lim.record_failure("a", 0)
    assert lim.delay("a", 0) == 1.0
    lim.record_success("a", 1)
    assert lim.delay("a", 1) == 0
    assert len(lim) == 0
    lim.record_success("never-seen", 1)  # harmless


def test_forget_after() -> None:
    lim = FailureLimiter(threshold=1, forget_after=100)
    lim.record_failure("a", 0)
    lim.record_failure("b", 50)
    lim.record_failure("b", 60)
    assert lim.delay("a", 99.9) == 0.5
    assert lim.delay("a", 100) == 0  # forgotten exactly forget_after after the last failure
    assert len(lim) == 1
    # A new failure restarts the count.
    lim.record_failure("a", 101)
    assert lim.delay("a", 101) == 0.5
    # The window runs from the *last* failure: b's first one is long gone, the count is not.
    lim.record_failure("b", 140)
    assert lim.delay("b", 200) == 2.0
    assert lim.delay("b", 240) == 0


def test_bounded_memory_under_spray() -> None:
    lim = FailureLimiter(threshold=1, max_entries=100)
    lim.record_failure("victim", 0)
    lim.record_failure("victim", 0)
    for i in range(10_000):
        lim.record_failure(f"10.0.{i // 256}.{i % 256}", 1 + i * 1e-3)
        assert len(lim) <= 100
    assert len(lim) == 100
    assert lim.delay("victim", 20) == 0  # oldest evicted first
    assert lim.delay("10.0.39.15", 20) == 0.5  # the newest survive


def test_recent_failure_moves_to_back_of_eviction_queue() -> None:
    lim = FailureLimiter(threshold=1, max_entries=2)
    lim.record_failure("a", 0)
    lim.record_failure("b", 1)
    lim.record_failure("a", 2)
    lim.record_failure("c", 3)  # evicts b, whose last failure is oldest
    assert lim.delay("a", 3) == 1.0
    assert lim.delay("b", 3) == 0
    assert lim.delay("c", 3) == 0.5


def test_huge_failure_count_does_not_overflow() -> None:
    lim = FailureLimiter(threshold=0, max_delay=30)
    for _ in range(3000):
        lim.record_failure("a", 0)
    assert lim.delay("a", 0) == 30


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": -1}, {"base_delay": -1}, {"max_delay": -1}, {"forget_after": 0}, {"max_entries": 0}],
)
def test_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailureLimiter(**kwargs)  # type: ignore[arg-type]


@given(
    events=st.lists(
        st.tuples(st.sampled_from("abcde"), st.booleans(), st.floats(0, 50)), max_size=60
    ),
    threshold=st.integers(0, 4),
)
# Ties in failure time: eviction takes the least recently failed (found by CI).
@example(events=[("a", False, 0.0), ("b", False, 0.0), ("d", False, 0.0), ("a", False, 0.0),
                 ("c", False, 0.0)],
         threshold=0)
def test_model(events: list[tuple[str, bool, float]], threshold: int) -> None:
    """Compare with a naive model that keeps every failure forever."""
    lim = FailureLimiter(threshold=threshold, base_delay=0.25, max_delay=4, forget_after=60, max_entries=3)
    model: dict[str, tuple[int, float]] = {}
    now = 0.0
    for addr, ok, step in events:
        now += step
        model = {k: v for k, v in model.items() if now - v[1] < 60}
        if ok:
            lim.record_success(addr, now)
            model.pop(addr, None)
        else:
            lim.record_failure(addr, now)
            n = model.pop(addr, (0, now))[0] + 1
            model[addr] = (n, now)  # re-inserted: among equal times, the newest failure
            # Evict the entries whose last failure is oldest beyond 3.
            while len(model) > 3:
                oldest = min(model, key=lambda k: model[k][1])
                del model[oldest]
        assert len(lim) <= 3
        for a in "abcde":
            d = lim.delay(a, now)
            n = model.get(a, (0, 0.0))[0]
            expected = 0.0 if n == 0 or n < threshold else min(0.25 * 2 ** (n - threshold), 4)
            assert d == expected, (a, n)


def test_attempts_count_before_their_outcome() -> None:
    """Parallel guesses: each is counted when it starts, so the burst sees the delay grow."""
    lim = FailureLimiter(max_delay=5)  # threshold 3, base 0.5
    delays = [lim.attempt("a", 0) for _ in range(8)]
    assert delays == [0, 0, 0, 0.5, 1, 2, 4, 5]


def test_refund_takes_back_one_attempt_only() -> None:
    lim = FailureLimiter(threshold=1)
    for _ in range(3):
        lim.attempt("a", 0)
    lim.attempt("a", 1)  # this one succeeds
    lim.refund("a")
    # The three failures stay: a valid token cannot wipe its neighbours' guesses.
    assert lim.delay("a", 1) == 2.0
    lim.refund("never-seen")  # harmless
    lim.attempt("b", 2)
    lim.refund("b")
    assert lim.delay("b", 2) == 0 and len(lim) == 1
