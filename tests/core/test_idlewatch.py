"""The edge's idle-session watcher (``_idlewatch``): a parked reader's heartbeats are answered
without waking it, and everything else — another frame, end of stream, a TLS or protocol
error, a close or cancellation from outside — reaches the reader as if it had read it itself.

A real loopback socket under the server's BulkTLSStream (the watcher reads the descriptor);
the peer writes muxado frames by hand.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import TypeVar

import attrs
import pytest
import trio
import trio.testing

from tunneld.core._idlewatch import IdleWatcher
from tunneld.core._lean import lean
from tunneld.core._mux import MuxSession, MuxStream
from tunneld.core._tls import BulkTLSStream
from tunneld.core.proto import Data, FrameDecoder, GoAway, encode_data

from .test_tls import Pki, _over, _write_pki

HEARTBEAT = 1  # the peer's (client's) first stream id
F = TypeVar("F")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"), "127.0.0.1")


@attrs.define(eq=False)
class Link:
    """A server MuxSession whose reader may park in ``watcher``, and its hand-driven peer."""

    mux: MuxSession
    peer: BulkTLSStream
    peer_tcp: trio.SocketStream
    watcher: IdleWatcher
    streams: trio.MemoryReceiveChannel[MuxStream]
    ended: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None
    _decoder: FrameDecoder = attrs.field(factory=FrameDecoder)
    _frames: list[object] = attrs.field(factory=list)

    async def frame(self, kind: type[F]) -> F:
        """The next frame of ``kind`` the server sent (others are skipped)."""
        with trio.fail_after(10):
            while True:
                while self._frames:
                    frame = self._frames.pop(0)
                    if isinstance(frame, kind):
                        return frame
                data = await self.peer.receive_some()
                assert data, "the server closed the link"
                self._frames += self._decoder.receive_data(data)

    async def heartbeat(self, payload: bytes) -> None:
        await self.peer.send_all(encode_data(HEARTBEAT, payload))
        echo = await self.frame(Data)
        while echo.stream_id != HEARTBEAT:  # what other streams had sent before
            echo = await self.frame(Data)
        assert echo.data == payload

    async def parked(self) -> None:
        with trio.fail_after(10):
            while self.mux.parked_fd is None:
                await trio.sleep(0.001)


async def _link(nursery: trio.Nursery, pki: Pki, watcher: IdleWatcher | None = None,
                peer_transport: trio.abc.Stream | None = None) -> Link:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        peer_tcp = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        server_tcp = lean(await listener.accept())  # as the edge has it
    peer, server = await _over(peer_transport or peer_tcp, server_tcp, pki)
    if watcher is None:
        watcher = IdleWatcher()
        await nursery.start(watcher.run)
    mux = MuxSession(server, client=False)
    mux.idle_watcher = watcher
    send, receive = trio.open_memory_channel[MuxStream](10)

    def on_stream(stream: MuxStream) -> None:
        if stream.id == HEARTBEAT:
            stream.echo(4)
        else:
            send.send_nowait(stream)

    link = Link(mux, peer, peer_tcp, watcher, receive)

    async def run() -> None:
        try:
            await mux.run(on_stream=on_stream)
        except Exception as exc:  # kept for the test to look at
            link.error = exc
        finally:
            link.ended.set()

    nursery.start_soon(run)
    # Open the heartbeat stream (its SYN is the reader's: it is not parked yet), then idle.
    await peer.send_all(encode_data(HEARTBEAT, b"open", syn=True))
    echo = await link.frame(Data)
    assert echo.data == b"open"
    await link.parked()
    return link


@pytest.fixture
async def link(nursery: trio.Nursery, pki: Pki) -> AsyncIterator[Link]:
    link = await _link(nursery, pki)
    yield link
    await link.mux.aclose()


async def _ended(link: Link) -> None:
    with trio.fail_after(10):
        await link.ended.wait()
    assert link.mux.parked_fd is None
    assert link.watcher.parked == 0


async def test_heartbeats_are_answered_without_waking_the_reader(link: Link) -> None:
    handed_back = link.watcher.handed_back
    for i in range(20):
        await link.heartbeat(struct.pack(">I", i))
    assert link.watcher.answered == 20
    assert link.watcher.handed_back == handed_back  # the reader slept through all of them
    assert link.mux.parked_fd is not None
    # The edge's silence watch sees them: the echo stream's clock moved.
    (stream,) = link.mux._streams.values()
    assert stream.last_echo is not None and trio.current_time() - stream.last_echo < 1


async def test_any_other_frame_wakes_the_reader_and_it_parks_again(link: Link) -> None:
    handed_back = link.watcher.handed_back
    await link.peer.send_all(encode_data(3, b"GET / HTTP/1.1\r\n\r\n", syn=True))
    with trio.fail_after(10):
        stream = await link.streams.receive()
    assert await stream.receive_some() == b"GET / HTTP/1.1\r\n\r\n"
    assert link.watcher.handed_back == handed_back + 1
    # Two streams open: the reader reads for itself now, heartbeats included.
    answered = link.watcher.answered
    await link.heartbeat(b"busy")
    assert link.watcher.answered == answered
    await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
    reply = await link.frame(Data)
    assert reply.data == b"HTTP/1.1 204 No Content\r\n\r\n"
    await stream.send_eof()
    await link.peer.send_all(encode_data(3, fin=True))
    await stream.aclose()
    await link.parked()
    await link.heartbeat(b"idle")
    assert link.watcher.answered == answered + 1


async def test_a_frame_after_heartbeats_in_one_read_goes_to_the_reader(link: Link) -> None:
    await link.peer.send_all(encode_data(HEARTBEAT, b"beat") + encode_data(3, b"hello", syn=True))
    with trio.fail_after(10):
        stream = await link.streams.receive()
    assert await stream.receive_some() == b"hello"
    echo = await link.frame(Data)
    assert echo.data == b"beat"
    assert link.watcher.answered == 0


@pytest.mark.parametrize("piece", [1, 7, 40])
async def test_records_split_across_reads_wait_in_the_watcher(nursery: trio.Nursery, pki: Pki,
                                                              piece: int) -> None:
    """The peer's records arrive a few bytes at a time: the watcher keeps the partial record in
    the engine and answers once it is whole; the reader is not woken for the pieces."""
    near, far = trio.testing.memory_stream_pair()
    pumps: list[trio.SocketStream] = []
    pieces = [65536]  # the handshake at full speed; then ``piece`` bytes at a time

    async def to_socket() -> None:
        while data := await far.receive_some():
            size = pieces[0]
            for i in range(0, len(data), size):
                await pumps[0].send_all(data[i:i + size])
                await trio.sleep(0.002)

    async def from_socket() -> None:
        while data := await pumps[0].receive_some():
            await far.send_all(data)

    # The handshake runs over the pumps too: start them before the link needs them.
    started = trio.Event()

    async def pump_when_ready() -> None:
        await started.wait()
        nursery.start_soon(to_socket)
        await from_socket()

    nursery.start_soon(pump_when_ready)
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        pumps.append(await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1]))
        server_tcp = lean(await listener.accept())  # as the edge has it
    started.set()
    watcher = IdleWatcher()
    await nursery.start(watcher.run)
    peer, server = await _over(near, server_tcp, pki)
    mux = MuxSession(server, client=False)
    mux.idle_watcher = watcher
    nursery.start_soon(lambda: mux.run(on_stream=lambda s: s.echo(4)))
    link = Link(mux, peer, pumps[0], watcher, trio.open_memory_channel[MuxStream](0)[1])
    await peer.send_all(encode_data(HEARTBEAT, b"open", syn=True))
    await link.frame(Data)
    await link.parked()
    pieces[0] = piece
    handed_back = watcher.handed_back
    for payload in (b"abcd", b"efgh", b"ijkl"):
        await link.heartbeat(payload)
    assert watcher.answered == 3
    assert watcher.handed_back == handed_back
    await mux.aclose()


async def test_close_notify_while_parked_ends_the_session(link: Link) -> None:
    await link.peer.aclose()
    await _ended(link)
    assert link.error is None
    assert link.mux.close_reason == "peer closed the connection"


async def test_peer_vanishing_while_parked_ends_the_session(link: Link) -> None:
    # A crashed peer's kernel: RST, no close_notify.
    link.peer_tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(link.peer_tcp)
    await _ended(link)
    assert link.error is None
    assert link.mux.close_reason


async def test_a_broken_record_while_parked_breaks_the_carrier(link: Link) -> None:
    # Application data no key decrypts: the engine fails in the watcher, the reader raises it.
    await link.peer_tcp.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    await _ended(link)
    assert link.mux.close_reason is not None and "carrier failed" in link.mux.close_reason


async def test_a_protocol_error_while_parked_is_answered_with_goaway(link: Link) -> None:
    # Frame type 9 does not exist.
    await link.peer.send_all(struct.pack(">II", 9 << 4, 0))
    goaway = await link.frame(GoAway)
    assert goaway.code
    await _ended(link)
    assert link.mux.close_reason == "protocol error: unknown frame type 9"


async def test_closing_a_parked_session_from_outside(link: Link) -> None:
    await link.mux.aclose()
    await _ended(link)
    assert await link.peer.receive_some() == b""


async def test_cancelling_a_parked_reader(nursery: trio.Nursery, pki: Pki) -> None:
    watcher = IdleWatcher()
    await nursery.start(watcher.run)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            link = await _link(inner, pki, watcher)
            assert watcher.parked == 1
            scope.cancel()
    assert watcher.parked == 0
    assert link.mux.parked_fd is None
    # The watcher serves the next session as before.
    other = await _link(nursery, pki, watcher)
    await other.heartbeat(b"next")
    assert watcher.answered == 1
    await other.mux.aclose()


async def test_a_stopping_watcher_hands_its_readers_back(nursery: trio.Nursery, pki: Pki) -> None:
    watcher = IdleWatcher()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(watcher.run)
            link = await _link(nursery, pki, watcher)
            scope.cancel()
    assert link.mux.parked_fd is None
    # The reader answers the heartbeats itself now, and never parks again.
    await link.heartbeat(b"self")
    assert watcher.answered == 0
    assert not link.ended.is_set()
    await link.mux.aclose()

