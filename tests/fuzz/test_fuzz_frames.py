"""Fuzz tests of the muxado frame decoder (tunneld.core.proto._frames); the long run is bench/fuzz.py.

Properties, for raw bytes, valid frame sequences and mutations of them, fed in arbitrary splits:
only RemoteProtocolError escapes; the answer does not depend on the split; every call makes
progress (at most one event per input byte, never more payload than input) and answers within
the time budget; the decoder never holds more than one control frame + header of partial data.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.core.proto import RemoteProtocolError
from tunneld.core.proto._frames import (
    HEADER_SIZE,
    MAX_CONTROL_FRAME,
    Data,
    FrameDecoder,
    GoAway,
    Reset,
    WindowUpdate,
    encode_data,
    encode_goaway,
    encode_rst,
    encode_wndinc,
)

from ._limits import budget, fuzz_settings, mutate, split

FUZZ = fuzz_settings(200)


def canonical(events: list[Any]) -> list[Any]:
    """Merge the DATA pieces of one frame so that differently split runs compare equal."""
    out: list[Any] = []
    for e in events:
        if isinstance(e, Data):
            if out and isinstance(out[-1], tuple):
                sid, data, syn, fin = out[-1]
                if sid == e.stream_id and not fin and not e.syn:
                    out[-1] = (sid, data + e.data, syn, e.fin)
                    continue
            out.append((e.stream_id, e.data, e.syn, e.fin))
        else:
            out.append(e)
    return out


def decode(chunks: list[bytes], max_data: int = 0xFFFFFF) -> tuple[list[Any], str | None]:
    """Feed ``chunks``, checking the per-call invariants; (canonical events, error or None)."""
    dec = FrameDecoder(max_data)
    events: list[Any] = []
    try:
        for chunk in chunks:
            with budget():
                got = dec.receive_data(chunk)
            assert len(got) <= len(chunk), "more events than input bytes: no progress"
            assert sum(len(e.data) for e in got if isinstance(e, Data)) <= len(chunk)
            assert len(dec._buf) <= HEADER_SIZE + MAX_CONTROL_FRAME, len(dec._buf)
            for e in got:
                assert isinstance(e, (Data, Reset, WindowUpdate, GoAway))
                if isinstance(e, Data):
                    assert 0 < e.stream_id <= 0x7FFFFFFF and len(e.data) <= max_data
            events += got
    except RemoteProtocolError as exc:
        return canonical(events), f"{exc} (code {exc.code})"
    return canonical(events), None


def check(data: bytes, cuts: list[int], max_data: int = 0xFFFFFF) -> None:
    """The split run gives the same answer as the whole run."""
    whole, err = decode([data], max_data)
    pieces, err2 = decode(split(data, cuts), max_data)
    assert err == err2
    if err is None:
        assert pieces == whole


sids = st.integers(0, 0x7FFFFFFF) | st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF])
valid_frames = st.one_of(
    st.builds(lambda s, p, syn, fin: encode_data(s, p, syn=syn, fin=fin),
              st.integers(1, 0x7FFFFFFF), st.binary(max_size=300), st.booleans(), st.booleans()),
    st.builds(encode_rst, st.integers(1, 0x7FFFFFFF), st.integers(0, 0xFFFFFFFF)),
    st.builds(encode_wndinc, st.integers(1, 0x7FFFFFFF), st.integers(1, 0x7FFFFFFF)),
    st.builds(encode_goaway, sids, st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)),
)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """A frame header with any type/flags/stream and a payload whose length may lie."""
    ftype = draw(st.integers(0, 15))
    flags = draw(st.integers(0, 15))
    payload = draw(st.binary(max_size=80))
    length = draw(st.sampled_from([len(payload)] * 4 + [0, 3, 4, 7, 8, 9, 0xFFFFFF, MAX_CONTROL_FRAME + 1]))
    sid = draw(st.integers(0, 0xFFFFFFFF))
    return (length << 8 | ftype << 4 | flags).to_bytes(4, "big") + sid.to_bytes(4, "big") + payload


streams = st.lists(valid_frames | raw_frames(), max_size=12).map(b"".join)
cuts = st.lists(st.integers(0, 10_000), max_size=20)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame sequence with byte flips, insertions, deletions and duplications."""
    return mutate(draw, bytearray(draw(st.lists(valid_frames, min_size=1, max_size=8).map(b"".join))))


@FUZZ
@given(data=st.binary(max_size=2000), cuts=cuts, max_data=st.sampled_from([0xFFFFFF, 1024, 8, 1]))
def test_raw_bytes(data: bytes, cuts: list[int], max_data: int) -> None:
    check(data, cuts, max_data)


@FUZZ
@given(data=streams, cuts=cuts)
def test_structured_streams(data: bytes, cuts: list[int]) -> None:
    check(data, cuts)


@FUZZ
@given(data=mutated(), cuts=cuts, max_data=st.sampled_from([0xFFFFFF, 64]))
def test_mutated_valid_streams(data: bytes, cuts: list[int], max_data: int) -> None:
    check(data, cuts, max_data)


@settings(FUZZ, max_examples=100)
@given(frames=st.lists(valid_frames, max_size=10), cuts=cuts)
def test_valid_streams_decode_to_their_frames(frames: list[bytes], cuts: list[int]) -> None:
    """Valid frames, however split, decode to exactly one event each (up to the first GOAWAY)."""
    events, err = decode(split(b"".join(frames), cuts))
    assert err is None
    expected: list[Any] = []
    for f in frames:
        (e,) = FrameDecoder().receive_data(f)
        expected.append((e.stream_id, e.data, e.syn, e.fin) if isinstance(e, Data) else e)
        if isinstance(e, GoAway):
            break
    # Frames that continue a stream merge in canonical form; compare their bytes per stream.
    assert canonical([Data(*x) if isinstance(x, tuple) else x for x in expected]) == events


def test_byte_by_byte_large_frames_stay_bounded() -> None:
    """A maximal GOAWAY and a 1 MiB DATA frame, one byte at a time: the buffer stays bounded."""
    data = encode_data(1, b"x" * (1 << 20)) + encode_goaway(0, 0, b"d" * (MAX_CONTROL_FRAME - 8))
    dec = FrameDecoder()
    most = 0
    with budget(10.0):
        for i in range(0, len(data), 97):
            dec.receive_data(data[i : i + 97])
            most = max(most, len(dec._buf))
    assert most <= HEADER_SIZE + MAX_CONTROL_FRAME
    assert dec.closed


def test_oversized_frames_rejected_before_buffering() -> None:
    dec = FrameDecoder(1024)
    header = (MAX_CONTROL_FRAME + 1) << 8 | 3 << 4
    try:
        dec.receive_data(header.to_bytes(4, "big") + b"\0\0\0\0")
    except RemoteProtocolError as exc:
        assert exc.code == 8  # FRAME_SIZE
    else:
        raise AssertionError("an oversized GOAWAY was accepted")
    assert len(FrameDecoder(1024)._buf) == 0
