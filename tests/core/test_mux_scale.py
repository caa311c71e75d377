"""The mux at scale (issue 17): echoing streams without a task, queued openers, many streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tunneld.core import MuxSession, proto
from tunneld.core import _mux as mux_mod
from tunneld.core._errors import RemoteProtocolError

from .test_mux import session_pair


async def echoing(client: MuxSession, server: MuxSession) -> mux_mod.MuxStream:
    """A stream the client opened (one byte, as a heartbeat stream's type) that the server echoes."""
    c = await client.open_stream(b"\0")
    s = await server.accept_stream()
    assert await s.receive_exactly(1) == b"\0"
    s.echo(4)
    return c


async def test_echo_answers_from_the_reader(nursery: trio.Nursery) -> None:
    """Whole units come back at once, a partial one once it is complete; bytes that came with
    the SYN (before ``echo``) are echoed too; no task of ours waits on the stream."""
    client, server = await session_pair(nursery)
    c = await client.open_stream(b"HB\0\0" + b"abcd")
    s = await server.accept_stream()
    assert await s.receive_exactly(4) == b"HB\0\0"
    s.echo(4)
    assert s.last_echo is not None
    with trio.fail_after(5):
        assert await c.receive_exactly(4) == b"abcd"
        await c.send_all(b"12345678")
        assert await c.receive_exactly(8) == b"12345678"
        await c.send_all(b"xy")
        await trio.testing.wait_all_tasks_blocked()
        await c.send_all(b"zw")
        assert await c.receive_exactly(4) == b"xyzw"


async def test_echo_returns_credit_for_a_long_conversation(nursery: trio.Nursery) -> None:
    """More than a window's worth of heartbeats: the echoing side returns credit as it echoes."""
    client, server = await session_pair(nursery)
    c = await echoing(client, server)
    chunk = b"\1\2\3\4" * 4096
    with trio.fail_after(10):
        for _ in range(3 * proto.DEFAULT_WINDOW // len(chunk)):
            await c.send_all(chunk)
            assert await c.receive_exactly(len(chunk)) == chunk


async def test_echo_answers_fin_with_fin(nursery: trio.Nursery) -> None:
    client, server = await session_pair(nursery)
    c = await echoing(client, server)
    with trio.fail_after(5):
        await c.send_all(b"ping")
        await c.send_eof()
        assert await c.receive_exactly(4) == b"ping"
        assert await c.receive_some() == b""
        while server.stream_count:
            await trio.sleep(0.01)


async def test_echo_to_a_peer_that_never_reads_is_bounded(nursery: trio.Nursery) -> None:
    """Echoes the peer's credit does not allow wait, counted as unread: past the session's cap
    (``max_remote_buffered``) the session ends, as for any stream left unread."""
    a, b = trio.testing.memory_stream_pair()
    client = MuxSession(a, client=True)
    server = MuxSession(b, client=False, max_remote_buffered=64 * 1024)
    errors: list[BaseException] = []

    async def run_server(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await server.run(task_status=task_status)
        except* RemoteProtocolError as group:
            errors.extend(group.exceptions)

    await nursery.start(client.run)
    await nursery.start(run_server)
    c = await echoing(client, server)
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        while True:
            await c.send_all(b"\0" * 16384)
    assert "unread" in server.close_reason
    with trio.fail_after(5):
        while not errors:
            await trio.sleep(0.01)
    assert "unread" in str(errors[0])


def test_echo_unit_must_be_positive() -> None:
    a, _b = trio.testing.memory_stream_pair()
    session = MuxSession(a, client=False)
    stream = mux_mod.MuxStream(session, 2, 1024, proto.ReceiveWindow(1024))
    with pytest.raises(ValueError, match="at least 1"):
        stream.echo(0)


async def test_thousands_of_queued_openers_all_get_through(nursery: trio.Nursery) -> None:
    """2,000 openers queued behind ``max_local_streams`` = 50: each freed stream admits the next
    (no refusal, no opener left behind), and the count is kept exactly."""
    client, server = await session_pair(nursery)
    server.max_local_streams = 50
    done = 0

    async def acceptor() -> None:
        while True:
            stream = await client.accept_stream()
            nursery.start_soon(answer, stream)

    async def answer(stream: mux_mod.MuxStream) -> None:
        data = await stream.receive_some()
        await stream.send_all(data)
        await stream.aclose()

    async def opener(i: int) -> None:
        nonlocal done
        stream = await server.open_stream(b"%d" % i)
        assert server.local_stream_count <= 50
        assert await stream.receive_some() == b"%d" % i
        await stream.aclose()
        done += 1

    nursery.start_soon(acceptor)
    with trio.fail_after(30):
        async with trio.open_nursery() as openers:
            for i in range(2000):
                openers.start_soon(opener, i)
    assert done == 2000
    with trio.fail_after(5):
        while server.local_stream_count:
            await trio.sleep(0.01)


async def test_more_than_8192_concurrent_streams(nursery: trio.Nursery) -> None:
    """The agent's side accepts 10,000 streams open at once (8,191 was the limit before: each
    further public connection failed with STREAM_REFUSED)."""
    client, server = await session_pair(nursery)
    n = 10_000
    assert mux_mod.MAX_REMOTE_STREAMS > n
    opened = [await server.open_stream(b"x") for _ in range(n)]
    accepted = []
    with trio.fail_after(30):
        while len(accepted) < n:
            accepted.append(await client.accept_stream())
    assert client.remote_stream_count == n and server.local_stream_count == n
    # Every one of them works (none was refused behind our back).
    await opened[-1].send_all(b"y")
    assert await accepted[-1].receive_exactly(2) == b"xy"
    for stream in opened + accepted:
        await stream.aclose()
