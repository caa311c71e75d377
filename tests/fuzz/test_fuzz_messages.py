"""Fuzz tests of the JSON message codec and its incremental readers
(tunneld.core.proto: _messages, _codec, _readers).

Properties: decoding any bytes as any message class gives the message or RemoteProtocolError
(never another exception, never a message that cannot be re-encoded: decode(encode(m)) == m);
field names match case-insensitively; JsonObjectReader and ProxyHeaderReader give the same answer
however the input is split, keep at most ``max_size`` (+ the length prefix) bytes, and answer each
call within the time budget.  The long run is bench/fuzz.py.
"""

from __future__ import annotations

import functools
import json
import struct
import typing
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.core._errors import LocalProtocolError, RemoteProtocolError
from tunneld.core.proto import (
    MAX_MESSAGE_SIZE,
    MESSAGE_CLASSES,
    Auth,
    Bind,
    JsonObjectReader,
    ProxyHeader,
    ProxyHeaderReader,
    decode_message,
    encode_message,
    encode_proxy_stream_prefix,
)

from ._limits import budget, fuzz_settings, split

FUZZ = fuzz_settings(70)


def decode_or_none(cls: type, data: bytes | str | dict[str, Any]) -> Any:
    """Decode; None on RemoteProtocolError.  A decoded message must survive a round trip."""
    try:
        with budget():
            msg = decode_message(cls, data)
    except RemoteProtocolError:
        return None
    assert isinstance(msg, cls)
    try:
        wire = encode_message(msg)
    except LocalProtocolError as exc:  # pragma: no cover - the bug this guards against
        raise AssertionError(f"decoded {cls.__name__} cannot be re-encoded: {exc}") from None
    assert decode_message(cls, wire) == msg
    return msg


# ---------------------------------------------------------------------------------------------
# Strategies: JSON values, objects shaped like each message with its keys in any case

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=5)


#: Values of any JSON type, for fields that expect another one.
wrong_values = json_scalars | st.lists(json_scalars, max_size=2) | st.dictionaries(
    st.text(max_size=3), json_scalars, max_size=2)


def any_case(name: str) -> st.SearchStrategy[str]:
    """The wire name as Go (exact), Rust (other capitals) or anyone else might spell it."""
    return st.sampled_from([name, name.lower(), name.upper()]) | st.lists(
        st.booleans(), min_size=len(name), max_size=len(name)
    ).map(lambda caps: "".join(c.upper() if u else c.lower() for c, u in zip(name, caps, strict=True)))


def right_value(tp: Any) -> st.SearchStrategy[Any]:
    if tp is str:
        return st.text(max_size=10)
    if tp is int:
        return st.integers(-(2**63), 2**63 - 1)
    if tp is bool:
        return st.booleans()
    if tp == list[str]:
        return st.lists(st.text(max_size=5), max_size=3)
    if tp == dict[str, str]:
        return st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
    if tp == dict[str, Any]:
        return st.dictionaries(st.text(max_size=5), json_values, max_size=3)
    if typing.get_origin(tp) in (typing.Union, type(int | str)):
        return st.none() | st.text(max_size=5)
    return object_for(tp)


