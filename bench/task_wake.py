"""What one Trio task wakeup costs: the price of a relay step that has to wait.

Two tasks hand a token back and forth through the mux's one-task wait slots
(``_wait_in_slot`` / ``_wake_slot``, what a stream's reader and writer park in), with the
waiting side parked under ``--depth`` coroutine frames as a relay's task is (its handler, the
exchange, the response loop, the head reader, the stream's ``receive_some``).  Each wakeup here
also costs one pass of Trio's scheduler (an ``epoll_wait`` among them) when one pair runs;
``--pairs`` runs several at once, so that a pass is shared as it is in a loaded process.

    python bench/task_wake.py               # ~10 s
    python bench/task_wake.py --rounds 500000 --depth 0 6 12 --pairs 1 8

Used to size what taking one wakeup per request off each side of the relay could save.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunneld.core._mux import _wait_in_slot, _wake_slot  # noqa: E402


class _Slot:
    waiter: object = None


async def _park(slot: _Slot, depth: int) -> None:
    if depth:
        await _park(slot, depth - 1)
    else:
        await _wait_in_slot(slot, "waiter")


async def measure(rounds: int, depth: int, pairs: int) -> float:
    """Microseconds per wakeup: ``pairs`` pairs of tasks, ``rounds`` round trips each."""

    async def echo(ours: _Slot, theirs: _Slot) -> None:
        for _ in range(rounds):
            await _park(theirs, depth)
            _wake_slot(ours, "waiter")

    async def ping(ours: _Slot, theirs: _Slot) -> None:
        for _ in range(rounds):
            _wake_slot(theirs, "waiter")
            await _park(ours, depth)

    slots = [(_Slot(), _Slot()) for _ in range(pairs)]
    async with trio.open_nursery() as nursery:
        for ours, theirs in slots:
            nursery.start_soon(echo, ours, theirs)
        await trio.sleep(0.01)  # every echo task is parked
        start = time.perf_counter()
        async with trio.open_nursery() as pingers:
            for ours, theirs in slots:
                pingers.start_soon(ping, ours, theirs)
        elapsed = time.perf_counter() - start
    return elapsed / (rounds * pairs * 2) * 1e6


async def run(args: argparse.Namespace) -> None:
    for pairs in args.pairs:
        for depth in args.depth:
            best = min([await measure(args.rounds // pairs, depth, pairs) for _ in range(args.repeat)])
            print(f"task wakeup, {pairs} pair(s), parked under {depth:2d} frames: {best:.2f} us "
                  f"(best of {args.repeat})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--depth", type=int, nargs="+", default=[0, 6])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 8])
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
