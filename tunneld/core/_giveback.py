"""Memory given back once a crowd of connections has come and gone.

While 10,000 public connections were open through one tunnel, the edge and the agent each grew
by about 80 MiB, and a minute after the last of them closed each still held all of it
(``bench/many_conns.py --after 60``).  Their objects were freed, but CPython returns an arena of
its small-object allocator only when every one of its pools is empty, glibc keeps the chunks
freed inside its heap, and on the edge the cycles a connection leaves may have been frozen by a
full collection while it was open (``_gcpace``).  The edge already gives memory back after
agent sessions end (``_gcpace.maybe_reclaim``, then ``malloc_trim``); :class:`CrowdWatch`
notices the same moment for connections, and :func:`give_back` does the same work: a full
collection, the empty pools released (``_pooltrim.c``), the C heap trimmed.

A crowd has gone when at least :data:`MIN_CROWD` connections have closed since the most open at
once and at most a quarter of that peak is left: a steady load, however high, never triggers
it, nor does a churn of short connections that never pile up.  Giving back walks every object
once (a few hundred ms with a large heap), so it happens at most every :data:`MIN_SPACING`
seconds; a crowd that goes sooner is seen at the next check.
"""

from __future__ import annotations

import math
import time

import trio

from . import _gcpace
from ._util import release_free_memory

__all__ = ["CROWD", "CrowdWatch", "MIN_CROWD", "MIN_SPACING", "give_back", "watch_crowds"]

#: Connections that must have closed since the peak for a crowd to count as gone.
MIN_CROWD = 1000
#: Seconds between two give-backs after crowds, at least.
MIN_SPACING = 30.0
#: Seconds between the agent's checks (the edge checks in its own trim loop).
CHECK_INTERVAL = 10.0


class CrowdWatch:
    """Open connections now, the most open at once since the last give-back, and when that was."""

    __slots__ = ("live", "peak", "_last")

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._last = -math.inf

    def opened(self) -> None:
        self.live += 1
        if self.live > self.peak:
            self.peak = self.live

    def closed(self) -> None:
        self.live -= 1

    def gone(self, now: float | None = None) -> bool:
        """True, once, when a crowd has gone since the last True (see the module docstring).

        The peak then starts again from the connections still open.
        """
        if self.peak - self.live < MIN_CROWD or self.live * 4 > self.peak:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last < MIN_SPACING:
            return False
        self._last = now
        self.peak = self.live
        return True


#: The process's watch: the edge's public listeners and the agent's proxied streams count here
#: (the memory given back is the process's, whichever of them the crowd came through).
CROWD = CrowdWatch()


async def give_back() -> None:
    """Collect, release the empty pools (both in the event loop: nothing may allocate meanwhile),
    then trim the C heap (in a worker thread: it may take a while on a large heap)."""
    _gcpace.reclaim_now()
    await trio.to_thread.run_sync(release_free_memory)


async def watch_crowds(watch: CrowdWatch = CROWD, interval: float = CHECK_INTERVAL) -> None:
    """Give memory back after every crowd, for as long as it runs (the agent process's task)."""
    while True:
        await trio.sleep(interval)
        if watch.gone():
            await give_back()
