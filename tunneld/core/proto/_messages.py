"""Control messages of the ngrok agent protocol, and their framing (sans-IO).

Every stream starts with a 4-byte big-endian :class:`StreamType`.  RPC streams then carry one
JSON object each way; proxy streams (type 3) carry an int64 little-endian length-prefixed JSON
:class:`ProxyHeader` followed by raw bytes.

Wire rules (see ../shared/reference/ngrok-protocol.md §3.1):

* Field names are PascalCase as Go's encoding/json writes them.  A field's wire name is derived
  from its snake_case attribute (``user_agent`` -> ``UserAgent``) unless the field carries
  ``metadata={"wire": "URL"}``; ``{"wire": None}`` marks a field that is never on the wire.
* Encoding always emits every field with its exact spelling, because Rust (serde) clients
  match names exactly and require some members.
* Decoding matches keys case-insensitively at every level (Rust sends ``AuthToken``, Go
  ``Authtoken``), ignores unknown keys, maps ``null`` to the field's default, and rejects wrong
  JSON types with :class:`RemoteProtocolError` naming the field.

Decoding and encoding are hand-rolled from a per-class schema built at import time rather than
done by cattrs: it gives case-insensitive keys and errors naming the offending field in one
pass, and it is type-strict in both directions.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from tunneld.core._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Auth",
    "AuthExtra",
    "AuthResp",
    "AuthRespExtra",
    "Bind",
    "BindExtra",
    "BindResp",
    "BindRespExtra",
    "CommandResp",
    "JsonObjectReader",
    "MAX_MESSAGE_SIZE",
    "MESSAGE_CLASSES",
    "ProxyHeader",
    "ProxyHeaderReader",
    "Restart",
    "SrvInfo",
    "SrvInfoResp",
    "StartTunnelWithLabel",
    "StartTunnelWithLabelResp",
    "Stop",
    "StopTunnel",
    "StreamType",
    "Unbind",
    "UnbindResp",
    "Update",
    "decode_message",
    "decode_stream_type",
    "encode_message",
    "encode_proxy_stream_prefix",
    "encode_stream_type",
]

_T = TypeVar("_T")

#: Default (and usual) limit for one JSON control message or proxy header.
MAX_MESSAGE_SIZE = 64 * 1024

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------
# Stream types


class StreamType(enum.IntEnum):
    """First 4 bytes (big-endian) of every stream."""

    AUTH = 0
    BIND = 1
    UNBIND = 2
    PROXY = 3
    RESTART = 4
    STOP = 5
    UPDATE = 6
    START_TUNNEL_WITH_LABEL = 7
    SRV_INFO = 8
    STOP_TUNNEL = 9
    PATCH_TUNNEL_STATE = 10
    HEARTBEAT = 0xFFFFFFFF


_U32_BE = struct.Struct(">I")
_I64_LE = struct.Struct("<q")


def encode_stream_type(t: int) -> bytes:
    """The 4-byte big-endian prefix of a stream of type ``t``."""
    if not 0 <= t <= 0xFFFFFFFF:
        raise LocalProtocolError(f"stream type {t} does not fit in 32 bits")
    return _U32_BE.pack(t)


def decode_stream_type(b: bytes) -> int:
    """Parse exactly 4 bytes as a stream type.

    Returns a plain int: unknown types are legal on the wire and the caller decides.
    """
    if len(b) != 4:
        raise LocalProtocolError(f"a stream type is 4 bytes, got {len(b)}")
    return int(_U32_BE.unpack(b)[0])


# --------------------------------------------------------------------------------------------
# Message classes

_NOWIRE: dict[str, Any] = {"wire": None}


def _wire(name: str, default: Any = "", **kw: Any) -> Any:
    """A field whose wire name is not the PascalCase of its attribute name."""
    return attrs.field(default=default, metadata={"wire": name}, **kw)


def _raw() -> Any:
    """The decoded JSON object as received (never encoded, ignored by ``==``)."""
    return attrs.field(factory=dict, eq=False, repr=False, metadata=_NOWIRE)


@attrs.define
class AuthExtra:
    os: str = _wire("OS")
    arch: str = ""
    # Secret: kept out of repr() so that logging a message never leaks it.
    authtoken: str = attrs.field(default="", repr=False)
    version: str = ""
    hostname: str = ""
    user_agent: str = ""
    metadata: str = ""
    cookie: str = attrs.field(default="", repr=False)
    heartbeat_interval: int = 0  # nanoseconds
    heartbeat_tolerance: int = 0  # nanoseconds
    # None (JSON null) = client too old to know the command; "" = supported; else the reason.
    update_unsupported_error: str | None = None
    stop_unsupported_error: str | None = None
    restart_unsupported_error: str | None = None
    client_type: str = ""
    proxy_type: str = ""
    #: tunneld extension: per-stream flow-control window our agent asks for (0 = default).
    tunneld_window: int = 0


@attrs.define
class Auth:
    version: list[str] = attrs.Factory(list)
    client_id: str = ""
    extra: AuthExtra = attrs.Factory(AuthExtra)
    raw: dict[str, Any] = _raw()


@attrs.define
class AuthRespExtra:
    version: str = ""
    region: str = ""
    cookie: str = attrs.field(default="", repr=False)
    account_name: str = ""
    session_duration: int = 0  # seconds
    plan_name: str = ""
    banner: str = ""
    agent_session_id: str = _wire("AgentSessionID")
    #: tunneld extension: the window the edge granted (0 = the client's request is ignored).
    tunneld_window: int = 0


@attrs.define
class AuthResp:
    version: str = ""
    client_id: str = ""
    error: str = ""
    extra: AuthRespExtra = attrs.Factory(AuthRespExtra)


@attrs.define
class BindExtra:
    token: str = ""
    ip_policy_ref: str = _wire("IPPolicyRef")
    metadata: str = ""
    name: str = ""
    description: str = ""
    pooling_enabled: bool = False


@attrs.define
class Bind:
    id: str = ""
    client_id: str = ""
    proto: str = ""
    forwards_to: str = ""
    forwards_proto: str = ""
    #: Protocol-specific options, kept exactly as sent (original key case, unknown keys).
    opts: dict[str, Any] = attrs.Factory(dict)
    extra: BindExtra = attrs.Factory(BindExtra)
    raw: dict[str, Any] = _raw()


@attrs.define
class BindRespExtra:
    token: str = ""
    tunnel_id: str = _wire("TunnelID")


@attrs.define
class BindResp:
    id: str = ""
    url: str = _wire("URL")
    proto: str = ""
    #: Echo of the request's Opts: Rust re-parses it as the same endpoint type.
    opts: dict[str, Any] = attrs.Factory(dict)
    error: str = ""
    extra: BindRespExtra = attrs.Factory(BindRespExtra)


@attrs.define
class Unbind:
    id: str = ""
    client_id: str = ""


@attrs.define
class UnbindResp:
    error: str = ""


@attrs.define
class StartTunnelWithLabel:
    labels: dict[str, str] = attrs.Factory(dict)
    forwards_to: str = ""
    forwards_proto: str = ""
    metadata: str = ""


@attrs.define
class StartTunnelWithLabelResp:
    id: str = ""
    error: str = ""


@attrs.define
class SrvInfo:
    pass


@attrs.define
class SrvInfoResp:
    region: str = ""


@attrs.define
class Restart:
    pass


@attrs.define
class Stop:
    pass


@attrs.define
class Update:
    version: str = ""
    permit_major_version: bool = False


@attrs.define
class CommandResp:
    """Client's answer to Restart/Stop/Update (and StopTunnel from Go)."""

    error: str = ""


@attrs.define
class StopTunnel:
    id: str = ""
    message: str = ""
    error_code: str = ""


@attrs.define
class ProxyHeader:
    id: str = ""
    client_addr: str = ""
    proto: str = ""
    #: A JSON *string*: "" / "0" undefined, "1" tcp, "2" tls, "3" https.
    edge_type: str = ""
    passthrough_tls: bool = _wire("PassthroughTLS", False)


MESSAGE_CLASSES: tuple[type, ...] = (
    AuthExtra, Auth, AuthRespExtra, AuthResp, BindExtra, Bind, BindRespExtra, BindResp,
    Unbind, UnbindResp, StartTunnelWithLabel, StartTunnelWithLabelResp, SrvInfo, SrvInfoResp,
    Restart, Stop, Update, CommandResp, StopTunnel, ProxyHeader,
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Schema: per-field decode/encode functions, built once per class


class _Bad(Exception):
    """A field-level type error; the path is filled in while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def where(self) -> str:
        out = ""
        for part in reversed(self.path):
            out += part if part.startswith("[") else (f".{part}" if out else part)
        return out or "<top level>"


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _expected(what: str, v: Any) -> _Bad:
    return _Bad(f"expected {what}, got {_json_type(v)}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(s: str) -> str:
    # JSON may carry lone surrogate escapes ("\ud800"), which Python keeps but which cannot be
    # encoded as UTF-8 later.  Replace them with U+FFFD, as Go's decoder does.
    if s.isascii():
        return s
    return _SURROGATE.sub("\ufffd", s)


def _dec_str(v: Any) -> str:
    if isinstance(v, str):
        return _clean(v)
    if v is None:
        return ""
    raise _expected("a string", v)


def _enc_str(v: Any) -> Any:
    if isinstance(v, str):
        return v
    raise _expected("a string", v)


def _dec_optstr(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return _clean(v)
    raise _expected("a string or null", v)


def _enc_optstr(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    raise _expected("a string or null", v)


def _dec_int(v: Any) -> int:
    # bool is an int subclass in Python but not a JSON number; floats ("1e9", "1.0") are
    # rejected by Go's int64 decoding too.
    if isinstance(v, int) and not isinstance(v, bool):
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise _Bad(f"integer {v} out of int64 range")
        return int(v)
    if v is None:
        return 0
    raise _expected("an integer", v)


def _enc_int(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise _Bad(f"integer {v} out of int64 range")
        return int(v)
    raise _expected("an integer", v)


def _dec_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v is None:
        return False
    raise _expected("a boolean", v)


def _enc_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    raise _expected("a boolean", v)


def _dec_strlist(v: Any) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _expected("an array of strings", v)
    out = []
    for i, item in enumerate(v):
        try:
            out.append(_dec_str(item))
        except _Bad as e:
            e.path.append(f"[{i}]")
            raise
    return out


def _enc_strlist(v: Any) -> Any:
    if not isinstance(v, list):
        raise _expected("a list of strings", v)
    for i, item in enumerate(v):
        if not isinstance(item, str):
            e = _expected("a string", item)
            e.path.append(f"[{i}]")
            raise e
    return v


def _dec_strdict(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _expected("an object of strings", v)
    out = {}
    for k, item in v.items():
        if not isinstance(k, str):
            raise _Bad(f"expected string keys, got {type(k).__name__}")
        try:
            out[_clean(k)] = _dec_str(item)
        except _Bad as e:
            e.path.append(f"[{k!r}]")
            raise
    return out


def _enc_strdict(v: Any) -> Any:
    if not isinstance(v, dict):
        raise _expected("a dict of strings", v)
    for k, item in v.items():
        if not isinstance(k, str) or not isinstance(item, str):
            e = _Bad(f"expected str keys and values, got {type(k).__name__}: {type(item).__name__}")
            e.path.append(f"[{k!r}]")
            raise e
    return v


def _dec_rawdict(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, dict):
        return v  # raw on purpose: original key case, unknown members kept
    raise _expected("an object", v)


def _enc_rawdict(v: Any) -> Any:
    if isinstance(v, dict):
        return v  # json.dumps checks the contents
    raise _expected("a dict", v)


_Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]

_SIMPLE_CODECS: dict[Any, _Codec] = {
    str: (_dec_str, _enc_str),
    int: (_dec_int, _enc_int),
    bool: (_dec_bool, _enc_bool),
    list[str]: (_dec_strlist, _enc_strlist),
    dict[str, str]: (_dec_strdict, _enc_strdict),
    dict[str, Any]: (_dec_rawdict, _enc_rawdict),
}


@attrs.frozen
class _Field:
    attr: str
    wire: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]


@attrs.frozen
class _Schema:
    cls: type
    fields: tuple[_Field, ...]
    by_key: dict[str, _Field]  # lower-cased wire name -> field
    raw_attr: str | None


_SCHEMAS: dict[type, _Schema] = {}


def _pascal(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _codec_for(tp: Any) -> _Codec:
    codec = _SIMPLE_CODECS.get(tp)
    if codec is not None:
        return codec
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {
        str,
        type(None),
    }:
        return _dec_optstr, _enc_optstr
    if isinstance(tp, type) and attrs.has(tp):
        sub = _schema_for(tp)
        return (lambda v: _dec_nested(sub, v)), (lambda v: _encode_obj(sub, v))
    raise TypeError(f"unsupported message field type {tp!r}")


def _schema_for(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is not None:
        return schema
    if not (isinstance(cls, type) and attrs.has(cls)):
        raise LocalProtocolError(f"{cls!r} is not a message class")
    hints = typing.get_type_hints(cls)
    fields: list[_Field] = []
    raw_attr = None
    for a in attrs.fields(cls):
        wire = a.metadata.get("wire", _pascal(a.name))
        if wire is None:
            if a.name == "raw":
                raw_attr = a.name
            continue
        dec, enc = _codec_for(hints[a.name])
        fields.append(_Field(a.name, wire, dec, enc))
    by_key = {f.wire.lower(): f for f in fields}
    if len(by_key) != len(fields):
        raise TypeError(f"{cls.__name__}: wire names collide when case is ignored")
    schema = _Schema(cls, tuple(fields), by_key, raw_attr)
    _SCHEMAS[cls] = schema
    return schema


def _decode_obj(schema: _Schema, obj: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    by_key = schema.by_key
    # Iterating in document order means the last of several case-variants wins, as in Go.
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        f = by_key.get(key.lower())
        if f is None:
            continue  # unknown keys are ignored, as by Go and serde
        try:
            kwargs[f.attr] = f.decode(value)
        except _Bad as e:
            e.path.append(f.wire)
            raise
    if schema.raw_attr is not None:
        kwargs[schema.raw_attr] = obj
    return schema.cls(**kwargs)


def _dec_nested(schema: _Schema, v: Any) -> Any:
    if isinstance(v, dict):
        return _decode_obj(schema, v)
    if v is None:
        return schema.cls()
    raise _expected("an object", v)


def _encode_obj(schema: _Schema, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, schema.cls):
        raise _Bad(f"expected {schema.cls.__name__}, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for f in schema.fields:
        try:
            out[f.wire] = f.encode(getattr(obj, f.attr))
        except _Bad as e:
            e.path.append(f.wire)
            raise
    return out


for _cls in MESSAGE_CLASSES:  # build eagerly: a schema mistake fails at import, not mid-session
    _schema_for(_cls)
del _cls


# --------------------------------------------------------------------------------------------
# JSON encode / decode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_INF = float("inf")


def _finite_float(text: str) -> float:
    # "1e999" parses as inf, which json.dumps(allow_nan=False) then refuses: a Bind whose Opts
    # we must echo could never be answered.  Go's decoder rejects it as out of range too.
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document from the peer; every failure is a RemoteProtocolError."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            # Decode explicitly: json.loads(bytes) would sniff UTF-16/32 from NUL bytes.
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RemoteProtocolError(f"message is not valid UTF-8 (byte {e.start})") from None
    elif isinstance(data, str):
        text = data
    else:
        raise LocalProtocolError(f"cannot decode a message from {type(data).__name__}")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise RemoteProtocolError("message is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise RemoteProtocolError(f"message is not valid JSON: {e}") from None


def encode_message(msg: Any) -> bytes:
    """Compact UTF-8 JSON of a message, every field present with its exact wire name."""
    schema = _schema_for(type(msg))
    try:
        obj = _encode_obj(schema, msg)
    except _Bad as e:
        raise LocalProtocolError(f"cannot encode {schema.cls.__name__}: {e.where()}: {e.reason}") from None
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise LocalProtocolError(f"cannot encode {schema.cls.__name__}: {e}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (only possible inside raw dicts such as Opts): escape it instead
        # of producing invalid UTF-8.  Rare, so the compact form stays the fast path.
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def decode_message(cls: type[_T], data: bytes | bytearray | memoryview | str | dict[str, Any]) -> _T:
    """Decode a message of class ``cls`` from JSON bytes/text or an already-parsed object.

    Raises :class:`RemoteProtocolError` for invalid JSON, a non-object top level, or a field of
    the wrong JSON type (the message names the field, e.g. ``Extra.HeartbeatInterval``).
    """
    schema = _schema_for(cls)
    obj = data if isinstance(data, dict) else _loads(data)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(
            f"malformed {schema.cls.__name__} message: expected a JSON object, got {_json_type(obj)}"
        )
    try:
        return typing.cast(_T, _decode_obj(schema, obj))
    except _Bad as e:
        raise RemoteProtocolError(
            f"malformed {schema.cls.__name__} message: {e.where()}: {e.reason}"
        ) from None


# --------------------------------------------------------------------------------------------
# Incremental readers

_WS = b" \t\r\n"
# Outside strings only these bytes matter; inside, only the closing quote and escapes.
# Multi-byte UTF-8 sequences never contain ASCII bytes, so scanning bytes is safe.
_OUTSIDE_RE = re.compile(rb'[{}\[\]"]')
_INSIDE_RE = re.compile(rb'["\\]')


class JsonObjectReader:
    """Reads ONE JSON object from a byte stream, without waiting for EOF.

    Go peers send ``{...}\\n``; Rust peers send ``{...}`` and keep the stream open, so the end
    of the object must be found by tracking nesting outside strings.  Bytes after the object
    are kept in :attr:`leftover`.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, *, max_depth: int = 128) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        #: Bytes received after the end of the object (valid once :meth:`feed` returned it).
        self.leftover = b""
        #: The parsed object once complete.
        self.result: dict[str, Any] | None = None
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to scan
        self._start = -1  # index of the opening brace, -1 until seen
        self._depth = 0
        self._in_string = False
        self._escape = False  # the previous byte was a backslash inside a string

    def feed(self, data: bytes | bytearray | memoryview) -> dict[str, Any] | None:
        """Add bytes; return the object once it is complete, else None."""
        if self.result is not None:
            raise LocalProtocolError("JsonObjectReader.feed() after the object was complete")
        buf = self._buf
        buf += data
        n = len(buf)
        pos = self._pos
        if self._start < 0:
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos < n:
                if buf[pos] != 0x7B:  # "{"
                    raise RemoteProtocolError(f"expected a JSON object, got {bytes(buf[pos : pos + 16])!r}")
                self._start = pos
                self._depth = 1
                pos += 1
        end = -1
        if self._start >= 0:
            depth, in_string, escape = self._depth, self._in_string, self._escape
            while pos < n:
                if in_string:
                    if escape:
                        pos += 1  # the escaped byte, whatever it is
                        escape = False
                        continue
                    m = _INSIDE_RE.search(buf, pos)
                    if m is None:
                        pos = n
                        break
                    pos = m.end()
                    if buf[m.start()] == 0x22:  # '"'
                        in_string = False
                    else:
                        escape = True
                else:
                    m = _OUTSIDE_RE.search(buf, pos)
                    if m is None:
                        pos = n
                        break
                    pos = m.end()
                    c = buf[m.start()]
                    if c == 0x22:
                        in_string = True
                    elif c in b"{[":
                        depth += 1
                        if depth > self.max_depth:
                            raise RemoteProtocolError(
                                f"JSON message nested deeper than {self.max_depth} levels"
                            )
                    else:
                        # Any closer counts: for valid JSON the end is the same, and invalid
                        # JSON is rejected by the parser below.
                        depth -= 1
                        if depth == 0:
                            end = pos
                            break
            self._depth, self._in_string, self._escape = depth, in_string, escape
        self._pos = pos
        if end < 0:
            if n > self.max_size:
                raise RemoteProtocolError(f"JSON message larger than {self.max_size} bytes")
            return None
        if end > self.max_size:
            raise RemoteProtocolError(f"JSON message larger than {self.max_size} bytes")
        obj = _loads(buf[self._start : end])
        if not isinstance(obj, dict):  # cannot happen given the scan; kept as a guard
            raise RemoteProtocolError(f"expected a JSON object, got {_json_type(obj)}")
        self.leftover = bytes(buf[end:])
        self._buf = bytearray()  # drop the buffer: the reader is done
        self.result = obj
        return obj

    def feed_eof(self) -> None:
        """The stream ended: an error unless the object was complete."""
        if self.result is None:
            raise RemoteProtocolError("stream ended before a complete JSON object was received")


def encode_proxy_stream_prefix(h: ProxyHeader) -> bytes:
    """Stream type 3 (BE u32), int64 LE length, then the JSON :class:`ProxyHeader`.

    Send it as one write so that it lands in the SYN frame (Go reads the type with one Read).
    """
    body = encode_message(h)
    return _U32_BE.pack(StreamType.PROXY) + _I64_LE.pack(len(body)) + body


class ProxyHeaderReader:
    """Reads the proxy header of a type-3 stream; input starts AFTER the 4 type bytes."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        #: Payload bytes that followed the header (valid once :meth:`feed` returned it).
        self.leftover = b""
        #: The parsed header once complete.
        self.header: ProxyHeader | None = None
        self._buf = bytearray()
        self._length: int | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Add bytes; return the header once complete, else None."""
        if self.header is not None:
            raise LocalProtocolError("ProxyHeaderReader.feed() after the header was complete")
        self._buf += data
        if self._length is None:
            if len(self._buf) < _I64_LE.size:
                return None
            (length,) = _I64_LE.unpack_from(self._buf)
            if length < 0 or length > self.max_size:
                raise RemoteProtocolError(f"proxy header length {length} outside 0..{self.max_size}")
            self._length = length
        end = _I64_LE.size + self._length
        if len(self._buf) < end:
            return None
        header = decode_message(ProxyHeader, self._buf[_I64_LE.size : end])
        self.leftover = bytes(self._buf[end:])
        self._buf = bytearray()
        self.header = header
        return header

    def feed_eof(self) -> None:
        """The stream ended: an error unless the header was complete."""
        if self.header is None:
            raise RemoteProtocolError("stream ended before the proxy header was complete")
