"""The HTTP edge's coarse connection timers (idle and head timeouts)."""

from __future__ import annotations

import math

import trio

from tunneld.plugins.http import _timers
from tunneld.plugins.http._timers import CoarseTimers


async def test_an_armed_scope_is_cancelled_about_a_tick_after_its_deadline() -> None:
    timers = CoarseTimers()
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        assert timers.running
        scope = trio.CancelScope()
        started = trio.current_time()
        with trio.fail_after(5), scope:
            timers.arm(scope, started + 0.1)
            await trio.sleep_forever()
        assert scope.cancelled_caught
        assert 0.1 <= trio.current_time() - started <= 0.1 + 2 * _timers.TICK + 0.5
        assert len(timers) == 0  # a fired entry is dropped
        nursery.cancel_scope.cancel()
    assert not timers.running


async def test_disarmed_and_forgotten_scopes_are_left_alone() -> None:
    timers = CoarseTimers()
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        kept, forgotten = trio.CancelScope(), trio.CancelScope()
        now = trio.current_time()
        timers.arm(kept, now + 0.05)
        timers.disarm(kept)
        timers.arm(forgotten, now + 0.05)
        timers.forget(forgotten)
        await trio.sleep(3 * _timers.TICK)
        assert not kept.cancel_called and not forgotten.cancel_called
        assert len(timers) == 1  # the disarmed one stays until forgotten
        timers.arm(kept, math.inf)
        timers.forget(kept)
        assert len(timers) == 0
        nursery.cancel_scope.cancel()
