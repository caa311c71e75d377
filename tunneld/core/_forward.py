"""``forward(a, b)``: the one byte-copy loop in tunneld."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

#: Read size for plugins (exported as ``tunneld.plugin.CHUNK``): 256 KiB reads gave 1.8-2.5 GB/s
#: through a Trio relay against 1.3 GB/s at 64 KiB (../shared/perf-notes.md Q1).  Plugins size
#: their own buffers by it (the file server reads files in CHUNK pieces), so it stays put.
CHUNK = 256 * 1024
#: Read size of the relay loops of :func:`forward`.  1 MiB cut the CPU per MB of a tunnelled bulk
#: transfer by about a fifth against 256 KiB (issue 17): the per-read costs (task switches, mux
#: frames, TLS calls) are paid per chunk, not per byte.  A read returns what the socket holds
#: (its buffer shrunk to that at once), so small exchanges keep nothing allocated.
RELAY_CHUNK = 1024 * 1024

_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.define
class ByteCounts:
    """Bytes :func:`forward` has delivered each way (kept current, so they survive a cancel)."""

    a_to_b: int = 0
    b_to_a: int = 0


async def forward(a: trio.abc.Stream, b: trio.abc.Stream, counts: ByteCounts | None = None) -> None:
    """Copy bytes both ways between ``a`` and ``b`` until both directions have ended.

    Each direction ends at EOF and is passed on as a half-close when the receiving stream
    supports it.  When the destination cannot half-close (TLS), EOF in one direction ends the
    whole exchange.  A broken stream on either side ends both directions at once: the caller
    owns and closes both streams.  ``counts``, if given, is updated as bytes are delivered
    (for access logs).
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, a, b, nursery.cancel_scope, counts, True)
        nursery.start_soon(_pump, b, a, nursery.cancel_scope, counts, False)


async def _pump(src: trio.abc.ReceiveStream, dst: trio.abc.Stream, scope: trio.CancelScope,
                counts: ByteCounts | None, a_to_b: bool) -> None:
    receive: Callable[[int], Awaitable[Any]] = src.receive_some
    send: Callable[[Any], Awaitable[None]] = dst.send_all
    size: Callable[[Any], int] = len
    receive_parts = getattr(src, "receive_parts", None)
    send_parts = getattr(dst, "send_all_parts", None)
    if receive_parts is not None and send_parts is not None:
        # A mux stream into a socket or TLS: the frames go out as they came, unjoined (a copy
        # of every byte fewer: ~4 % of the receiving side's CPU in a bulk transfer).
        receive, send, size = receive_parts, send_parts, _total
    try:
        while data := await receive(RELAY_CHUNK):
            await send(data)
            if counts is not None:
                if a_to_b:
                    counts.a_to_b += size(data)
                else:
                    counts.b_to_a += size(data)
    except _ENDED:
        scope.cancel()
        return
    await _pass_eof(dst, scope)


def _total(parts: list[bytes]) -> int:
    return sum(map(len, parts))


async def _pass_eof(dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """Pass the end of one direction on: a half-close, or the end of both."""
    if isinstance(dst, trio.abc.HalfCloseableStream):
        try:
            await dst.send_eof()
        except _ENDED:
            scope.cancel()
    else:
        scope.cancel()
