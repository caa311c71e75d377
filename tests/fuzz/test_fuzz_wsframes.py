"""Fuzz tests of the WebSocket carrier's frame reader (tunneld.core.proto._wsframes).

Properties, for raw bytes, valid frame sequences and mutations of them, fed in arbitrary splits:
only RemoteProtocolError escapes; the answer does not depend on the split; payload out never
exceeds input; the reader holds at most a header and a control frame of split input.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunneld.core.proto import RemoteProtocolError
from tunneld.core.proto._wsframes import (
    MAX_CONTROL_PAYLOAD,
    MAX_HEADER,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    close_payload,
    frame_header,
    mask,
)

from ._limits import budget, fuzz_settings, mutate, split

FUZZ = fuzz_settings(200)


Events = list[tuple[int, bytes]]


def read(chunks: list[bytes], masked: bool, max_bytes: int, max_frame: int) -> tuple[Events, str | None]:
    """Feed ``chunks``, checking the per-call invariants; (events, data merged; error or None)."""
    reader = FrameReader(masked=masked, max_frame=max_frame)
    events: list[tuple[int, bytes]] = []
    try:
        for chunk in chunks:
            with budget():
                reader.feed(chunk)
                out = 0
                while (event := reader.next(max_bytes)) is not None:
                    opcode, payload = event
                    assert opcode in (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
                    if opcode == OP_BINARY:
                        assert 0 < len(payload) <= max_bytes
                        out += len(payload)
                        if events and events[-1][0] == OP_BINARY:
                            events[-1] = (OP_BINARY, events[-1][1] + payload)
                            continue
                    else:
                        assert len(payload) <= MAX_CONTROL_PAYLOAD
                    events.append(event)
                assert out <= len(chunk), "more payload than input"
                assert len(reader._partial) <= MAX_HEADER + MAX_CONTROL_PAYLOAD
    except RemoteProtocolError as exc:
        return events, str(exc)
    return events, None


def check(data: bytes, cuts: list[int], masked: bool, max_bytes: int = 1 << 20,
          max_frame: int = 1 << 24) -> None:
    """The split run gives the same answer as the whole run."""
    whole, err = read([data], masked, max_bytes, max_frame)
    pieces, err2 = read(split(data, cuts), masked, max_bytes, max_frame)
    assert err == err2
    if err is None:
        assert pieces == whole


def encode(opcode: int, payload: bytes, fin: bool, key: bytes | None) -> bytes:
    head = bytearray(frame_header(opcode, len(payload), key))
    if not fin:
        head[0] &= 0x7F
    return bytes(head) + (mask(payload, key, 0) if key is not None else payload)


keys = st.binary(min_size=4, max_size=4)


@st.composite
def valid_frames(draw: st.DrawFn, masked: bool) -> tuple[bytes, Events]:
    """A frame or fragmented message, and the events it should read as."""
    key = draw(keys) if masked else None
    kind = draw(st.integers(0, 3))
    if kind == 0:
        payload = draw(st.binary(max_size=300))
        return encode(OP_BINARY, payload, True, key), [(OP_BINARY, payload)] if payload else []
    if kind == 1:  # a fragmented message
        parts = draw(st.lists(st.binary(max_size=40), min_size=2, max_size=4))
        wire = b"".join(encode(OP_BINARY if i == 0 else 0, p, i == len(parts) - 1, key)
                        for i, p in enumerate(parts))
        return wire, [(OP_BINARY, b"".join(parts))] if any(parts) else []
    if kind == 2:
        opcode = draw(st.sampled_from([OP_PING, OP_PONG]))
        payload = draw(st.binary(max_size=125))
        return encode(opcode, payload, True, key), [(opcode, payload)]
    payload = close_payload(draw(st.sampled_from([1000, 1001, 1011, 3000, 4999])), draw(st.text(max_size=20)))
    return encode(OP_CLOSE, payload, True, key), [(OP_CLOSE, payload)]


def merged(events: Events) -> Events:
    out: Events = []
    for event in events:
        if event[0] == OP_BINARY and out and out[-1][0] == OP_BINARY:
            out[-1] = (OP_BINARY, out[-1][1] + event[1])
        else:
            out.append(event)
    return out


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """A header with any bits and a length that may lie, then some bytes."""
    first = draw(st.integers(0, 255))
    second = draw(st.integers(0, 255))
    ext = draw(st.sampled_from([b"", b"\x00\x7d", b"\xff\xff", bytes(8), b"\x00" * 7 + b"\x05",
                                b"\x80" + bytes(7)]))
    return bytes([first, second]) + ext + draw(st.binary(max_size=60))


cuts = st.lists(st.integers(0, 10_000), max_size=20)


@st.composite
def mutated(draw: st.DrawFn, masked: bool) -> bytes:
    """Valid frames with byte flips, insertions, deletions and duplications."""
    frames = draw(st.lists(valid_frames(masked), min_size=1, max_size=6))
    return mutate(draw, bytearray(b"".join(wire for wire, _ in frames)))


@FUZZ
@given(data=st.binary(max_size=2000), cuts=cuts, masked=st.booleans(),
       max_bytes=st.sampled_from([1 << 20, 7, 1]), max_frame=st.sampled_from([1 << 24, 100]))
def test_raw_bytes(data: bytes, cuts: list[int], masked: bool, max_bytes: int, max_frame: int) -> None:
    check(data, cuts, masked, max_bytes, max_frame)


@FUZZ
@given(data=st.lists(raw_frames(), max_size=10).map(b"".join), cuts=cuts, masked=st.booleans())
def test_raw_headers(data: bytes, cuts: list[int], masked: bool) -> None:
    check(data, cuts, masked)


@FUZZ
@given(masked=st.booleans(), data=st.data(), cuts=cuts)
def test_valid_streams_read_back(masked: bool, data: st.DataObject, cuts: list[int]) -> None:
    frames = data.draw(st.lists(valid_frames(masked), max_size=8))
    wire = b"".join(w for w, _ in frames)
    events, err = read(split(wire, cuts), masked, data.draw(st.sampled_from([1 << 20, 5])), 1 << 24)
    want: Events = []
    for i, (_, expected) in enumerate(frames):
        want += expected
        if expected and expected[0][0] == OP_CLOSE:
            # nothing may follow a close frame: the next frame is refused, if there is one
            assert (err is not None) == (i < len(frames) - 1 and bool(frames[i + 1][0])), err
            break
    else:
        assert err is None, err
    assert events == merged(want)


@FUZZ
@given(masked=st.booleans(), data=st.data(), cuts=cuts)
def test_mutated_valid_streams(masked: bool, data: st.DataObject, cuts: list[int]) -> None:
    check(data.draw(mutated(masked)), cuts, masked)