def wire_names(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for a in attrs.fields(cls):
        wire = a.metadata.get("wire", "".join(p[:1].upper() + p[1:] for p in a.name.split("_")))
        if wire is not None:
            out.append((wire, hints[a.name]))
    return out


@functools.cache
def object_for(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects for ``cls``: each field absent, right-typed, null or anything, in any case."""
    entries = [
        st.tuples(any_case(wire), st.one_of(right_value(tp), right_value(tp), st.none(), wrong_values))
        for wire, tp in wire_names(cls)
    ]
    return st.tuples(
        st.lists(st.one_of(*entries), max_size=len(entries) + 2) if entries else st.just([]),
        st.dictionaries(st.text(max_size=6), json_values, max_size=1),
    ).map(lambda t: {**t[1], **dict(t[0])})


classes = st.sampled_from(MESSAGE_CLASSES)


def _pair(cls: type) -> st.SearchStrategy[tuple[type, dict[str, Any]]]:
    return object_for(cls).map(lambda obj: (cls, obj))


def class_and_object() -> st.SearchStrategy[tuple[type, dict[str, Any]]]:
    """A message class and a JSON object shaped like it."""
    return st.one_of([_pair(cls) for cls in MESSAGE_CLASSES])


@st.composite
def mutated_json(draw: st.DrawFn) -> tuple[type, bytes]:
    """The encoding of a message with bytes flipped, inserted (invalid UTF-8 too) or removed."""
    cls, obj = draw(class_and_object())
    buf = bytearray(json.dumps(obj, ensure_ascii=draw(st.booleans())).encode())
    tokens = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"1e999", b"-1e999", b"9" * 30, b"NaN", b"[[[[", b"}", b"\\",
              b'"', b"\\ud800", b"null", b",", b":", b"\x00"]
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.integers(0, 2))
        if op == 0:
            buf[pos:pos] = draw(st.sampled_from(tokens) | st.binary(min_size=1, max_size=3))
        elif op == 1:
            del buf[pos : pos + draw(st.integers(1, 4))]
        elif buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
    return cls, bytes(buf)


cuts = st.lists(st.integers(0, 100_000), max_size=12)


# ---------------------------------------------------------------------------------------------
# Message codec


@FUZZ
@given(cls=classes, data=st.binary(max_size=300))
def test_arbitrary_bytes(cls: type, data: bytes) -> None:
    decode_or_none(cls, data)


@FUZZ
@given(cls_obj=class_and_object(), ascii_only=st.booleans())
def test_structured_objects_any_case(cls_obj: tuple[type, dict[str, Any]], ascii_only: bool) -> None:
    """Right types decode to the values sent (last spelling wins); wrong ones name the field."""
    cls, obj = cls_obj
    text = json.dumps(obj, ensure_ascii=ascii_only)
    msg = decode_or_none(cls, text.encode())
    wires = {w.lower(): (w, tp) for w, tp in wire_names(cls)}
    if msg is None:
        with pytest.raises(RemoteProtocolError) as info:
            decode_message(cls, text)
        message = str(info.value)
        assert message.startswith(f"malformed {cls.__name__} message: ")
        top = message.split(": ", 2)[1].split(".")[0].split("[")[0]
        assert top.lower() in wires, message
        return
    attr_of = {w.lower(): a.name for a, (w, _) in zip(wire_fields(cls), wire_names(cls), strict=True)}
    for key, value in obj.items():
        low = key.lower()
        if low in wires and obj_last(obj, key) and type(value) is wires[low][1] in (str, bool):
            assert getattr(msg, attr_of[low]) == value, (key, value)


def wire_fields(cls: type) -> list[Any]:
    return [a for a in attrs.fields(cls) if a.metadata.get("wire", "") is not None]


def obj_last(obj: dict[str, Any], key: str) -> bool:
    """``key`` is the last of its case-insensitive spellings in ``obj`` (the one that wins)."""
    return [k for k in obj if k.lower() == key.lower()][-1] == key


@FUZZ
@given(cls_data=mutated_json())
def test_mutated_messages(cls_data: tuple[type, bytes]) -> None:
    cls, data = cls_data
    decode_or_none(cls, data)
    decode_or_none(cls, data.decode("utf-8", "surrogateescape"))


@settings(FUZZ, max_examples=60)
@given(cls=classes, field=st.integers(0, 50), value=st.sampled_from([
    2**63, -(2**63) - 1, 10**4000, "1" * 5000, 1e308, "1e999", "-1e999", "1e-999", "-0", "NaN", "Infinity",
]))
def test_huge_numbers(cls: type, field: int, value: Any) -> None:
    names = wire_names(cls) or [("X", int)]
    wire, _ = names[field % len(names)]
    literal = value if isinstance(value, str) else json.dumps(value)
    decode_or_none(cls, f'{{"{wire}": {literal}}}'.encode())
    decode_or_none(Bind, f'{{"Opts": {{"n": [{literal}]}}}}'.encode())  # raw dicts keep any number


@settings(FUZZ, max_examples=20)
@given(cls=classes, depth=st.integers(1, 200_000), opener=st.sampled_from(["[", '{"a":', '{"Opts":{"a":']))
def test_deep_nesting(cls: type, depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '{"Opts":{"a":': "}}"}[opener]
    decode_or_none(cls, (opener * depth + "1" + closer * depth).encode())


def test_regression_infinite_float_in_opts() -> None:
    """1e999 parsed as inf; a Bind whose Opts held it decoded but its echo could not be encoded."""
    with pytest.raises(RemoteProtocolError, match="out of range"):
        decode_message(Bind, b'{"Id":"x","Opts":{"Hostname":1e999}}')
    assert decode_message(Bind, b'{"Opts":{"a":1.5e308}}').opts == {"a": 1.5e308}


def test_wrong_type_names_nested_field() -> None:
    with pytest.raises(RemoteProtocolError, match=r"Extra\.HeartbeatInterval: expected an integer"):
        decode_message(Auth, b'{"extra":{"heartbeatinterval":"10s"}}')


# ---------------------------------------------------------------------------------------------
# Incremental readers


def read_object(chunks: list[bytes], max_size: int, max_depth: int) -> Any:
    reader = JsonObjectReader(max_size, max_depth=max_depth)
    fed = b""
    try:
        for chunk in chunks:
            fed += chunk
            with budget():
                obj = reader.feed(chunk)
            if obj is not None:
                assert fed.endswith(reader.leftover)
                return obj, fed[: len(fed) - len(reader.leftover)], reader.leftover
            assert len(reader._buf) <= max_size, (len(reader._buf), max_size)
        with pytest.raises(RemoteProtocolError):
            reader.feed_eof()
    except RemoteProtocolError:
        return "error"
    return None


@FUZZ
@given(data=st.binary(max_size=400) | mutated_json().map(lambda t: t[1] + b"\n{tail"), cuts=cuts,
       max_size=st.sampled_from([MAX_MESSAGE_SIZE, 100, 7]), max_depth=st.sampled_from([128, 2]))
def test_json_object_reader(data: bytes, cuts: list[int], max_size: int, max_depth: int) -> None:
    whole = read_object([data], max_size, max_depth)
    pieces = read_object(split(data, cuts), max_size, max_depth)
    if isinstance(whole, tuple) and isinstance(pieces, tuple):
        # The object and where it ends agree; the leftover is whatever followed in the last piece.
        assert whole[0] == pieces[0] and whole[1] == pieces[1]
        for cls in MESSAGE_CLASSES[:6]:
            decode_or_none(cls, whole[0])
    else:
        assert whole == pieces


@FUZZ
@given(cls_obj=class_and_object(), cuts=cuts, ws=st.sampled_from([b"", b" \n", b"\t\r\n  "]))
def test_json_object_reader_valid(cls_obj: tuple[type, dict[str, Any]], cuts: list[int], ws: bytes) -> None:
    cls, obj = cls_obj
    body = json.dumps(obj, ensure_ascii=False).encode()
    got = read_object(split(ws + body + b"\nrest", cuts), MAX_MESSAGE_SIZE, 128)
    assert isinstance(got, tuple) and got[1] == ws + body
    assert got[0] == json.loads(body)
    decode_or_none(cls, got[0])


def read_header(chunks: list[bytes], max_size: int) -> Any:
    reader = ProxyHeaderReader(max_size)
    fed = b""
    try:
        for chunk in chunks:
            fed += chunk
            with budget():
                hdr = reader.feed(chunk)
            if hdr is not None:
                assert fed.endswith(reader.leftover)
                return hdr, len(fed) - len(reader.leftover)
            assert len(reader._buf) <= 8 + max_size, (len(reader._buf), max_size)
        with pytest.raises(RemoteProtocolError):
            reader.feed_eof()
    except RemoteProtocolError:
        return "error"
    return None


@st.composite
def proxy_streams(draw: st.DrawFn) -> bytes:
    """Length-prefixed ProxyHeaders whose prefix may lie (negative, huge, short, long)."""
    obj = draw(object_for(ProxyHeader))
    body = json.dumps(obj).encode()
    length = draw(st.sampled_from([len(body)] * 3 + [0, -1, 2**63 - 1, -(2**63), MAX_MESSAGE_SIZE + 1])
                  | st.integers(-(2**63), 2**63 - 1))
    return struct.pack("<q", length) + body + draw(st.binary(max_size=20))


@FUZZ
@given(data=proxy_streams() | st.binary(max_size=200), cuts=cuts,
       max_size=st.sampled_from([MAX_MESSAGE_SIZE, 50, 0]))
def test_proxy_header_reader(data: bytes, cuts: list[int], max_size: int) -> None:
    whole = read_header([data], max_size)
    pieces = read_header(split(data, cuts), max_size)
    assert whole == pieces
    if isinstance(whole, tuple):
        decode_or_none(ProxyHeader, encode_message(whole[0]))


@settings(FUZZ, max_examples=50)
@given(h=st.builds(ProxyHeader, id=st.text(max_size=8), client_addr=st.text(max_size=20),
                   proto=st.text(max_size=5), edge_type=st.sampled_from(["", "1", "2", "3"]),
                   passthrough_tls=st.booleans()), cuts=cuts)
def test_proxy_header_round_trip(h: ProxyHeader, cuts: list[int]) -> None:
    wire = encode_proxy_stream_prefix(h)[4:]
    got = read_header(split(wire + b"payload", cuts), MAX_MESSAGE_SIZE)
    assert isinstance(got, tuple) and got[1] == len(wire)
    assert got[0] == decode_message(ProxyHeader, encode_message(h))
