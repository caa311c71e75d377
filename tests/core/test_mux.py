"""MuxSession / MuxStream over in-memory carriers (no sockets)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from functools import partial

import pytest
import trio
import trio.testing

from tunneld.core import PrefixedStream, _lean, proto
from tunneld.core._forward import forward
from tunneld.core._mux import MuxSession, MuxStream, StreamReset
from tunneld.core.proto import Data, ErrorCode, FrameDecoder, GoAway, RemoteProtocolError

MiB = 1024 * 1024

PairMaker = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


async def session_pair(
    nursery: trio.Nursery, make: PairMaker = trio.testing.memory_stream_pair, window: int | None = None
) -> tuple[MuxSession, MuxSession]:
    """A connected (client, server) pair, both running in ``nursery``."""
    a, b = make()
    client = MuxSession(a, client=True)
    server = MuxSession(b, client=False)
    if window is not None:
        client.set_window(window)
        server.set_window(window)
    await nursery.start(client.run)
    await nursery.start(server.run)
    return client, server


async def stream_pair(
    client: MuxSession, server: MuxSession, initial: bytes = b"\0"
) -> tuple[MuxStream, MuxStream]:
    """Open a stream from ``client`` and accept it on ``server`` (``initial`` is consumed)."""
    c = await client.open_stream(initial)
    s = await server.accept_stream()
    assert await s.receive_exactly(len(initial)) == initial
    return c, s


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    async for chunk in stream:
        parts.append(chunk)
    return b"".join(parts)


async def send_all_in_chunks(stream: trio.abc.SendStream, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        await stream.send_all(data[i : i + size])


def leaves(group: BaseExceptionGroup) -> list:
    out = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def read_frames(wire: bytes) -> list:
    return FrameDecoder().receive_data(wire)


async def read_until_eof(raw: trio.abc.ReceiveStream) -> bytes:
    buf = bytearray()
    while chunk := await raw.receive_some():
        buf += chunk
    return bytes(buf)


# ---- basics -------------------------------------------------------------------------------


async def test_open_stream_initial_bytes_travel_in_the_syn_frame() -> None:
    """The initial bytes are the payload of the SYN frame itself (Go reads the type in one Read)."""
    with trio.fail_after(5):
        a, raw = trio.testing.memory_stream_pair()
        client = MuxSession(a, client=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            stream = await client.open_stream(b"\x00\x00\x00\x01type")
            frames = read_frames(await raw.receive_some())
            assert frames == [Data(3, b"\x00\x00\x00\x01type", True, False)]
            second = await client.open_stream(b"x")
            assert second.id == 5
            assert read_frames(await raw.receive_some()) == [Data(5, b"x", True, False)]
            # later writes carry no SYN
            await stream.send_all(b"more")
            assert read_frames(await raw.receive_some()) == [Data(3, b"more", False, False)]
            nursery.cancel_scope.cancel()


async def test_open_and_accept_with_initial_bytes(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c = await client.open_stream(b"hello")
        s = await server.accept_stream()
        assert s.id == c.id == 3
        assert await s.receive_some() == b"hello"
        # and the server opens even-numbered streams the other way
        s2 = await server.open_stream(b"from edge")
        c2 = await client.accept_stream()
        assert c2.id == s2.id == 2
        assert await c2.receive_some() == b"from edge"


async def test_data_both_ways(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await c.send_all(b"ping")
        assert await s.receive_some() == b"ping"
        await s.send_all(bytearray(b"pong"))
        assert await c.receive_some() == b"pong"
        await c.send_all(memoryview(b"abcdef"))
        assert await s.receive_exactly(6) == b"abcdef"


async def test_data_both_ways_over_lockstep_carrier(nursery: trio.Nursery) -> None:
    """An unbuffered carrier: the writer blocks in every carrier write, nothing deadlocks."""
    with trio.fail_after(10):
        client, server = await session_pair(nursery, trio.testing.lockstep_stream_pair)
        c, s = await stream_pair(client, server)
        up = os.urandom(300_000)
        down = os.urandom(200_000)

        async def sender(stream: MuxStream, data: bytes) -> None:
            await send_all_in_chunks(stream, data, 7000)
            await stream.send_eof()

        got: dict[str, bytes] = {}

        async def receiver(stream: MuxStream, key: str) -> None:
            got[key] = await read_all(stream)

        async with trio.open_nursery() as inner:
            inner.start_soon(sender, c, up)
            inner.start_soon(sender, s, down)
            inner.start_soon(receiver, s, "up")
            inner.start_soon(receiver, c, "down")
        assert got == {"up": up, "down": down}


# ---- flow control --------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 4 * MiB])
async def test_large_transfer(nursery: trio.Nursery, window: int | None) -> None:
    with trio.fail_after(10):
        client, server = await session_pair(nursery, window=window)
        c, s = await stream_pair(client, server)
        payload = os.urandom(3 * MiB)
        got = []

        async def sender() -> None:
            await c.send_all(payload)  # one call: the stream itself splits by credit and frame size
            await c.send_eof()

        async def receiver() -> None:
            got.append(await read_all(s))

        async with trio.open_nursery() as inner:
            inner.start_soon(sender)
            inner.start_soon(receiver)
        assert got[0] == payload


async def test_receive_parts_hands_out_frames_unjoined(nursery: trio.Nursery) -> None:
    """receive_parts returns the frames as they came, bounded by max_bytes, returns credit for
    what it handed out, and ends with an empty list."""
    with trio.fail_after(10):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        pieces = [os.urandom(n) for n in (1000, 70_000, 5, 100_000)]  # within one window
        for piece in pieces:
            await c.send_all(piece)  # one DATA frame each (all under MAX_DATA_FRAME)
        await c.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert await s.receive_parts(71_000) == pieces[:2]  # whole frames up to the bound
        # Whole frames only after the first; a first frame over the bound is split.
        assert await s.receive_parts(60_000) == [pieces[2]]
        assert await s.receive_parts(60_000) == [pieces[3][:60_000]]
        assert await s.receive_parts(1 << 20) == [pieces[3][60_000:]]
        assert await s.receive_parts(1 << 20) == []
        # Everything handed out was credited back: nothing counts as buffered any more.
        assert s._window.buffered == 0
        with pytest.raises(ValueError):
            await s.receive_parts(0)


class _PartsSink(trio.abc.HalfCloseableStream):
    """Records how a relay sent to it: joined bytes (``send_all``) or pieces (``send_all_parts``)."""

    def __init__(self) -> None:
        self.sent: list[bytes | list[bytes]] = []
        self.eof = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    async def send_all_parts(self, parts: list[bytes]) -> None:
        self.sent.append(list(parts))

    async def send_eof(self) -> None:
        self.eof = True

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""  # nothing the other way

    async def aclose(self) -> None:
        pass


async def test_a_prefixed_mux_stream_relays_its_frames_unjoined(nursery: trio.Nursery) -> None:
    """The agent hands tunnel types its mux streams behind a PrefixedStream (the bytes after the
    proxy header): ``forward`` still gets the frames as they came, so a bulk relay copies none."""
    with trio.fail_after(10):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        pieces = [os.urandom(n) for n in (1000, 70_000, 5)]
        for piece in pieces:
            await c.send_all(piece)
        await c.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        prefixed = PrefixedStream(s, b"leftover")
        assert await prefixed.receive_parts(3) == [b"lef"]  # the prefix first, bounded
        sink = _PartsSink()
        await forward(prefixed, sink)
        assert sink.sent == [[b"tover"], pieces] and sink.eof
        # Over a stream without receive_parts: one piece per call, then an empty list.
        inner = trio.testing.MemoryReceiveStream()
        inner.put_data(b"data")
        inner.put_eof()
        other = PrefixedStream(inner, b"pre")
        assert [await other.receive_parts(100) for _ in range(3)] == [[b"pre"], [b"data"], []]
        # No reference cycle per stream: it is freed as soon as it is dropped.
        ref = weakref.ref(PrefixedStream(s, b""))
        assert ref() is None


@pytest.mark.parametrize("window", [None, 4 * MiB])
async def test_sender_stops_at_the_window_and_resumes(nursery: trio.Nursery, window: int | None) -> None:
    expected_window = window or proto.DEFAULT_WINDOW
    with trio.fail_after(10):
        client, server = await session_pair(nursery, window=window)
        c, s = await stream_pair(client, server)
        payload = os.urandom(expected_window + MiB)
        sent = trio.Event()

        async def sender() -> None:
            await c.send_all(payload)
            sent.set()

        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        # The sender is blocked on credit, having sent exactly one window.
        assert not sent.is_set()
        assert c._credit == 0
        assert s._window.buffered + s._window.unacked == expected_window
        got = bytearray()
        while len(got) < len(payload):
            got += await s.receive_some(100_000)
        assert got == payload
        await sent.wait()


async def test_wait_send_all_might_not_block_waits_for_credit(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await c.send_all(b"x" * c._credit)  # all the credit the peer granted
        woke = trio.Event()

        async def waiter() -> None:
            await c.wait_send_all_might_not_block()
            woke.set()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        await s.receive_exactly(proto.DEFAULT_WINDOW // 4)  # crosses the WNDINC threshold
        await woke.wait()


# ---- half-close, reset, conformance ---------------------------------------------------------


async def test_half_close(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await c.send_all(b"request")
        await c.send_eof()
        assert await s.receive_some() == b"request"
        assert await s.receive_some() == b""
        assert s.eof_received
        with pytest.raises(trio.ClosedResourceError):
            await c.send_all(b"more")
        # the other direction still works, repeatedly
        for i in range(3):
            await s.send_all(b"response %d" % i)
            assert await c.receive_some() == b"response %d" % i
        await s.send_eof()
        assert await c.receive_some() == b""
        await trio.testing.wait_all_tasks_blocked()
        # both directions finished: both sessions forgot the stream
        assert client.stream_count == server.stream_count == 0


async def test_bare_fin_opens_and_closes_a_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c = await client.open_stream()
        await c.send_eof()  # SYN|FIN with no payload
        s = await server.accept_stream()
        assert await s.receive_some() == b""
        await s.send_all(b"still open this way")
        assert await c.receive_some() == b"still open this way"


async def test_check_half_closeable_stream(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    # trio's checker wants every call to yield; the streams yield on every call with
    # YIELD_EVERY = 1 (the bounded skipping is tested in test_lean.py).
    monkeypatch.setattr(_lean, "YIELD_EVERY", 1)

    async def make_pair() -> tuple[MuxStream, MuxStream]:
        client, server = await session_pair(nursery)
        return await stream_pair(client, server)

    async def make_clogged_pair() -> tuple[MuxStream, MuxStream]:
        # Fill both send windows: send_all now blocks until the peer reads (check_two_way_stream
        # also uses the flipped pair).
        c, s = await make_pair()
        await c.send_all(b"\0" * c._credit)
        await s.send_all(b"\0" * s._credit)
        await trio.testing.wait_all_tasks_blocked()
        assert c._credit == s._credit == 0
        return c, s

    with trio.fail_after(20):
        await trio.testing.check_half_closeable_stream(make_pair, make_clogged_pair)


async def test_receive_some_validates_max_bytes(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await c.send_all(b"data")
        await trio.testing.wait_all_tasks_blocked()
        # With data buffered, max_bytes=0 must not return b"" (which reads as EOF).
        with pytest.raises(ValueError):
            await s.receive_some(0)
        with pytest.raises(ValueError):
            await s.receive_some(-5)
        with pytest.raises(TypeError):
            await s.receive_some(1.5)  # type: ignore[arg-type]
        assert await s.receive_some(2) == b"da"
        assert await s.receive_some() == b"ta"


async def test_close_with_unread_data_unblocks_a_sender_waiting_for_credit(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)

        async def closer() -> None:
            await trio.testing.wait_all_tasks_blocked()
            assert c._credit == 0  # the client is blocked on credit the unread bytes hold
            await s.aclose()

        nursery.start_soon(closer)
        with pytest.raises(trio.BrokenResourceError):
            await c.send_all(b"x" * (2 * proto.DEFAULT_WINDOW))
        # what the server sent before closing is still delivered, then EOF
        assert await c.receive_some() == b""


async def test_close_after_reading_everything_is_graceful(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await s.send_all(b"bye")
        await s.aclose()
        assert await c.receive_some() == b"bye"
        assert await c.receive_some() == b""
        await trio.testing.wait_all_tasks_blocked()
        await c.send_eof()  # no RST came back: the client may still finish normally
        assert client.stream_count == 0


async def test_close_now_is_aclose_without_the_checkpoint(nursery: trio.Nursery) -> None:
    """What a handler's last step uses: the same FIN (or RST over unread data) as aclose, with
    no scheduler pass of its own."""
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await s.send_all(b"bye")
        with trio.testing.assert_no_checkpoints():
            assert _lean.close_now(s)
            s.close_now()  # again: nothing more happens
        assert await c.receive_some() == b"bye"
        assert await c.receive_some() == b""
        await c.aclose()
        # Unread data when it closes: the peer's stream is reset, as by aclose.
        c, s = await stream_pair(client, server)
        await c.send_all(b"unread")
        await trio.testing.wait_all_tasks_blocked()
        s.close_now()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                await c.send_all(b"x")
                await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        assert server.stream_count == 0


async def test_reset_reaches_the_peer_as_stream_reset(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        receiving = trio.Event()

        async def blocked_receive() -> None:
            receiving.set()
            with pytest.raises(StreamReset) as info:
                await s.receive_some()
            assert info.value.code == ErrorCode.STREAM_CANCELLED

        async with trio.open_nursery() as inner:
            inner.start_soon(blocked_receive)
            await receiving.wait()
            await trio.testing.wait_all_tasks_blocked()
            c.reset()
        assert isinstance(StreamReset(0), trio.BrokenResourceError)
        with pytest.raises(StreamReset):
            await s.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await s.receive_some()
        # locally, a reset stream is closed
        with pytest.raises(trio.ClosedResourceError):
            await c.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await c.receive_some()
        assert client.stream_count == server.stream_count == 0
        # the session itself carries on
        c2, s2 = await stream_pair(client, server, b"next")
        await c2.send_all(b"ok")
        assert await s2.receive_some() == b"ok"


async def test_reset_with_code(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        s.reset(ErrorCode.STREAM_REFUSED)
        with pytest.raises(StreamReset) as info:
            await c.receive_some()
        assert info.value.code == ErrorCode.STREAM_REFUSED


async def test_data_for_a_closed_stream_is_answered_with_rst(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await s.aclose()  # FIN to the client; the server forgets the stream
        assert await c.receive_some() == b""
        with pytest.raises(StreamReset) as info:
            while True:
                await c.send_all(b"x" * 100)
                await trio.testing.wait_all_tasks_blocked()
        assert info.value.code == ErrorCode.STREAM_CLOSED


# ---- session death --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
async def test_carrier_death_breaks_every_stream(side: str) -> None:
    with trio.fail_after(5):
        a, b = trio.testing.memory_stream_pair()
        client = MuxSession(a, client=True)
        server = MuxSession(b, client=False)
        async with trio.open_nursery() as nursery:
            # run() returns normally on carrier EOF/close
            await nursery.start(client.run)
            await nursery.start(server.run)
            pairs = [await stream_pair(client, server) for _ in range(3)]
            # one stream has data waiting, one is half-closed
            await pairs[1][0].send_all(b"unread")
            await pairs[2][1].send_eof()
            await trio.testing.wait_all_tasks_blocked()

            async def blocked_receive(stream: MuxStream) -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()

            nursery.start_soon(blocked_receive, pairs[0][0])
            nursery.start_soon(blocked_receive, pairs[0][1])
            await trio.testing.wait_all_tasks_blocked()
            await (a if side == "client" else b).aclose()
            with trio.fail_after(1):
                await client.closed.wait()
                await server.closed.wait()

        assert client.is_closed and server.is_closed
        for stream in [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1], pairs[2][0]]:
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):  # it had sent its FIN
            await pairs[2][1].send_all(b"x")
        # the half-closed stream had seen its EOF; the other direction is broken
        assert await pairs[2][0].receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await pairs[2][1].receive_some()
        for c, _s in pairs[:2]:
            with pytest.raises(trio.BrokenResourceError):
                await c.receive_some()
        # data that arrived before the carrier died is still delivered, then the break
        assert await pairs[1][1].receive_some() == b"unread"
        with pytest.raises(trio.BrokenResourceError):
            await pairs[1][1].receive_some()
        for session in (client, server):
            with pytest.raises(trio.EndOfChannel):
                await session.accept_stream()
            with pytest.raises(trio.BrokenResourceError):
                await session.open_stream(b"x")


async def test_streams_go_to_on_stream_and_the_writer_runs_in_the_given_nursery() -> None:
    """``run(on_stream=..., nursery=...)``: the reader hands each new stream to the callback (none
    is queued for accept_stream), the writer is a task of the given nursery, and it ends soon
    after run() returns, so that nursery closes by itself."""
    with trio.fail_after(5):
        a, b = trio.testing.memory_stream_pair()
        client = MuxSession(a, client=True)
        server = MuxSession(b, client=False)
        got: list[MuxStream] = []

        async def handle(stream: MuxStream) -> None:
            got.append(stream)
            await stream.send_all((await stream.receive_some()).upper())
            await stream.send_eof()

        async with trio.open_nursery() as outer:
            await outer.start(client.run)
            async with trio.open_nursery() as session:

                async def serve() -> None:
                    await server.run(on_stream=lambda stream: session.start_soon(handle, stream),
                                     nursery=session)

                session.start_soon(serve)
                await trio.testing.wait_all_tasks_blocked()
                names = sorted(t.name.rsplit(".", 1)[-1] for t in session.child_tasks)
                assert names == ["_writer_task", "serve"]
                for word in (b"one", b"two"):
                    stream = await client.open_stream(word)
                    assert await read_all(stream) == word.upper()
                assert [s.id for s in got] == [3, 5]
                assert server._accept_send is None  # no queue was made
                await client.aclose()
            # The session nursery closed without being cancelled: the writer saw the end.
            assert not session.cancel_scope.cancel_called
        assert server.is_closed


async def test_a_protocol_error_with_a_given_nursery_still_sends_goaway() -> None:
    with trio.fail_after(5):
        a, b = trio.testing.memory_stream_pair()
        server = MuxSession(b, client=False)
        await a.send_all(b"\xff" * 12)  # not a frame
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as session:
                session.start_soon(partial(server.run, nursery=session))
        assert any(isinstance(e, RemoteProtocolError) for e in leaves(caught.value))
        events = FrameDecoder().receive_data(await a.receive_some())
        assert [type(e) for e in events] == [GoAway]


async def test_blocked_accept_ends_with_end_of_channel(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)

        async def closer() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()

        nursery.start_soon(closer)
        with pytest.raises(trio.EndOfChannel):
            await server.accept_stream()


async def test_sender_blocked_on_credit_breaks_when_the_session_dies(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)

        async def closer() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()

        nursery.start_soon(closer)
        with pytest.raises(trio.BrokenResourceError):
            await c.send_all(b"x" * (proto.DEFAULT_WINDOW + 1))


async def test_goaway_from_peer_ends_the_session(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        client, server = await session_pair(nursery)
        c, s = await stream_pair(client, server)
        await server.go_away(ErrorCode.NONE, "maintenance")
        await client.closed.wait()
        assert "peer went away" in client.close_reason
        assert "maintenance" in client.close_reason
        with pytest.raises(trio.BrokenResourceError):
            await c.receive_some()


# ---- misbehaving peers (raw frames) -----------------------------------------------------------


async def run_against_raw_peer(wire: bytes, *, client: bool = False) -> tuple[RemoteProtocolError, list]:
    """Feed ``wire`` to a session; return the error ``run()`` raised and the frames it sent back."""
    with trio.fail_after(5):
        ours, raw = trio.testing.memory_stream_pair()
        session = MuxSession(ours, client=client)
        errors: list[RemoteProtocolError] = []

        async def run() -> None:
            # run()'s reader lives in a nursery, so the error arrives in an ExceptionGroup
            # (callers use except*).
            try:
                await session.run()
            except* RemoteProtocolError as group:
                errors.extend(leaves(group))
            else:
                raise AssertionError("run() returned normally")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await raw.send_all(wire)
            back = await read_until_eof(raw)
        assert session.is_closed
        assert len(errors) == 1
        return errors[0], read_frames(back)


async def test_peer_overrunning_its_credit_is_a_protocol_error() -> None:
    window = proto.DEFAULT_WINDOW
    wire = proto.encode_data(3, b"a" * window, syn=True) + proto.encode_data(3, b"b")
    err, frames = await run_against_raw_peer(wire)
    assert err.code == ErrorCode.FLOW_CONTROL
    assert len(frames) == 1 and isinstance(frames[0], GoAway)
    assert frames[0].code == ErrorCode.FLOW_CONTROL
    assert frames[0].last_stream_id == 3


async def test_peer_overrunning_credit_in_many_small_frames() -> None:
    chunk = b"z" * 1000
    n = proto.DEFAULT_WINDOW // len(chunk) + 1
    wire = proto.encode_data(3, b"", syn=True) + proto.encode_data(3, chunk) * n
    err, frames = await run_against_raw_peer(wire)
    assert err.code == ErrorCode.FLOW_CONTROL
    assert [type(f) for f in frames] == [GoAway]


async def test_peer_may_use_exactly_its_credit(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        ours, raw = trio.testing.memory_stream_pair()
        session = MuxSession(ours, client=False)
        await nursery.start(session.run)
        await raw.send_all(proto.encode_data(3, b"a" * proto.DEFAULT_WINDOW, syn=True))
        stream = await session.accept_stream()
        assert await stream.receive_exactly(proto.DEFAULT_WINDOW // 4) == b"a" * (proto.DEFAULT_WINDOW // 4)
        # credit comes back as a WNDINC, and the peer may then send that much more
        frames = read_frames(await raw.receive_some())
        assert frames == [proto.WindowUpdate(3, proto.DEFAULT_WINDOW // 4)]
        await raw.send_all(proto.encode_data(3, b"b" * (proto.DEFAULT_WINDOW // 4)))
        await trio.testing.wait_all_tasks_blocked()
        assert not session.is_closed


async def test_agreed_window_admits_frames_up_to_the_window(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        ours, raw = trio.testing.memory_stream_pair()
        session = MuxSession(ours, client=False)
        session.set_window(4 * MiB)
        await nursery.start(session.run)
        payload = os.urandom(MiB)  # one frame, four times the default window
        await raw.send_all(proto.encode_data(3, payload, syn=True, fin=True))
        stream = await session.accept_stream()
        assert await read_all(stream) == payload
        assert not session.is_closed


async def test_oversized_frame_is_a_frame_size_error() -> None:
    err, frames = await run_against_raw_peer(proto.data_header(3, proto.DEFAULT_WINDOW + 1, syn=True))
    assert err.code == ErrorCode.FRAME_SIZE
    assert [type(f) for f in frames] == [GoAway]


async def test_garbage_is_a_protocol_error() -> None:
    err, frames = await run_against_raw_peer(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    assert isinstance(err, RemoteProtocolError)
    assert [type(f) for f in frames] == [GoAway]
    assert frames[0].code == err.code


@pytest.mark.parametrize(("client", "sid"), [(False, 2), (True, 3)])
async def test_peer_opening_a_stream_with_our_parity_is_an_error(client: bool, sid: int) -> None:
    err, frames = await run_against_raw_peer(proto.encode_data(sid, b"x", syn=True), client=client)
    assert "parity" in str(err)
    assert [type(f) for f in frames] == [GoAway]


async def test_peer_opening_a_stream_twice_is_an_error() -> None:
    wire = proto.encode_data(3, b"x", syn=True) + proto.encode_data(3, b"y", syn=True)
    err, frames = await run_against_raw_peer(wire)
    assert [type(f) for f in frames] == [GoAway]


async def test_data_after_fin_is_an_error() -> None:
    wire = proto.encode_data(3, b"x", syn=True, fin=True) + proto.encode_data(3, b"y")
    # The stream is still known (we have not half-closed), so this is a protocol error.
    err, frames = await run_against_raw_peer(wire)
    assert [type(f) for f in frames] == [GoAway]


# ---- many streams -----------------------------------------------------------------------------


async def test_many_concurrent_echo_streams(nursery: trio.Nursery) -> None:
    n_streams = 200
    with trio.fail_after(20):
        client, server = await session_pair(nursery)

        async def echo(stream: MuxStream) -> None:
            async for chunk in stream:
                await stream.send_all(chunk)
            await stream.send_eof()

        async def acceptor() -> None:
            async with trio.open_nursery() as handlers:
                for _ in range(n_streams):
                    handlers.start_soon(echo, await server.accept_stream())

        results: dict[int, bool] = {}

        async def one(i: int) -> None:
            payload = os.urandom(1000 + 97 * i)
            stream = await client.open_stream(payload[:10])

            async def send_rest() -> None:
                await send_all_in_chunks(stream, payload[10:], 1500)
                await stream.send_eof()

            async with trio.open_nursery() as inner:
                inner.start_soon(send_rest)
                results[i] = await read_all(stream) == payload

        async with trio.open_nursery() as inner:
            inner.start_soon(acceptor)
            for i in range(n_streams):
                inner.start_soon(one, i)
        assert results == {i: True for i in range(n_streams)}
        await trio.testing.wait_all_tasks_blocked()
        assert client.stream_count == server.stream_count == 0


async def test_max_local_streams_queues_openers(nursery: trio.Nursery) -> None:
    """Past ``max_local_streams`` an opener waits for a stream to end instead of exceeding it."""
    client, server = await session_pair(nursery)
    server.max_local_streams = 3
    opened = [await server.open_stream(b"x") for _ in range(3)]
    accepted = [await client.accept_stream() for _ in range(3)]
    fourth: list[MuxStream] = []

    async def open_fourth() -> None:
        fourth.append(await server.open_stream(b"y"))

    nursery.start_soon(open_fourth)
    await trio.testing.wait_all_tasks_blocked()
    assert not fourth and server.local_stream_count == 3
    # One stream ends both ways (FIN each way): the waiting opener goes ahead.
    await opened[0].send_eof()
    assert await accepted[0].receive_some() == b"x"
    assert await accepted[0].receive_some() == b""
    await accepted[0].send_eof()
    assert await opened[0].receive_some() == b""
    with trio.fail_after(5):
        while not fourth:
            await trio.sleep(0.01)
    assert server.local_stream_count == 3
    # A dying session releases every waiter with an error.
    blocked: list[BaseException] = []

    async def open_fifth() -> None:
        try:
            await server.open_stream(b"z")
        except trio.BrokenResourceError as exc:
            blocked.append(exc)

    nursery.start_soon(open_fifth)
    await trio.testing.wait_all_tasks_blocked()
    await server.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert len(blocked) == 1


async def test_session_closed_while_dispatching_a_burst(nursery: trio.Nursery) -> None:
    """One read carrying 40 new streams: the reader pauses every few streams, and a session
    closed during a pause ends quietly instead of handing frames to a dead session."""
    raw, carrier = trio.testing.memory_stream_pair()
    server = MuxSession(carrier, client=False)
    errors: list[BaseException] = []

    async def run_server() -> None:
        try:
            await server.run()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    nursery.start_soon(run_server)
    await trio.testing.wait_all_tasks_blocked()
    burst = b"".join(proto.encode_data(sid, b"x", syn=True) for sid in range(3, 83, 2))
    await raw.send_all(burst)
    first = await server.accept_stream()
    await server.aclose()  # while the reader is paused between slices
    await trio.testing.wait_all_tasks_blocked()
    assert first.id == 3
    assert errors == []
    assert server.is_closed
