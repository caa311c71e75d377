"""LeanSocketStream and the mux streams: trio's stream semantics with fewer scheduler trips."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from tunneld.core import _lean
from tunneld.core._lean import LeanSocketStream, lean

from .test_mux import session_pair, stream_pair


def socket_pair(*, clogged: bool = False) -> tuple[LeanSocketStream, LeanSocketStream]:
    """A connected pair; ``clogged``: both send buffers full, so send_all blocks."""
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setblocking(False)
        if clogged:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            try:
                while True:
                    sock.send(b"x" * 65536)
            except BlockingIOError:
                pass
    return (LeanSocketStream(trio.SocketStream(trio.socket.from_stdlib_socket(a))),
            LeanSocketStream(trio.SocketStream(trio.socket.from_stdlib_socket(b))))


async def tcp_pair() -> tuple[LeanSocketStream, trio.SocketStream]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream(*listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return LeanSocketStream(client), trio.SocketStream(server)


async def test_check_half_closeable_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # trio's checker wants every call to yield, which the stream does with YIELD_EVERY = 1.
    monkeypatch.setattr(_lean, "YIELD_EVERY", 1)

    async def make_pair() -> tuple[LeanSocketStream, LeanSocketStream]:
        return socket_pair()

    async def make_clogged_pair() -> tuple[LeanSocketStream, LeanSocketStream]:
        return socket_pair(clogged=True)

    with trio.fail_after(20):
        await trio.testing.check_half_closeable_stream(make_pair, make_clogged_pair)


class Yields(trio.abc.Instrument):
    """Counts how often the current task yields to the scheduler (it is stepped once more)."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1

    async def during(self, calls: int, op: Callable[[], Awaitable[object]]) -> int:
        """Yields while awaiting ``op()`` ``calls`` times."""
        self.count = 0
        trio.lowlevel.add_instrument(self)
        try:
            for _ in range(calls):
                await op()
        finally:
            trio.lowlevel.remove_instrument(self)
        return self.count


@pytest.mark.parametrize("every", [1, 3, 8])
async def test_ready_calls_yield_every_n(monkeypatch: pytest.MonkeyPatch, every: int) -> None:
    """Calls that need no wait yield on every YIELD_EVERY-th call in a row, and only then."""
    monkeypatch.setattr(_lean, "YIELD_EVERY", every)
    a, b = socket_pair()
    yields = Yields()
    assert await yields.during(every - 1, lambda: a.send_all(b"ping")) == 0
    assert await yields.during(1, lambda: a.send_all(b"ping")) == 1
    assert await yields.during(3 * every, lambda: a.send_all(b"ping")) == 3
    assert await yields.during(every - 1, lambda: b.receive_some(4)) == 0
    assert await yields.during(1, lambda: b.receive_some(4)) == 1
    assert await yields.during(every, lambda: b.receive_some(4)) == 1
    # A call that moves BULK_BYTES or more yields at once, as trio's streams do.
    big = b"x" * (2 * _lean.BULK_BYTES)
    _lean.STREAK.waited()
    assert await yields.during(1, lambda: a.send_all(big)) == 1
    assert await yields.during(1, lambda: b.receive_some(_lean.BULK_BYTES)) == 1


async def assert_cancelled_calls_do_nothing(stream: trio.abc.Stream, expected: bytes) -> None:
    """As in trio: calls in a cancelled scope raise Cancelled and neither read nor send;
    ``expected`` (already buffered) is still there afterwards."""
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await stream.receive_some(len(expected))
        with pytest.raises(trio.Cancelled):
            await stream.send_all(b"never")
    assert await stream.receive_some(len(expected)) == expected


async def test_cancelled_call_does_nothing() -> None:
    a, b = socket_pair()
    await b.send_all(b"kept")
    await assert_cancelled_calls_do_nothing(a, b"kept")
    await a.send_eof()
    assert await b.receive_some(10) == b""


