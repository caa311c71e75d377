"""Sans-IO limiter for failed authentications: exponential delay per client address.

No I/O and no clock reads: callers pass ``now`` (e.g. ``trio.current_time()``), which must not
go backwards.  The caller picks the key: for IPv6 a /64 prefix rather than the full address,
since one host usually owns a whole /64.
"""

from __future__ import annotations

from collections import OrderedDict

# 2.0 ** n overflows a float past n = 1023; any realistic cap is reached long before 64.
_MAX_EXPONENT = 64


class FailureLimiter:
    """Track authentication failures per address and say how long to delay the next attempt.

    The first ``threshold`` failures are free; after ``n >= threshold`` failures the next
    attempt is delayed ``base_delay * 2 ** (n - threshold)`` seconds, capped at ``max_delay``.
    An address is forgotten ``forget_after`` seconds after its last failure, and at most
    ``max_entries`` addresses are tracked (the least recently failing are dropped first), so a
    spray of addresses cannot exhaust memory.
    """

    def __init__(
        self,
        threshold: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        forget_after: float = 600.0,
        max_entries: int = 100_000,
    ) -> None:
        if threshold < 0 or base_delay < 0 or max_delay < 0 or forget_after <= 0 or max_entries < 1:
            raise ValueError("FailureLimiter: invalid parameters")
        self.threshold = threshold
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_entries = max_entries
        # addr -> (failures, time of last failure), ordered oldest failure first, so that both
        # expiry and eviction pop from the front in O(1).
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        """Number of addresses currently tracked."""
        return len(self._entries)

    def record_failure(self, addr: str, now: float) -> None:
        """Count a failed authentication from ``addr``."""
        self._expire(now)
        failures, _ = self._entries.pop(addr, (0, now))
        self._entries[addr] = (failures + 1, now)  # re-inserted at the end: newest
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def record_success(self, addr: str, now: float) -> None:
        """A successful authentication clears the address's record."""
        self._entries.pop(addr, None)
        self._expire(now)

    def attempt(self, addr: str, now: float) -> float:
        """Count an attempt from ``addr`` *before* checking it; return the delay it deserves.

        Attempts in flight count as failures, so a burst of parallel guesses sees the delay
        grow from the first one past ``threshold`` on, instead of all being checked before the
        first failure is recorded.  Call :meth:`refund` if the attempt succeeds.
        """
        delay = self.delay(addr, now)
        self.record_failure(addr, now)
        return delay

    def refund(self, addr: str) -> None:
        """Take back one attempt counted by :meth:`attempt` that succeeded.

        Unlike :meth:`record_success`, the address's other failures stay: whoever holds one
        valid token must not be able to wipe the record of guesses from the same address.
        """
        entry = self._entries.get(addr)
        if entry is None:
            return
        if entry[0] <= 1:
            del self._entries[addr]
        else:
            self._entries[addr] = (entry[0] - 1, entry[1])  # keeps its place in the order

    def delay(self, addr: str, now: float) -> float:
        """Seconds to wait before handling an attempt from ``addr`` (0 if not limited)."""
        self._expire(now)
        entry = self._entries.get(addr)
        if entry is None or entry[0] < self.threshold:
            return 0.0
        exponent = min(entry[0] - self.threshold, _MAX_EXPONENT)
        return float(min(self.base_delay * 2.0**exponent, self.max_delay))

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            addr, (_, last) = next(iter(entries.items()))
            if now - last < self.forget_after:
                break
            del entries[addr]
