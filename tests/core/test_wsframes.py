"""WebSocket framing of the WebSocket carrier (tunneld.core.proto._wsframes), sans I/O.

Frames are built here byte by byte from RFC 6455 5.2, not with the module's own encoder, so
the reader is checked against the RFC's layout rather than against itself.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tunneld.core.proto import RemoteProtocolError, _wsframes
from tunneld.core.proto._wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    close_payload,
    frame_header,
    mask,
    mask_py,
    parse_close,
)

KEY = b"\x37\xfa\x21\x3d"


def xor(data: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3, literally: octet i XOR key octet i mod 4."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def frame(opcode: int, payload: bytes, *, fin: bool = True, key: bytes | None = None, rsv: int = 0,
          length_form: int | None = None) -> bytes:
    """One frame as the RFC lays it out; ``length_form`` forces 7, 16 or 64 bits of length."""
    n = len(payload)
    form = length_form or (7 if n < 126 else 16 if n < 1 << 16 else 64)
    out = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if key is not None else 0
    if form == 7:
        out += bytes([bit | n])
    elif form == 16:
        out += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        out += bytes([bit | 127]) + n.to_bytes(8, "big")
    if key is not None:
        out += key + xor(payload, key)
    else:
        out += payload
    return out


def read_all(reader: FrameReader, data: bytes, split: int | None = None,
             max_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
    """Feed ``data`` (in pieces of ``split`` bytes) and collect the events, data pieces merged."""
    events: list[tuple[int, bytes]] = []
    pieces = [data] if split is None else [data[i:i + split] for i in range(0, len(data), split)]
    for piece in pieces:
        reader.feed(piece)
        while (event := reader.next(max_bytes)) is not None:
            if event[0] == OP_BINARY and events and events[-1][0] == OP_BINARY:
                events[-1] = (OP_BINARY, events[-1][1] + event[1])
            else:
                events.append(event)
    return events


def server_reader() -> FrameReader:
    return FrameReader(masked=True, max_frame=1 << 24)


def client_reader() -> FrameReader:
    return FrameReader(masked=False, max_frame=1 << 24)


def test_compiled_mask_is_built() -> None:
    """With a C compiler at install time the compiled masking must be there (no silent fallback)."""
    if not _wsframes.COMPILED_MASK and (shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("tunneld.core.proto._wsmask is not built: run `python3 -m pip install -e .`")


@pytest.mark.parametrize("impl", [mask, mask_py], ids=["compiled-or-fallback", "python"])
def test_mask_matches_the_rfc(impl: object) -> None:
    rng = random.Random(5)
    for _ in range(300):
        data = rng.randbytes(rng.choice([0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 100, 4096, 4099]))
        key = rng.randbytes(4)
        offset = rng.randrange(0, 9)
        rotated = key[offset % 4:] + key[:offset % 4]
        assert impl(data, key, offset) == xor(data, rotated)  # type: ignore[operator]
    # masking twice is the identity; memoryviews and bytearrays are taken as well
    data = os.urandom(100_003)
    assert impl(impl(memoryview(data), KEY, 3), KEY, 3) == data  # type: ignore[operator]
    assert impl(bytearray(data), KEY, 0) == xor(data, KEY)  # type: ignore[operator]
    with pytest.raises(ValueError):
        impl(data, b"abc", 0)  # type: ignore[operator]


def test_mask_continues_across_pieces() -> None:
    data = os.urandom(1001)
    whole = mask(data, KEY, 0)
    cut = [0, 1, 6, 333, 334, 1000, 1001]
    pieces = b"".join(mask(data[a:b], KEY, a) for a, b in zip(cut, cut[1:], strict=False))
    assert pieces == whole


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_header_layout(n: int) -> None:
    assert frame_header(OP_BINARY, n) + bytes(n) == frame(OP_BINARY, bytes(n))
    assert frame_header(OP_BINARY, n, KEY) + xor(bytes(n), KEY) == frame(OP_BINARY, bytes(n), key=KEY)


@pytest.mark.parametrize("split", [None, 1, 2, 3, 5, 13, 1000])
def test_reads_frames_in_any_split(split: int | None) -> None:
    payloads = [b"", b"x", os.urandom(125), os.urandom(126), os.urandom(65535), os.urandom(70000)]
    wire = b"".join(frame(OP_BINARY, p, key=os.urandom(4)) for p in payloads)
    wire += frame(OP_PING, b"are you there", key=KEY)
    wire += frame(OP_BINARY, b"tail", key=KEY)
    got = read_all(server_reader(), wire, split)
    assert got == [(OP_BINARY, b"".join(payloads)), (OP_PING, b"are you there"), (OP_BINARY, b"tail")]


def test_payload_pieces_respect_max_bytes() -> None:
    reader = client_reader()
    reader.feed(frame(OP_BINARY, bytes(range(250))))
    sizes = []
    while (event := reader.next(64)) is not None:
        sizes.append(len(event[1]))
    assert sizes == [64, 64, 64, 58]


def test_fragmented_message_with_control_frames_between() -> None:
    wire = (frame(OP_BINARY, b"one ", fin=False, key=KEY) + frame(OP_PING, b"p", key=KEY)
            + frame(0, b"two ", fin=False, key=KEY) + frame(OP_PONG, b"", key=KEY)
            + frame(0, b"three", key=KEY) + frame(OP_BINARY, b"!", key=KEY))
    got = read_all(server_reader(), wire, 3)
    assert got == [(OP_BINARY, b"one "), (OP_PING, b"p"), (OP_BINARY, b"two "), (OP_PONG, b""),
                   (OP_BINARY, b"three!")]


def test_close_frame_ends_the_stream() -> None:
    reader = client_reader()
    got = read_all(reader, frame(OP_BINARY, b"last") + frame(OP_CLOSE, close_payload(1001, "bye")))
    assert got == [(OP_BINARY, b"last"), (OP_CLOSE, b"\x03\xe9bye")]
    assert reader.closed
    assert parse_close(got[1][1]) == (1001, "bye")
    with pytest.raises(RemoteProtocolError, match="after the close"):
        reader.feed(frame(OP_BINARY, b"more"))
    # data in the same read as the close frame is refused too
    reader = client_reader()
    reader.feed(frame(OP_CLOSE, b"") + frame(OP_BINARY, b"more"))
    assert reader.next(100) == (OP_CLOSE, b"")
    with pytest.raises(RemoteProtocolError, match="after the close"):
        reader.next(100)


@pytest.mark.parametrize(("wire", "match"), [
    (frame(OP_BINARY, b"x", key=KEY, rsv=1), "reserved bits"),
    (frame(OP_BINARY, b"x", key=KEY, rsv=4), "reserved bits"),
    (frame(0x3, b"x", key=KEY), "reserved opcode"),
    (frame(0xB, b"", key=KEY), "reserved opcode"),
    (frame(OP_BINARY, b"x"), "unmasked"),
    (frame(0x1, b"hello", key=KEY), "text message"),
    (frame(0, b"x", key=KEY), "continuation frame outside"),
    (frame(OP_BINARY, b"a", fin=False, key=KEY) + frame(OP_BINARY, b"b", key=KEY), "inside a fragmented"),
    (frame(OP_PING, b"x", fin=False, key=KEY), "fragmented WebSocket control"),
    (frame(OP_PING, bytes(126), key=KEY, length_form=16), "control frame of 126"),
    (frame(OP_BINARY, b"short", key=KEY, length_form=16), "shortest form"),
    (frame(OP_BINARY, bytes(300), key=KEY, length_form=64), "shortest form"),
    (b"\x82\xff\x80" + bytes(7) + KEY, "top bit"),
    (frame(OP_CLOSE, b"\x03", key=KEY), "1-byte payload"),
    (frame(OP_CLOSE, (1005).to_bytes(2, "big"), key=KEY), "invalid status code 1005"),
    (frame(OP_CLOSE, (999).to_bytes(2, "big"), key=KEY), "invalid status code 999"),
    (frame(OP_CLOSE, (5000).to_bytes(2, "big"), key=KEY), "invalid status code 5000"),
    (frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff", key=KEY), "not UTF-8"),
])
def test_refuses_what_the_rfc_forbids(wire: bytes, match: str) -> None:
    for split in (None, 1):
        with pytest.raises(RemoteProtocolError, match=match):
            read_all(server_reader(), wire, split)


def test_client_refuses_masked_frames_and_oversized_ones() -> None:
    with pytest.raises(RemoteProtocolError, match="masked WebSocket frame from the server"):
        read_all(client_reader(), frame(OP_BINARY, b"x", key=KEY))
    small = FrameReader(masked=False, max_frame=1000)
    with pytest.raises(RemoteProtocolError, match="at most 1000"):
        read_all(small, frame(OP_BINARY, bytes(1001)))
    # the bound is checked on the header, before any payload arrives
    with pytest.raises(RemoteProtocolError, match="at most 1000"):
        read_all(FrameReader(masked=False, max_frame=1000), b"\x82\x7f" + (1 << 40).to_bytes(8, "big"))


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    payload = close_payload(1002, "é" * 100)
    assert len(payload) <= 125
    assert parse_close(payload) == (1002, "é" * 61)


def test_valid_close_codes() -> None:
    for code in (1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999):
        assert parse_close(code.to_bytes(2, "big") + "ok ✓".encode()) == (code, "ok ✓")
    assert parse_close(b"") == (None, "")


def test_holds_only_a_header_and_a_control_frame() -> None:
    """Split input is kept only for an unfinished header or control frame, never payload."""
    reader = server_reader()
    wire = frame(OP_BINARY, os.urandom(100_000), key=KEY) + frame(OP_PING, bytes(125), key=KEY)
    for i in range(0, len(wire), 7):
        reader.feed(wire[i:i + 7])
        while reader.next(1 << 20) is not None:
            pass
        assert len(reader._partial) <= 14 + 125
    assert not reader.in_frame


def test_in_frame_tells_a_cut_frame() -> None:
    reader = client_reader()
    read_all(reader, frame(OP_BINARY, b"whole"))
    assert not reader.in_frame
    read_all(reader, frame(OP_BINARY, b"cut short")[:5])
    assert reader.in_frame
