"""A private asyncio loop in a thread of its own, callable from Trio (../shared/perf-notes.md Q5 (b)).

asyncssh runs on its own native loop, so the gateway needs no trio-asyncio.  Control crosses
the boundary in two ways: Trio runs coroutines on the loop with :meth:`AsyncioThread.call`
(``run_coroutine_threadsafe``, completion delivered back through the Trio token), and asyncio
code reaches Trio with :meth:`AsyncioThread.to_trio` (``TrioToken.run_sync_soon``).  Bytes
never cross here: each forwarded channel gets a socketpair, so Trio sees a plain SocketStream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

log = logging.getLogger("tunneld.ssh")

T = TypeVar("T")


class AsyncioThread:
    """An asyncio event loop running in a daemon thread, for the lifetime of a ``with`` block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="tunneld-ssh", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def start(self) -> None:
        """Start the loop; must be called from the Trio thread."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()

    async def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and wait for its thread."""
        if not self._thread.is_alive():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(cancel_all(), self.loop)
        await trio.to_thread.run_sync(lambda: fut.result(5), abandon_on_cancel=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await trio.to_thread.run_sync(self._thread.join, 5, abandon_on_cancel=True)

    async def call(self, coro: Coroutine[Any, Any, T], *, discard: Callable[[T], object] | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from Trio.

        Cancelling the Trio side cancels the asyncio task too (and waits for it to finish); if
        it finished anyway, its result is handed to ``discard`` (to close what it opened).
        """
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        fut.add_done_callback(lambda _: _soon(token, done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            fut.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await done.wait()
            if discard is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                discard(fut.result())
            raise
        return fut.result()

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """From Trio (or any thread): run ``fn(*args)`` on the loop, without waiting."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # loop already closed: the gateway is stopping

    def to_trio(self, fn: Callable[..., object], *args: object) -> None:
        """From the loop: run ``fn(*args)`` in Trio (dropped once Trio has finished)."""
        assert self._token is not None
        _soon(self._token, fn, *args)


def _soon(token: trio.lowlevel.TrioToken, fn: Callable[..., object], *args: object) -> None:
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass
