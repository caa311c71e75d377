"""Tests of the JSON control messages and their framing (tunneld.core.proto: _messages, _codec, _readers)."""

from __future__ import annotations

import json
import struct
import typing
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.core._errors import LocalProtocolError, RemoteProtocolError
from tunneld.core.proto import (
    MESSAGE_CLASSES,
    Auth,
    AuthExtra,
    AuthResp,
    AuthRespExtra,
    Bind,
    BindExtra,
    BindResp,
    BindRespExtra,
    CommandResp,
    JsonObjectReader,
    ProxyHeader,
    ProxyHeaderReader,
    Restart,
    SrvInfo,
    SrvInfoResp,
    StartTunnelWithLabel,
    StartTunnelWithLabelResp,
    Stop,
    StopTunnel,
    StreamType,
    Unbind,
    UnbindResp,
    Update,
    decode_message,
    decode_stream_type,
    encode_message,
    encode_proxy_stream_prefix,
    encode_stream_type,
)

# ---------------------------------------------------------------------------------------------
# Strategies

# Valid Unicode only: lone surrogates are deliberately replaced on decode (tested separately).
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_scalars = st.none() | st.booleans() | int64s | texts | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(texts, json_values, max_size=5)


def _strategy_for_type(tp: Any) -> st.SearchStrategy[Any]:
    if tp is str:
        return texts
    if tp is int:
        return int64s
    if tp is bool:
        return st.booleans()
    if tp == str | None:
        return st.none() | texts
    if tp == list[str]:
        return st.lists(texts, max_size=4)
    if tp == dict[str, str]:
        return st.dictionaries(texts, texts, max_size=4)
    if tp == dict[str, Any]:
        return json_objects
    if attrs.has(tp):
        return message_strategy(tp)
    raise AssertionError(f"no strategy for {tp!r}")


def message_strategy(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    kwargs = {
        a.name: _strategy_for_type(hints[a.name])
        for a in attrs.fields(cls)
        if a.metadata.get("wire", "") is not None  # skip non-wire fields (raw)
    }
    return st.builds(cls, **kwargs)


# ---------------------------------------------------------------------------------------------
# Stream types


def test_stream_type_values() -> None:
    assert [int(t) for t in StreamType] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xFFFFFFFF]
    assert int(StreamType.START_TUNNEL_WITH_LABEL) == 7
    assert int(StreamType.PATCH_TUNNEL_STATE) == 10


def test_stream_type_codec() -> None:
    assert encode_stream_type(StreamType.PROXY) == b"\x00\x00\x00\x03"
    assert encode_stream_type(StreamType.HEARTBEAT) == b"\xff\xff\xff\xff"
    assert decode_stream_type(b"\x00\x00\x01\x00") == 256  # unknown types are returned as ints
    for t in StreamType:
        assert decode_stream_type(encode_stream_type(t)) == t
    with pytest.raises(LocalProtocolError):
        encode_stream_type(-1)
    with pytest.raises(LocalProtocolError):
        encode_stream_type(2**32)
    with pytest.raises(LocalProtocolError):
        decode_stream_type(b"\x00\x00\x00")


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_empty_object_decodes_to_defaults(cls: type) -> None:
    assert decode_message(cls, b"{}") == cls()
    assert decode_message(cls, "{}") == cls()
    assert decode_message(cls, {}) == cls()
    assert decode_message(cls, encode_message(cls())) == cls()


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    wire = encode_message(msg)
    wire.decode("utf-8")  # always valid UTF-8
    assert b"\n" not in wire  # compact: one line
    assert decode_message(cls, wire) == msg


def _mangle_case(obj: dict[str, Any], rnd: Any) -> dict[str, Any]:
    """Randomise the case of every wire key; Opts/Labels contents are user data, left alone."""
    out = {}
    for k, v in obj.items():
        new_k = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in k)
        if k == "Extra" and isinstance(v, dict):
            v = _mangle_case(v, rnd)
        out[new_k] = v
    return out


@pytest.mark.parametrize("cls", [Auth, AuthResp, Bind, BindResp, ProxyHeader, StopTunnel, Update])
@settings(max_examples=30)
@given(data=st.data(), rnd=st.randoms(use_true_random=False))
def test_keys_match_case_insensitively(cls: type, data: st.DataObject, rnd: Any) -> None:
    msg = data.draw(message_strategy(cls))
    mangled = _mangle_case(json.loads(encode_message(msg)), rnd)
    assert decode_message(cls, json.dumps(mangled).encode()) == msg


@pytest.mark.parametrize("key", ["Authtoken", "AuthToken", "AUTHTOKEN", "authtoken"])
def test_authtoken_spellings(key: str) -> None:
    auth = decode_message(Auth, json.dumps({"Extra": {key: "tok"}}))
    assert auth.extra.authtoken == "tok"
    auth = decode_message(Auth, json.dumps({"extra": {key: "tok"}}))
    assert auth.extra.authtoken == "tok"


def test_authtoken_not_in_repr() -> None:
    assert "s3cret" not in repr(Auth(extra=AuthExtra(authtoken="s3cret")))


def test_last_case_variant_wins_like_go() -> None:
    auth = decode_message(Auth, b'{"Extra":{"Authtoken":"a","AuthToken":"b"}}')
    assert auth.extra.authtoken == "b"


@settings(max_examples=50)
@given(extra_keys=json_objects, msg=message_strategy(Bind))
def test_unknown_keys_ignored(extra_keys: dict[str, Any], msg: Bind) -> None:
    obj = json.loads(encode_message(msg))
    known = {k.lower() for k in obj}
    for k, v in extra_keys.items():
        if k.lower() not in known:
            obj[k] = v
    assert decode_message(Bind, json.dumps(obj)) == msg


def test_nulls_decode_to_defaults() -> None:
    data = {
        "Version": None,
        "ClientId": None,
        "Extra": {
            "OS": None,
            "HeartbeatInterval": None,
            "StopUnsupportedError": None,
            "TunneldWindow": None,
        },
    }
    assert decode_message(Auth, json.dumps(data)) == Auth()
    assert decode_message(Auth, b'{"Extra":null}') == Auth()
    assert decode_message(Bind, b'{"Opts":null,"Extra":null}') == Bind()
    assert decode_message(ProxyHeader, b'{"PassthroughTLS":null}') == ProxyHeader()
    assert decode_message(StartTunnelWithLabel, b'{"Labels":null}') == StartTunnelWithLabel()
    # null elements of a string list become "", as in Go
    assert decode_message(Auth, b'{"Version":["3",null]}').version == ["3", ""]


def test_unsupported_error_fields_keep_null_vs_empty() -> None:
    extra = decode_message(
        AuthExtra,
        b'{"UpdateUnsupportedError":null,"StopUnsupportedError":"","RestartUnsupportedError":"no"}',
    )
    assert extra.update_unsupported_error is None
    assert extra.stop_unsupported_error == ""
    assert extra.restart_unsupported_error == "no"
    wire = json.loads(encode_message(extra))
    assert wire["UpdateUnsupportedError"] is None
    assert wire["StopUnsupportedError"] == ""
    assert wire["RestartUnsupportedError"] == "no"


# ---------------------------------------------------------------------------------------------
# Realistic requests


def test_rust_auth_request() -> None:
    body = {
        "Version": ["3", "2"],
        "ClientId": "",
        "Extra": {
            "OS": "linux",
            "Arch": "amd64",
            "AuthToken": "2abc_token",
            "Version": "1.7.0",
            "Hostname": "",
            "UserAgent": "ngrok-python/1.7.0 ngrok-rust/0.18.0",
            "Metadata": "",
            "Cookie": "",
            "HeartbeatInterval": 10_000_000_000,
            "HeartbeatTolerance": 15_000_000_000,
            "Fingerprint": None,
            "UpdateUnsupportedError": "the agent has not defined a callback",
            "StopUnsupportedError": "",
            "RestartUnsupportedError": None,
            "ProxyType": "",
            "MutualTLS": False,
            "ServiceRun": False,
            "ConfigVersion": "",
            "CustomInterface": False,
            "CustomCAs": True,
            "ClientType": "ngrok-python",
        },
    }
    auth = decode_message(Auth, json.dumps(body).encode())
    assert auth.version == ["3", "2"]
    assert auth.extra.authtoken == "2abc_token"
    assert auth.extra.os == "linux"
    assert auth.extra.heartbeat_interval == 10_000_000_000
    assert auth.extra.heartbeat_tolerance == 15_000_000_000
    assert auth.extra.update_unsupported_error == "the agent has not defined a callback"
    assert auth.extra.stop_unsupported_error == ""
    assert auth.extra.restart_unsupported_error is None
    assert auth.extra.client_type == "ngrok-python"
    assert auth.extra.tunneld_window == 0
    assert auth.raw == body  # the raw object is kept (e.g. for Fingerprint, CustomCAs)


def test_bind_opts_kept_raw() -> None:
    opts = {"Hostname": "", "Auth": "", "Subdomain": "x", "LocalUrlScheme": "http", "ProxyProto": 0}
    body = {
        "Id": "tun1",
        "Proto": "https",
        "ForwardsTo": "app://host/exe?pid=1",
        "Opts": opts,
        "Extra": {"Token": "t", "IPPolicyRef": "ipp", "PoolingEnabled": True, "Bindings": []},
    }
    bind = decode_message(Bind, json.dumps(body))
    assert bind.opts == opts
    assert list(bind.opts) == list(opts)  # original key case and order
    assert bind.extra == BindExtra(token="t", ip_policy_ref="ipp", pooling_enabled=True)
    assert bind.raw == body
    # raw is neither encoded nor compared
    assert list(json.loads(encode_message(bind))) == [
        "Id", "ClientId", "Proto", "ForwardsTo", "ForwardsProto", "Opts", "Extra",
    ]  # fmt: skip
    assert bind == Bind(
        id="tun1", proto="https", forwards_to="app://host/exe?pid=1", opts=opts, extra=bind.extra
    )


def test_decode_from_dict_keeps_it_as_raw() -> None:
    body: dict[str, Any] = {"id": "x", "opts": {"URL": "u"}}
    bind = decode_message(Bind, body)
    assert bind.id == "x"
    assert bind.raw is body
    assert bind.opts is body["opts"]


# ---------------------------------------------------------------------------------------------
# Exact wire JSON (Rust clients match exact-case and require members)


def test_bind_resp_wire() -> None:
    resp = BindResp(
        id="tun1",
        url="https://a.example.com",
        proto="https",
        opts={"Hostname": "a.example.com", "LocalURLScheme": "http"},
        extra=BindRespExtra(token="tok", tunnel_id="tid"),
    )
    assert encode_message(resp) == (
        b'{"Id":"tun1","URL":"https://a.example.com","Proto":"https",'
        b'"Opts":{"Hostname":"a.example.com","LocalURLScheme":"http"},"Error":"",'
        b'"Extra":{"Token":"tok","TunnelID":"tid"}}'
    )
    assert encode_message(BindResp()) == (
        b'{"Id":"","URL":"","Proto":"","Opts":{},"Error":"","Extra":{"Token":"","TunnelID":""}}'
    )


def test_proxy_header_wire() -> None:
    h = ProxyHeader(id="tun1", client_addr="192.0.2.1:5555", proto="https")
    assert encode_message(h) == (
        b'{"Id":"tun1","ClientAddr":"192.0.2.1:5555","Proto":"https","EdgeType":"","PassthroughTLS":false}'
    )


def test_auth_resp_wire() -> None:
    resp = AuthResp(
        version="3",
        client_id="abc",
        extra=AuthRespExtra(
            version="tunneld", region="local", cookie="c", session_duration=5, agent_session_id="s"
        ),
    )
    assert encode_message(resp) == (
        b'{"Version":"3","ClientId":"abc","Error":"","Extra":{"Version":"tunneld",'
        b'"Region":"local","Cookie":"c","AccountName":"","SessionDuration":5,"PlanName":"",'
        b'"Banner":"","AgentSessionID":"s","TunneldWindow":0}}'
    )


def test_auth_extra_wire_keys() -> None:
    keys = list(json.loads(encode_message(AuthExtra())))
    assert keys == [
        "OS", "Arch", "Authtoken", "Version", "Hostname", "UserAgent", "Metadata", "Cookie",
        "HeartbeatInterval", "HeartbeatTolerance", "UpdateUnsupportedError",
        "StopUnsupportedError", "RestartUnsupportedError", "ClientType", "ProxyType",
        "TunneldWindow",
    ]  # fmt: skip
    assert list(json.loads(encode_message(Auth()))) == ["Version", "ClientId", "Extra"]


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (UnbindResp(error="boom"), b'{"Error":"boom"}'),
        (CommandResp(), b'{"Error":""}'),
        (Unbind(id="t"), b'{"Id":"t","ClientId":""}'),
        (SrvInfo(), b"{}"),
        (SrvInfoResp(region="eu"), b'{"Region":"eu"}'),
        (Restart(), b"{}"),
        (Stop(), b"{}"),
        (Update(), b'{"Version":"","PermitMajorVersion":false}'),
        (StopTunnel(id="t", message="m", error_code="ERR_NGROK_1"),
         b'{"Id":"t","Message":"m","ErrorCode":"ERR_NGROK_1"}'),
        (StartTunnelWithLabelResp(id="x"), b'{"Id":"x","Error":""}'),
        (StartTunnelWithLabel(labels={"edge": "e"}, forwards_to="f", forwards_proto="http1"),
         b'{"Labels":{"edge":"e"},"ForwardsTo":"f","ForwardsProto":"http1","Metadata":""}'),
        (BindExtra(ip_policy_ref="p"),
         b'{"Token":"","IPPolicyRef":"p","Metadata":"","Name":"","Description":"",'
         b'"PoolingEnabled":false}'),
        (Bind(id="i"),
         b'{"Id":"i","ClientId":"","Proto":"","ForwardsTo":"","ForwardsProto":"","Opts":{},'
         b'"Extra":{"Token":"","IPPolicyRef":"","Metadata":"","Name":"","Description":"",'
         b'"PoolingEnabled":false}}'),
    ],
)  # fmt: skip
def test_exact_wire(msg: Any, wire: bytes) -> None:
    assert encode_message(msg) == wire


def test_non_ascii_is_utf8_not_escaped() -> None:
    assert encode_message(SrvInfoResp(region="zürich")) == '{"Region":"zürich"}'.encode()


# ---------------------------------------------------------------------------------------------
# Malformed input


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (Auth, b'{"Version":"3"}', "Version"),
        (Auth, b'{"Version":["3",2]}', "Version[1]"),
        (Auth, b'{"ClientId":["x"]}', "ClientId"),
        (Auth, b'{"Extra":"x"}', "Extra"),
        (Auth, b'{"Extra":{"AuthToken":1}}', "Extra.Authtoken"),
        (Auth, b'{"Extra":{"HeartbeatInterval":"10"}}', "Extra.HeartbeatInterval"),
        (Auth, b'{"Extra":{"HeartbeatInterval":1.5}}', "Extra.HeartbeatInterval"),
        (Auth, b'{"Extra":{"HeartbeatInterval":1e9}}', "Extra.HeartbeatInterval"),
        (Auth, b'{"Extra":{"HeartbeatInterval":true}}', "Extra.HeartbeatInterval"),
        (Auth, b'{"Extra":{"HeartbeatInterval":9223372036854775808}}', "Extra.HeartbeatInterval"),
        (Auth, b'{"Extra":{"StopUnsupportedError":false}}', "Extra.StopUnsupportedError"),
        (Bind, b'{"Opts":[]}', "Opts"),
        (Bind, b'{"Opts":"x"}', "Opts"),
        (Bind, b'{"Extra":{"PoolingEnabled":"true"}}', "Extra.PoolingEnabled"),
        (Bind, b'{"Extra":{"PoolingEnabled":1}}', "Extra.PoolingEnabled"),
        (ProxyHeader, b'{"EdgeType":0}', "EdgeType"),
        (StartTunnelWithLabel, b'{"Labels":{"a":1}}', "Labels['a']"),
        (StartTunnelWithLabel, b'{"Labels":["a"]}', "Labels"),
    ],
)
def test_wrong_types_rejected(cls: type, data: bytes, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(cls, data)
    assert f"{cls.__name__} message: {field}:" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b"null",
        b'"str"',
        b"1",
        b"",
        b"{",
        b'{"Id":}',
        b'{"Id":"x"} trailing',
        b'{"Id":"\xff"}',  # invalid UTF-8
        b"\xef\xbb\xbf{}",  # BOM
        b'{"Id":"a\x01"}',  # raw control character in a string
        b'{"x":NaN}',
        b'{"x":Infinity}',
        b'{"x":' + b"1" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b"{\x00}",  # must not be sniffed as UTF-16
    ],
)
def test_invalid_documents_rejected(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(Bind, data)


def test_bad_argument_types_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        decode_message(Bind, 42)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        decode_message(int, b"{}")
    with pytest.raises(LocalProtocolError):
        encode_message(object())


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (ProxyHeader(edge_type=0), "EdgeType"),  # type: ignore[arg-type]
        (ProxyHeader(passthrough_tls=0), "PassthroughTLS"),  # type: ignore[arg-type]
        (Auth(version="3"), "Version"),  # type: ignore[arg-type]
        (Auth(version=["3", 2]), "Version[1]"),  # type: ignore[list-item]
        (Auth(extra=AuthExtra(heartbeat_interval=True)), "Extra.HeartbeatInterval"),
        (Auth(extra=AuthExtra(heartbeat_interval=2**63)), "Extra.HeartbeatInterval"),
        (Auth(extra=AuthRespExtra()), "Extra"),  # type: ignore[arg-type]
        (AuthResp(extra=AuthRespExtra(session_duration="5")), "Extra.SessionDuration"),  # type: ignore[arg-type]
        (StartTunnelWithLabel(labels={"a": 1}), "Labels['a']"),  # type: ignore[dict-item]
    ],
)
def test_encoding_wrong_types_is_a_local_error(msg: Any, field: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(msg)
    assert f": {field}:" in str(info.value)


def test_encoding_unserialisable_opts_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(BindResp(opts={"x": object()}))
    with pytest.raises(LocalProtocolError):
        encode_message(BindResp(opts={"x": float("nan")}))


def test_lone_surrogates() -> None:
    # Typed string fields: replaced with U+FFFD, as Go does.
    h = decode_message(ProxyHeader, b'{"Id":"a\\ud800b","ClientAddr":"\\udc00"}')
    assert h.id == "a\ufffdb"
    assert h.client_addr == "\ufffd"
    encode_message(h).decode("utf-8")
    # Raw Opts keep them; encoding still yields valid UTF-8 JSON that round-trips.
    bind = decode_message(Bind, b'{"Opts":{"k":"\\ud800","n":"\xc3\xa9"}}')
    wire = encode_message(BindResp(opts=bind.opts))
    wire.decode("utf-8")
    assert decode_message(BindResp, wire).opts == {"k": "\ud800", "n": "é"}


# ---------------------------------------------------------------------------------------------
# JsonObjectReader

TRICKY = {
    "a": "}{][",
    "b": 'quote " and backslash \\',
    "c": "\\",
    "d": '\\"}',
    "e": ["{", {"f": "}"}, [], {}],
    "ü": "snow ☃ 😀",
    "g": "\n\t\u0000",
}


def _feed_all(reader: JsonObjectReader, chunks: list[bytes]) -> tuple[Any, int]:
    """Feed chunks; return the object and the index of the chunk that completed it."""
    for i, chunk in enumerate(chunks):
        out = reader.feed(chunk)
        if out is not None:
            return out, i
    return None, -1


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_reader_byte_by_byte(ensure_ascii: bool) -> None:
    data = json.dumps(TRICKY, ensure_ascii=ensure_ascii).encode()
    reader = JsonObjectReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None
    assert reader.feed(data[-1:]) == TRICKY
    assert reader.leftover == b""
    assert reader.result == TRICKY
    reader.feed_eof()  # complete: fine


def test_reader_go_style_newline_and_leftover() -> None:
    reader = JsonObjectReader()
    assert reader.feed(b'  \r\n\t{"Id":"x"}\nextra') == {"Id": "x"}
    assert reader.leftover == b"\nextra"


def test_reader_rust_style_needs_no_eof() -> None:
    reader = JsonObjectReader()
    assert reader.feed(b'{"Version":["3","2"]') is None
    assert reader.feed(b"}") == {"Version": ["3", "2"]}


def test_reader_empty_object() -> None:
    assert JsonObjectReader().feed(b"{}") == {}


@settings(max_examples=200)
@given(
    obj=json_objects,
    trailer=st.sampled_from([b"", b"\n", b"\n{junk", b" tail"]),
    leading=st.sampled_from([b"", b" ", b"\n\t "]),
    splits=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    ensure_ascii=st.booleans(),
)
def test_reader_arbitrary_splits(
    obj: dict[str, Any], trailer: bytes, leading: bytes, splits: list[int], ensure_ascii: bool
) -> None:
    body = json.dumps(obj, ensure_ascii=ensure_ascii).encode()
    data = leading + body + trailer
    cuts = sorted({min(s, len(data)) for s in splits} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    reader = JsonObjectReader()
    got, i = _feed_all(reader, chunks)
    assert got == obj
    # Everything after the object, from the completing chunk and (unfed) later ones.
    assert reader.leftover + b"".join(chunks[i + 1 :]) == trailer


@pytest.mark.parametrize("data", [b"[]", b'"x"', b"null", b"x{}", b"1"])
def test_reader_rejects_non_objects(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        JsonObjectReader().feed(data)


def test_reader_rejects_non_object_early() -> None:
    reader = JsonObjectReader()
    assert reader.feed(b"   ") is None
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"[")


@pytest.mark.parametrize(
    "data", [b'{"a":}', b'{"a":1]', b'{"a" 1}', b'{"a":"\xff"}', b'{"a":NaN}', b'{"a":[}']
)
def test_reader_rejects_invalid_json_once_complete(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        reader = JsonObjectReader()
        reader.feed(data)
        reader.feed(b"}]}")


def test_reader_max_size() -> None:
    ok = b'{"a":"' + b"x" * 90 + b'"}'
    assert len(ok) == 98
    assert JsonObjectReader(max_size=98).feed(ok + b"\n" * 50) == {"a": "x" * 90}
    with pytest.raises(RemoteProtocolError):
        JsonObjectReader(max_size=97).feed(ok)
    # Incomplete and too big: rejected without waiting for the end.
    reader = JsonObjectReader(max_size=100)
    assert reader.feed(b'{"a":"' + b"x" * 90) is None
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"x" * 10)
    # Endless whitespace is bounded too.
    with pytest.raises(RemoteProtocolError):
        JsonObjectReader(max_size=10).feed(b" " * 11)


def test_reader_default_max_size_is_64k() -> None:
    reader = JsonObjectReader()
    assert reader.feed(b'{"a":"' + b"x" * 65_000) is None
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"x" * 1000)


def test_reader_max_depth() -> None:
    deep = b'{"a":' + b"[" * 200 + b"]" * 200 + b"}"
    with pytest.raises(RemoteProtocolError):
        JsonObjectReader().feed(deep)
    assert JsonObjectReader(max_depth=300).feed(deep) is not None


def test_reader_eof() -> None:
    with pytest.raises(RemoteProtocolError):
        JsonObjectReader().feed_eof()
    reader = JsonObjectReader()
    reader.feed(b'{"a":"}')
    with pytest.raises(RemoteProtocolError):
        reader.feed_eof()


def test_reader_feed_after_done_is_local_error() -> None:
    reader = JsonObjectReader()
    reader.feed(b"{}")
    with pytest.raises(LocalProtocolError):
        reader.feed(b"{}")


def test_reader_then_decode() -> None:
    auth = Auth(version=["2"], extra=AuthExtra(authtoken="t", heartbeat_interval=1))
    reader = JsonObjectReader()
    obj = reader.feed(encode_message(auth) + b"\n")
    assert obj is not None
    assert decode_message(Auth, obj) == auth


# ---------------------------------------------------------------------------------------------
# Proxy header


def test_proxy_prefix_layout() -> None:
    h = ProxyHeader(id="t", client_addr="1.2.3.4:5", proto="tcp")
    body = encode_message(h)
    prefix = encode_proxy_stream_prefix(h)
    assert prefix[:4] == b"\x00\x00\x00\x03"
    assert prefix[4:12] == struct.pack("<q", len(body))
    assert prefix[4:12] == len(body).to_bytes(8, "little")
    assert prefix[12:] == body


def test_proxy_reader_every_split_point() -> None:
    h = ProxyHeader(id="tun", client_addr="[2001:db8::1]:443", proto="https", edge_type="3")
    payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    data = encode_proxy_stream_prefix(h)[4:] + payload
    header_end = len(data) - len(payload)
    for cut in range(len(data) + 1):
        reader = ProxyHeaderReader()
        first = reader.feed(data[:cut])
        if cut < header_end:
            assert first is None
            assert reader.feed(data[cut:]) == h
        else:
            assert first == h
        assert reader.header == h
        if cut >= header_end:
            assert reader.leftover == payload[: cut - header_end]
        else:
            assert reader.leftover == payload


@settings(max_examples=100)
@given(
    h=message_strategy(ProxyHeader),
    payload=st.binary(max_size=64),
    splits=st.lists(st.integers(min_value=0, max_value=500), max_size=6),
)
def test_proxy_reader_arbitrary_splits(h: ProxyHeader, payload: bytes, splits: list[int]) -> None:
    data = encode_proxy_stream_prefix(h)[4:] + payload
    cuts = sorted({min(s, len(data)) for s in splits} | {0, len(data)})
    reader = ProxyHeaderReader()
    got = None
    rest = b""
    for a, b in zip(cuts, cuts[1:], strict=False):
        if got is None:
            got = reader.feed(data[a:b])
        else:
            rest += data[a:b]
    assert got == h
    assert reader.leftover + rest == payload


@pytest.mark.parametrize("length", [-1, -(2**63), 65_537, 2**62])
def test_proxy_reader_rejects_bad_length(length: int) -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(struct.pack("<q", length)[:7]) is None
    with pytest.raises(RemoteProtocolError):
        reader.feed(struct.pack("<q", length)[7:])


def test_proxy_reader_max_size() -> None:
    body = encode_message(ProxyHeader(id="x" * 100))
    ProxyHeaderReader(max_size=len(body)).feed(struct.pack("<q", len(body)) + body)
    with pytest.raises(RemoteProtocolError):
        ProxyHeaderReader(max_size=len(body) - 1).feed(struct.pack("<q", len(body)))


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b'{"Id":5}', b"\xff"])
def test_proxy_reader_rejects_bad_body(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ProxyHeaderReader().feed(struct.pack("<q", len(body)) + body)


def test_proxy_reader_eof_and_reuse() -> None:
    reader = ProxyHeaderReader()
    reader.feed(b"\x05\x00")
    with pytest.raises(RemoteProtocolError):
        reader.feed_eof()
    reader = ProxyHeaderReader()
    reader.feed(encode_proxy_stream_prefix(ProxyHeader())[4:])
    reader.feed_eof()
    with pytest.raises(LocalProtocolError):
        reader.feed(b"x")


def test_proxy_reader_accepts_minimal_go_header() -> None:
    # The 2.3 agent's edge only needed Id/ClientAddr/Proto; missing members take defaults.
    body = b'{"Id":"t","ClientAddr":"1.2.3.4:5","Proto":"http"}'
    h = ProxyHeaderReader().feed(struct.pack("<q", len(body)) + body)
    assert h == ProxyHeader(id="t", client_addr="1.2.3.4:5", proto="http")