async def test_waits_when_nothing_to_read_and_errors_map_like_trio() -> None:
    client, server = await tcp_pair()
    async with trio.open_nursery() as nursery:
        got = []

        async def reader() -> None:
            got.append(await client.receive_some())

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await server.send_all(b"late")
    assert got == [b"late"]
    # A reset peer: BrokenResourceError, as trio.SocketStream raises.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    await server.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await client.send_all(b"x" * 65536)
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_close_wakes_a_waiting_receiver() -> None:
    a, b = socket_pair()
    async with trio.open_nursery() as nursery:
        async def reader() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await a.receive_some()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await a.aclose()
    await b.aclose()


async def test_large_send_waits_for_the_reader() -> None:
    a, b = socket_pair()
    payload = bytes(range(256)) * 40000  # 10 MB: far more than the socket buffers
    received = bytearray()
    async with trio.open_nursery() as nursery:
        async def reader() -> None:
            while len(received) < len(payload):
                received.extend(await b.receive_some(65536))

        nursery.start_soon(reader)
        await a.send_all(payload)
    assert received == payload


async def test_send_all_parts_writes_every_piece_in_order_through_partial_writes() -> None:
    """One writev for many pieces; when the socket takes only part of them, the rest (from
    the middle of a piece) follows once it drains."""
    a, b = socket_pair()
    parts = [os.urandom(n) for n in (1, 300_000, 17, 2_000_000, 65_536, 3)] * 3
    total = sum(map(len, parts))
    received = bytearray()

    async def reader() -> None:
        while len(received) < total:
            received.extend(await b.receive_some(min(100_000, total - len(received))))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await a.send_all_parts(parts)
    assert received == b"".join(parts)
    await a.send_all_parts([b"!"])  # a single piece goes through send_all
    assert await b.receive_some(1) == b"!"
    many = [bytes([i % 256]) * 3 for i in range(3000)]  # more pieces than one writev takes
    await a.send_all_parts(many)
    assert await _receive_exactly(b, 9000) == b"".join(many)
    await a.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all_parts([b"x", b"y"])
    await a.aclose()
    await b.aclose()


