"""Coarse deadlines for the public connections' idle and head timeouts.

A keep-alive connection moves its deadline twice per request: armed (idle wait, head budget)
and disarmed (the exchange runs unbounded).  Each move of a trio ``CancelScope.deadline``
re-files the scope in the scheduler's deadline heap, about 1.4 us: 3 % of the edge's CPU per
proxied request.  Here a move is a dict store, and one task cancels what is overdue every
:data:`TICK` seconds.  The timeouts this serves are seconds to minutes long (10 s for a head,
300 s idle), so firing up to a tick late is of no consequence.
"""

from __future__ import annotations

import math

import trio

#: Seconds between two checks for overdue connections.
TICK = 0.25


class CoarseTimers:
    """Deadlines of many cancel scopes, enforced by :meth:`run` (one task for all of them)."""

    def __init__(self) -> None:
        self._due: dict[trio.CancelScope, float] = {}
        #: True while :meth:`run` runs; without it, use the scopes' own deadlines.
        self.running = False

    def arm(self, scope: trio.CancelScope, deadline: float) -> None:
        """Cancel ``scope`` once ``trio.current_time()`` passes ``deadline``."""
        self._due[scope] = deadline

    def disarm(self, scope: trio.CancelScope) -> None:
        self._due[scope] = math.inf

    def forget(self, scope: trio.CancelScope) -> None:
        self._due.pop(scope, None)

    def __len__(self) -> int:
        return len(self._due)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.sleep(TICK)
                now = trio.current_time()
                overdue = [scope for scope, deadline in self._due.items() if deadline <= now]
                for scope in overdue:
                    del self._due[scope]
                    scope.cancel()
        finally:
            self.running = False
