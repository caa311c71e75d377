"""The mux's flush at the end of a scheduler pass (``_mux._PassEndFlush``): frames that tasks
queue during a pass are written when the pass ends, with no writer task woken for them, in
order, and what cannot be written at once still reaches the writer.

Two MuxSessions over BulkTLSStream over real loopback sockets (``lean``, as tunneld runs them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from tunneld.core import _mux
from tunneld.core._lean import lean
from tunneld.core._mux import MuxSession, MuxStream

from .test_tls import Pki, _over, _write_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"), "127.0.0.1")


class StepCounter(trio.abc.Instrument):
    """Counts the steps of tasks whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


@attrs.define(eq=False)
class Pair:
    agent: MuxSession
    edge: MuxSession
    accepted: trio.MemoryReceiveChannel[MuxStream]


@pytest.fixture
async def pair(nursery: trio.Nursery, pki: Pki) -> AsyncIterator[Pair]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client_tcp = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        server_tcp = await listener.accept()
    client, server = await _over(lean(client_tcp), lean(server_tcp), pki)
    agent, edge = MuxSession(client, client=True), MuxSession(server, client=False)
    send, receive = trio.open_memory_channel[MuxStream](100)
    nursery.start_soon(agent.run)
    await nursery.start(lambda task_status: edge.run(on_stream=send.send_nowait, task_status=task_status))
    yield Pair(agent, edge, receive)
    await agent.aclose()
    await edge.aclose()


async def _echo(stream: MuxStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.aclose()


async def test_small_writes_skip_the_writer_task(pair: Pair, nursery: trio.Nursery) -> None:
    """Request/response traffic over an idle carrier: every frame goes out at the end of the
    pass that queued it, and neither session's writer task runs once."""
    counter = StepCounter("._writer_task")
    trio.lowlevel.add_instrument(counter)
    try:
        with trio.fail_after(10):
            stream = await pair.agent.open_stream(b"hello")
            served = await pair.accepted.receive()
            nursery.start_soon(_echo, served)
            assert await stream.receive_exactly(5) == b"hello"
            counter.steps = 0  # the writers' first steps (their start) are not the point
            for i in range(200):
                message = b"request %d" % i
                await stream.send_all(message)
                assert await stream.receive_exactly(len(message)) == message
            await stream.send_eof()
            assert await stream.receive_some() == b""
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.steps == 0


async def test_frames_queued_in_one_pass_leave_in_one_write(pair: Pair, nursery: trio.Nursery,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Many streams sending in the same pass: one carrier write carries all their frames, in
    the order they were queued."""
    streams = [await pair.agent.open_stream(b"x") for _ in range(20)]
    served = [await pair.accepted.receive() for _ in streams]
    for s in served:
        assert await s.receive_some() == b"x"
    writes: list[int] = []
    send_nowait = pair.agent._send_nowait

    def counting(parts: list[bytes]) -> bool | None:
        writes.append(len(parts))
        return send_nowait(parts)  # type: ignore[no-any-return]

    monkeypatch.setattr(pair.agent, "_send_nowait", counting)
    async with trio.open_nursery() as senders:
        for i, s in enumerate(streams):
            senders.start_soon(s.send_all, b"%02d" % i)
    assert writes == [40]  # 20 headers and 20 payloads, one write
    for i, s in enumerate(served):
        assert await s.receive_some() == b"%02d" % i


async def test_what_cannot_go_at_once_goes_to_the_writer(pair: Pair, nursery: trio.Nursery) -> None:
    """More than the inline limit (bulk), and sends while the writer holds the carrier: all of
    it arrives, in order, through the writer task."""
    with trio.fail_after(20):
        stream = await pair.agent.open_stream()
        await stream.send_all(b"!")
        served = await pair.accepted.receive()
        got = bytearray()

        async def drain() -> None:
            while data := await served.receive_some():
                got.extend(data)

        nursery.start_soon(drain)
        expected = bytearray(b"!")
        for i in range(50):
            # Alternate big sends (the writer's) with small ones queued right behind them.
            big = bytes([i]) * (100_000 + i)
            await stream.send_all(big)
            await stream.send_all(b"small %d" % i)
            expected += big + b"small %d" % i
        await stream.send_eof()
        while len(got) < len(expected):
            await trio.sleep(0.01)
        assert got == expected


async def test_a_task_woken_by_the_flush_runs_before_the_loop_sleeps(nursery: trio.Nursery, pki: Pki) -> None:
    """``go_away`` waits for its frame to be written.  That frame goes out in the pass-end flush,
    which wakes the waiting task after Trio decided to sleep: the loop must not sleep on it.
    Nothing else happens in this process (the peer's end is never read), so a sleeping loop
    would wait for go_away's own 2 s limit."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client_tcp = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        server_tcp = await listener.accept()
    client, server = await _over(lean(client_tcp), lean(server_tcp), pki)
    agent = MuxSession(client, client=True)
    nursery.start_soon(agent.run)
    await trio.testing.wait_all_tasks_blocked()
    started = trio.current_time()
    await agent.go_away()
    # (A deadline would not show it: the task is already rescheduled when the deadline wakes
    # the loop, so no Cancelled is raised.)
    assert trio.current_time() - started < 0.5
    assert agent._goaway_sent and not agent._outbox
    await agent.aclose()
    await server.aclose()


async def test_a_failing_flush_leaves_the_frames_to_the_writer(pair: Pair, nursery: trio.Nursery,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the pass-end flush must not escape into Trio (which would drop the
    instrument, and every later flush with it): the writer task takes the frames (and meets
    the failure, if the carrier did fail), and later flushes are made as before."""
    stream = await pair.agent.open_stream(b"first")
    served = await pair.accepted.receive()
    assert await served.receive_some() == b"first"
    nursery.start_soon(_echo, served)
    flusher = _mux._pass_end_flush()
    send_nowait = pair.agent._send_nowait
    failures = 0

    def failing_once(parts: list[bytes]) -> bool | None:
        nonlocal failures
        if not failures:
            failures += 1
            raise RuntimeError("flush failed")
        return send_nowait(parts)  # type: ignore[no-any-return]

    monkeypatch.setattr(pair.agent, "_send_nowait", failing_once)
    counter = StepCounter("._writer_task")
    trio.lowlevel.add_instrument(counter)
    try:
        with trio.fail_after(10):
            await stream.send_all(b"second")
            assert await stream.receive_exactly(6) == b"second"  # through the writer
            assert failures == 1 and counter.steps > 0
            counter.steps = 0
            await stream.send_all(b"third")
            assert await stream.receive_exactly(5) == b"third"
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.steps == 0  # the flush again, not the writer
    assert _mux._pass_end_flush() is flusher
