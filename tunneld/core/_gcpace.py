"""Garbage collection paced for a process that holds many long-lived sessions.

CPython's full collection walks every object it tracks, and it runs whenever the objects that
survived young collections since the last one exceed a quarter of those it kept.  An edge
taking on thousands of agent sessions (a few hundred objects each) so walks its whole heap
again and again while it grows: 6,000 agents connecting at once cost 14 full collections, 4.4 s
of the edge's 23.6 s of CPU, and each one stopped every session for up to 0.7 s
(``bench/many_agents.py``).

Once installed, the survivors of each full collection are frozen (:func:`gc.freeze`): the next
ones walk only what is newer, so each object is walked about once as the heap grows.  Frozen
objects are never examined, so reference cycles among them that die (the tasks, streams and
TLS state of an ended session) would stay allocated.  :func:`sessions_ended` counts such
endings and :func:`maybe_reclaim` unfreezes and collects everything once they add up to a
quarter of the sessions alive (CPython's own rule, counted in sessions rather than objects) or
are older than :data:`RECLAIM_AFTER` seconds — then the memory can go back to the OS.

That collection also empties CPython's attribute lookup cache first.  Each of its 4,096 entries
keeps the name it was last looked up with, and a name made at run time (``BaseExceptionGroup.split``
makes one each time it looks up ``derive``, for every ``Cancelled`` Trio collects) is a small
object allocated while the sessions were there: a few hundred of them, scattered, kept 6 one-MiB
arenas of CPython's allocator from being returned after 3,000 agents left.  The cache refills
with the next lookups.

Even so, most of those arenas keep some long-lived object that was allocated while the
sessions were there, and CPython returns an arena only when all of its 64 pools are empty.
After the collection, :func:`release_empty_pools` gives the empty pools' pages back to the OS
(all but the first page of each, which holds the pool's header) with the compiled helper
``_pooltrim.c``.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

_release_free_pools: Callable[[list[Any]], tuple[int, int, int] | None] | None
try:
    from ._pooltrim import release_free_pools as _release_free_pools
except ImportError:  # not built: empty pools stay resident until their whole arena empties
    _release_free_pools = None

__all__ = ["RECLAIM_AFTER", "install", "installed", "maybe_reclaim", "reclaim_now", "release_empty_pools",
           "sessions_ended"]

#: Seconds an ended session's cyclic garbage may stay frozen, however few sessions ended.
RECLAIM_AFTER = 300.0

_installed = False
#: Sessions ended since the last reclaim, and when the first of them ended (monotonic).
_ended = 0
_first_ended = 0.0


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    # Runs right after a collection; freezing merges the generations' lists into the permanent
    # one (no object is visited), so it is cheap and safe here.
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def install() -> None:
    """Freeze the survivors of every full collection from now on (idempotent; process-wide)."""
    global _installed
    if not _installed:
        _installed = True
        gc.callbacks.append(_on_collection)


def installed() -> bool:
    return _installed


def sessions_ended(count: int = 1) -> None:
    """Note that ``count`` long-lived sessions ended, or name holds they left expired (their
    cycles may be frozen garbage)."""
    global _ended, _first_ended
    if count > 0:
        if not _ended:
            _first_ended = time.monotonic()
        _ended += count


#: CPython's ``sys._clear_type_cache`` (a no-op where the interpreter has none).
_clear_type_cache = getattr(sys, "_clear_type_cache", lambda: None)


def maybe_reclaim(live_sessions: int, *, now: float | None = None) -> bool:
    """Collect the frozen garbage of ended sessions when it is due; True if it collected.

    Due when the sessions ended since the last reclaim reach a quarter of ``live_sessions``, or
    the first of them ended :data:`RECLAIM_AFTER` seconds ago.  A no-op unless installed.  The
    collection walks everything once (as CPython's own full collection would at that point).
    """
    if not _installed or not _ended:
        return False
    now = time.monotonic() if now is None else now
    if _ended * 4 < live_sessions and now - _first_ended < RECLAIM_AFTER:
        return False
    reclaim_now()
    return True


def reclaim_now() -> None:
    """Collect everything now and give the empty pools back, whether installed or not.

    Installed, the frozen objects are unfrozen and collected too (the survivors are frozen again
    by the collection's callback).  Otherwise what a process froze once at start-up
    (``freeze_startup_objects``) stays frozen: it is neither collected nor searched for pools.
    """
    global _ended
    _ended = 0
    _clear_type_cache()
    if _installed:
        gc.unfreeze()
    # Full (which also empties the free lists); installed, its callback freezes the survivors again.
    gc.collect()
    release_empty_pools(frozen=_installed)


def release_empty_pools(*, frozen: bool = True) -> int:
    """Give the pages of CPython's empty small-object pools back to the OS; returns bytes.

    The arenas searched are those holding the objects the collector tracks and what they
    refer to (see ``_pooltrim.c``).  With ``frozen``, call it right after a full collection, as
    :func:`maybe_reclaim` leaves things: the frozen objects are listed by unfreezing them for a
    moment and freezing them again, which at any other time would also freeze younger objects.
    Without it the frozen objects are left out, and with them any arena only they hold.
    0 where the compiled helper is not built or does not know this interpreter's allocator.
    """
    if _release_free_pools is None:
        return 0
    frozen = frozen and gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    try:
        objects = gc.get_objects()
    finally:
        if frozen:
            gc.freeze()
    released = _release_free_pools(objects)
    return 0 if released is None else released[2]
