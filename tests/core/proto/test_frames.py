"""muxado framing (sans-IO): encoders, the streaming FrameDecoder, and ReceiveWindow."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.core import proto
from tunneld.core.proto import (
    FLAG_FIN,
    FLAG_SYN,
    HEADER_SIZE,
    Data,
    ErrorCode,
    FrameDecoder,
    FrameType,
    GoAway,
    ReceiveWindow,
    RemoteProtocolError,
    Reset,
    WindowUpdate,
)

MAX_SID = 0x7FFFFFFF


def raw_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return struct.pack("!II", (length << 8) | (ftype << 4) | flags, sid)


def decode_all(data: bytes, **kw: int) -> list[proto.Data | Reset | WindowUpdate | GoAway]:
    return FrameDecoder(**kw).receive_data(data)


# ---- encoders -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("syn", "fin", "flags"), [(False, False, 0), (True, False, 0x2), (False, True, 0x1), (True, True, 0x3)]
)
def test_data_header_layout_and_round_trip(syn: bool, fin: bool, flags: int) -> None:
    frame = proto.encode_data(7, b"hello", syn=syn, fin=fin)
    assert frame[:HEADER_SIZE] == raw_header(5, FrameType.DATA, flags, 7)
    assert frame[3] == 0x10 | flags  # type in the high nibble, flags in the low one
    assert frame[HEADER_SIZE:] == b"hello"
    assert FLAG_SYN == 0x2 and FLAG_FIN == 0x1
    assert decode_all(frame) == [Data(7, b"hello", syn, fin)]


def test_data_header_alone_matches_encode_data() -> None:
    assert proto.data_header(9, 3, syn=True) + b"abc" == proto.encode_data(9, b"abc", syn=True)


def test_empty_data_frames() -> None:
    assert decode_all(proto.encode_data(3, syn=True)) == [Data(3, b"", True, False)]
    assert decode_all(proto.encode_data(3, fin=True)) == [Data(3, b"", False, True)]
    assert decode_all(proto.encode_data(3)) == [Data(3, b"", False, False)]


def test_rst_round_trip() -> None:
    frame = proto.encode_rst(5, ErrorCode.STREAM_CANCELLED)
    assert frame == raw_header(4, FrameType.RST, 0, 5) + struct.pack("!I", 6)
    assert decode_all(frame) == [Reset(5, ErrorCode.STREAM_CANCELLED)]


def test_wndinc_round_trip() -> None:
    frame = proto.encode_wndinc(4, 65536)
    assert frame == raw_header(4, FrameType.WNDINC, 0, 4) + struct.pack("!I", 65536)
    assert decode_all(frame) == [WindowUpdate(4, 65536)]


@pytest.mark.parametrize("inc", [0, -1, MAX_SID + 1])
def test_wndinc_encoder_refuses_out_of_range(inc: int) -> None:
    with pytest.raises(ValueError):
        proto.encode_wndinc(3, inc)


@pytest.mark.parametrize("debug", [b"", b"bye", b"x" * 1000])
def test_goaway_round_trip_and_length(debug: bytes) -> None:
    frame = proto.encode_goaway(11, ErrorCode.PROTOCOL, debug)
    assert frame[:HEADER_SIZE] == raw_header(8 + len(debug), FrameType.GOAWAY, 0, 0)
    assert int.from_bytes(frame[:3], "big") == 8 + len(debug)
    assert decode_all(frame) == [GoAway(11, ErrorCode.PROTOCOL, debug)]


def test_short_goaway_is_tolerated_and_terminal() -> None:
    # A Rust peer may write a GOAWAY whose length omits the 8 fixed bytes.
    frame = raw_header(0, FrameType.GOAWAY, 0, 0)
    dec = FrameDecoder()
    assert dec.receive_data(frame + proto.encode_data(3, b"late")) == [GoAway(0, ErrorCode.NONE, b"")]
    assert dec.closed


def test_stream_id_high_bit_is_masked() -> None:
    data = raw_header(2, FrameType.DATA, FLAG_SYN, 0x80000000 | 5) + b"hi"
    rst = raw_header(4, FrameType.RST, 0, 0x80000000 | 7) + struct.pack("!I", 1)
    inc = raw_header(4, FrameType.WNDINC, 0, 0xFFFFFFFF) + struct.pack("!I", 0x80000010)
    assert decode_all(data + rst + inc) == [
        Data(5, b"hi", True, False),
        Reset(7, 1),
        WindowUpdate(MAX_SID, 16),
    ]
    # and the encoders never set it
    assert proto.encode_data(0x80000000 | 5, b"")[4:8] == struct.pack("!I", 5)


# ---- decoder errors -----------------------------------------------------------------------


def test_oversized_data_frame_is_frame_size_error() -> None:
    dec = FrameDecoder(max_data_frame=1024)
    # Rejected from the header alone, before any payload is buffered.
    with pytest.raises(RemoteProtocolError) as info:
        dec.receive_data(proto.data_header(3, 1025, syn=True))
    assert info.value.code == ErrorCode.FRAME_SIZE
    ok = proto.encode_data(3, b"x" * 1024)
    assert decode_all(ok, max_data_frame=1024) == [Data(3, b"x" * 1024, False, False)]


def test_oversized_control_frame_is_frame_size_error() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(raw_header(0xFFFFFF, FrameType.GOAWAY, 0, 0))
    assert info.value.code == ErrorCode.FRAME_SIZE


def test_wndinc_of_zero_is_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(raw_header(4, FrameType.WNDINC, 0, 3) + struct.pack("!I", 0))
    assert info.value.code == ErrorCode.PROTOCOL
    # the reserved high bit alone is still zero
    with pytest.raises(RemoteProtocolError):
        decode_all(raw_header(4, FrameType.WNDINC, 0, 3) + struct.pack("!I", 0x80000000))


@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_rst_with_wrong_length_is_protocol_error(length: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(raw_header(length, FrameType.RST, 0, 3) + b"\0" * length)
    assert info.value.code == ErrorCode.PROTOCOL


@pytest.mark.parametrize("length", [0, 2, 8])
def test_wndinc_with_wrong_length_is_protocol_error(length: int) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_all(raw_header(length, FrameType.WNDINC, 0, 3) + b"\1" * length)


def test_control_frames_on_stream_zero_are_protocol_errors() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_all(raw_header(4, FrameType.RST, 0, 0) + struct.pack("!I", 1))
    with pytest.raises(RemoteProtocolError):
        decode_all(raw_header(4, FrameType.WNDINC, 0, 0) + struct.pack("!I", 1))


@pytest.mark.parametrize("payload", [b"", b"abc"])
def test_data_on_stream_zero_is_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(raw_header(len(payload), FrameType.DATA, 0, 0) + payload)
    assert info.value.code == ErrorCode.PROTOCOL


@pytest.mark.parametrize("ftype", [4, 7, 0xF])
def test_unknown_frame_type_is_protocol_error(ftype: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(raw_header(4, ftype, 0, 3) + b"abcd")
    assert info.value.code == ErrorCode.PROTOCOL


def test_unknown_frame_type_split_across_reads_is_still_an_error() -> None:
    dec = FrameDecoder()
    frame = raw_header(4, 5, 0, 3) + b"abcd"
    with pytest.raises(RemoteProtocolError):
        for i in range(len(frame)):
            dec.receive_data(frame[i : i + 1])


def test_bytes_after_goaway_are_ignored() -> None:
    dec = FrameDecoder()
    before = proto.encode_data(3, b"a", syn=True)
    after = proto.encode_data(3, b"b") + b"\xff" * 32  # garbage that would otherwise be an error
    events = dec.receive_data(before + proto.encode_goaway(3, ErrorCode.NONE, b"dbg") + after)
    assert events == [Data(3, b"a", True, False), GoAway(3, ErrorCode.NONE, b"dbg")]
    assert dec.closed
    assert dec.receive_data(after) == []
    assert dec.receive_data(b"\xff" * 100) == []


def test_large_data_frame_is_streamed_in_pieces() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    frame = proto.encode_data(3, payload, syn=True, fin=True)
    dec = FrameDecoder()
    events = []
    for i in range(0, len(frame), 10000):
        events += dec.receive_data(frame[i : i + 10000])
    assert len(events) > 1
    assert all(isinstance(e, Data) and e.stream_id == 3 for e in events)
    assert all(e.data for e in events)  # no empty pieces
    assert [e.syn for e in events] == [True] + [False] * (len(events) - 1)
    assert [e.fin for e in events] == [False] * (len(events) - 1) + [True]
    assert b"".join(e.data for e in events) == payload



def test_a_borrowed_buffer_is_never_handed_up() -> None:
    """Fed a view of a buffer its owner reuses (the TLS staging buffer), the decoder hands up
    copies: overwriting the buffer afterwards changes no decoded payload or partial header."""
    frames = proto.encode_data(3, b"A" * 1000) + proto.encode_data(5, b"B" * 10) + proto.encode_wndinc(3, 7)
    buf = bytearray(frames + proto.encode_data(7, b"C" * 50)[:5])  # ends inside a header
    dec = FrameDecoder()
    with memoryview(buf) as view:
        events = dec.receive_data(view)
    buf[:] = b"\xff" * len(buf)  # the owner reuses its buffer
    events += dec.receive_data(proto.encode_data(7, b"C" * 50)[5:])
    assert all(type(e.data) is bytes for e in events if isinstance(e, Data))
    assert [(e.stream_id, e.data) for e in events if isinstance(e, Data)] == [
        (3, b"A" * 1000), (5, b"B" * 10), (7, b"C" * 50)]
    assert WindowUpdate(3, 7) in events

# ---- property: any framing of any frame sequence decodes to the same content -------------

sids = st.integers(1, MAX_SID)
u32 = st.integers(0, 0xFFFFFFFF)
data_frames = st.builds(
    Data, stream_id=st.integers(1, 9), data=st.binary(max_size=300), syn=st.booleans(), fin=st.booleans()
)
control_frames = st.one_of(
    st.builds(Reset, stream_id=sids, code=u32),
    st.builds(WindowUpdate, stream_id=sids, increment=st.integers(1, MAX_SID)),
)
goaways = st.builds(GoAway, last_stream_id=st.integers(0, MAX_SID), code=u32, debug=st.binary(max_size=50))


def encode(frame: Data | Reset | WindowUpdate | GoAway) -> bytes:
    if isinstance(frame, Data):
        return proto.encode_data(frame.stream_id, frame.data, syn=frame.syn, fin=frame.fin)
    if isinstance(frame, Reset):
        return proto.encode_rst(frame.stream_id, frame.code)
    if isinstance(frame, WindowUpdate):
        return proto.encode_wndinc(frame.stream_id, frame.increment)
    return proto.encode_goaway(frame.last_stream_id, frame.code, frame.debug)


def normalize(events: list) -> list:
    """Merge DATA pieces that may belong to one frame: same stream, no FIN before, no SYN after."""
    out: list = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            isinstance(ev, Data)
            and isinstance(prev, Data)
            and prev.stream_id == ev.stream_id
            and not prev.fin
            and not ev.syn
        ):
            out[-1] = Data(ev.stream_id, prev.data + ev.data, prev.syn, ev.fin)
        else:
            out.append(ev)
    return out


def per_stream(events: list) -> dict[int, bytes]:
    streams: dict[int, bytes] = {}
    for ev in events:
        if isinstance(ev, Data):
            streams[ev.stream_id] = streams.get(ev.stream_id, b"") + ev.data
    return streams


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.one_of(data_frames, control_frames), max_size=20),
    goaway=st.none() | goaways,
    trailing=st.binary(max_size=20),
    data=st.data(),
)
def test_random_frames_survive_random_splitting(
    frames: list[Data | Reset | WindowUpdate], goaway: GoAway | None, trailing: bytes, data: st.DataObject
) -> None:
    expected = list(frames) + ([goaway] if goaway is not None else [])
    wire = b"".join(encode(f) for f in expected)
    if goaway is not None:
        wire += trailing  # ignored after GOAWAY, whatever it is

    one_byte = data.draw(st.booleans(), label="one byte at a time")
    dec = FrameDecoder()
    events: list = []
    pos = 0
    while pos < len(wire):
        size = 1 if one_byte else data.draw(st.integers(1, max(1, len(wire) - pos)), label="piece")
        piece = wire[pos : pos + size]
        events += dec.receive_data(piece)
        pos += size

    for ev in events:
        if isinstance(ev, Data):
            assert type(ev.data) is bytes
    assert normalize(events) == normalize(expected)
    assert per_stream(events) == per_stream(expected)
    assert dec.closed == (goaway is not None)
    # Only zero-length frames give empty DATA events; pieces of longer frames are never empty.
    assert [e for e in events if isinstance(e, Data) and not e.data] == [
        f for f in expected if isinstance(f, Data) and not f.data
    ]


@given(frames=st.lists(st.one_of(data_frames, control_frames), max_size=10))
def test_one_byte_at_a_time_gives_one_event_per_control_frame_and_byte(
    frames: list[Data | Reset | WindowUpdate],
) -> None:
    wire = b"".join(encode(f) for f in frames)
    dec = FrameDecoder()
    events: list = []
    for i in range(len(wire)):
        events += dec.receive_data(wire[i : i + 1])
    expected_count = sum(max(1, len(f.data)) if isinstance(f, Data) else 1 for f in frames)
    assert len(events) == expected_count
    assert normalize(events) == normalize(frames)


# ---- ReceiveWindow -----------------------------------------------------------------------


def test_receive_window_overflow_is_flow_control_error() -> None:
    win = ReceiveWindow(1000)
    win.on_data(600)
    win.on_data(400)  # exactly full is fine
    with pytest.raises(RemoteProtocolError) as info:
        win.on_data(1)
    assert info.value.code == ErrorCode.FLOW_CONTROL


def test_receive_window_counts_unacked_bytes_against_the_peer() -> None:
    win = ReceiveWindow(1000)
    win.on_data(1000)
    assert win.on_consumed(200) == 0  # below a quarter: credit not yet returned
    with pytest.raises(RemoteProtocolError):
        win.on_data(1)  # the peer has no credit for these 200 bytes yet


def test_receive_window_returns_credit_in_quarter_steps() -> None:
    win = ReceiveWindow(1000)
    win.on_data(1000)
    got = [win.on_consumed(100) for _ in range(10)]
    assert got == [0, 0, 300, 0, 0, 300, 0, 0, 300, 0]
    assert win.buffered == 0 and win.unacked == 100
    # The returned credit may be used again; exactly the returned amount, no more.
    win.on_data(900)
    with pytest.raises(RemoteProtocolError):
        win.on_data(1)


def test_receive_window_default_is_muxado_window() -> None:
    win = ReceiveWindow()
    assert win.size == proto.DEFAULT_WINDOW == 256 * 1024
    win.on_data(win.size)
    assert win.on_consumed(64 * 1024 - 1) == 0
    assert win.on_consumed(1) == 64 * 1024


def test_receive_window_single_large_read_returns_everything() -> None:
    win = ReceiveWindow(1000)
    win.on_data(1000)
    assert win.on_consumed(1000) == 1000
    win.on_data(1000)
