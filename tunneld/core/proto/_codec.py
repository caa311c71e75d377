"""The JSON codec of the control messages (sans-IO): :func:`encode_message`, :func:`decode_message`.

Decoding and encoding are hand-rolled from a per-class schema built at import time rather than
done by cattrs: it gives case-insensitive keys and errors naming the offending field in one
pass, and it is type-strict in both directions.  The wire rules are in :mod:`._messages`.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from tunneld.core._errors import LocalProtocolError, RemoteProtocolError

from ._messages import MESSAGE_CLASSES

__all__ = ["decode_message", "encode_message"]

_T = TypeVar("_T")

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


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