async def _receive_exactly(stream: LeanSocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await stream.receive_some(n - len(got))
    return bytes(got)


async def test_read_into_nowait_reads_what_is_there() -> None:
    a, b = socket_pair()
    buf = memoryview(bytearray(10))
    assert b.read_into_nowait(buf) is None  # nothing yet: the caller waits
    await a.send_all(b"hello, world")
    await b.wait_readable()
    assert b.read_into_nowait(buf) == 10 and bytes(buf) == b"hello, wor"
    assert b.read_into_nowait(buf) == 2 and bytes(buf[:2]) == b"ld"
    await a.send_eof()
    await b.wait_readable()
    assert b.read_into_nowait(buf) == 0  # end of stream
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        b.read_into_nowait(buf)
    await a.aclose()


async def test_concurrent_use_is_refused() -> None:
    a, b = socket_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await a.receive_some()
        nursery.cancel_scope.cancel()


async def test_lean_wraps_only_plain_socket_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    assert isinstance(lean(stream), LeanSocketStream)
    other = trio.testing.MemorySendStream()
    assert lean(other) is other  # type: ignore[arg-type]
    # Windows sockets are not file descriptors: trio's own stream is kept there.
    monkeypatch.setattr(_lean.sys, "platform", "win32")
    assert lean(stream) is stream
    monkeypatch.undo()
    a.close()
    b.close()


async def test_mux_stream_ready_calls_skip_the_scheduler(nursery: trio.Nursery,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """MuxStream follows the same rule: buffered data and queued sends yield every N calls."""
    monkeypatch.setattr(_lean, "YIELD_EVERY", 4)
    client, server = await session_pair(nursery)
    c, s = await stream_pair(client, server)
    for i in range(8):
        await c.send_all(b"%d" % i)
    await trio.testing.wait_all_tasks_blocked()
    yields = Yields()
    # The streak went on across the sends above: count from a fresh one.
    _lean.STREAK.waited()
    assert await yields.during(3, lambda: c.send_all(b"x")) == 0
    assert await yields.during(1, lambda: c.send_all(b"y")) == 1
    # The 8 small sends arrived as separate chunks: one byte at a time, no yield until the
    # 4th receive.
    assert await yields.during(3, lambda: s.receive_some(1)) == 0
    assert await yields.during(1, lambda: s.receive_some(1)) == 1
    await assert_cancelled_calls_do_nothing(s, b"4")


async def test_the_streak_belongs_to_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ready calls on different streams count together; a wait on any of them resets the
    count; a child task has its own count, not a copy of its parent's."""
    monkeypatch.setattr(_lean, "YIELD_EVERY", 4)
    a, b = socket_pair()
    c, d = socket_pair()
    yields = Yields()
    _lean.STREAK.waited()
    assert await yields.during(1, lambda: a.send_all(b"1")) == 0
    assert await yields.during(2, lambda: c.send_all(b"2")) == 0
    assert await yields.during(1, lambda: b.receive_some(1)) == 1  # 4th ready call of this task
    assert await yields.during(2, lambda: a.send_all(b"x")) == 0
    # Waiting on one stream resets the count for all of them.
    e, f = socket_pair()

    async def later() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await e.send_all(b"late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await f.receive_some(100) == b"late"
    assert await yields.during(3, lambda: a.send_all(b"x")) == 0
    assert await yields.during(1, lambda: a.send_all(b"x")) == 1

    _lean.STREAK.waited()
    for _ in range(3):
        assert not _lean.STREAK.ready(1)  # this task is at 3
    counted = []

    async def child() -> None:
        counted.append((_lean.STREAK.ready(1), _lean.STREAK.count))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child)
    assert counted == [(False, 1)]  # the child counts from 1, not on from its parent's 3


async def test_receive_some_validates_max_bytes() -> None:
    a, b = socket_pair()
    await b.send_all(b"data")
    with pytest.raises(ValueError):
        await a.receive_some(0)
    with pytest.raises(TypeError):
        await a.receive_some(1.5)  # type: ignore[arg-type]
    assert await a.receive_some(2) == b"da"


async def test_close_forcefully_closes_a_socket_stream_without_a_checkpoint() -> None:
    """A socket closes at once: no checkpoint (aclose_forcefully's raises and catches
    Cancelled inside a cancelled scope, for every proxied connection), the peer sees EOF, and
    a second close is harmless; a stream of another kind gets trio's aclose_forcefully."""
    lean_a, lean_b = socket_pair()
    plain_a, plain_b = socket_pair()
    for stream, peer in ((lean_a, lean_b), (plain_a.stream, plain_b)):
        with trio.testing.assert_no_checkpoints():
            await _lean.close_forcefully(stream)
            assert _lean.close_now(stream)  # already closed: still fine
        assert stream.socket.fileno() == -1
        assert await peer.receive_some() == b""
        await peer.aclose()
    send, receive = trio.testing.memory_stream_pair()
    assert not _lean.close_now(send)
    with trio.CancelScope() as scope:
        scope.cancel()
        await _lean.close_forcefully(send)  # trio's: closes even when cancelled
    with pytest.raises(trio.ClosedResourceError):
        await send.send_all(b"x")
    await receive.aclose()
    # aclose_at_once: the same at once for a socket; any other stream gets its own aclose.
    lean_a, lean_b = socket_pair()
    with trio.testing.assert_no_checkpoints():
        await _lean.aclose_at_once(lean_a)
    assert await lean_b.receive_some() == b""
    await lean_b.aclose()
    send, receive = trio.testing.memory_stream_pair()
    with trio.testing.assert_checkpoints():
        await _lean.aclose_at_once(send)
    with pytest.raises(trio.ClosedResourceError):
        await send.send_all(b"x")
    await receive.aclose()
