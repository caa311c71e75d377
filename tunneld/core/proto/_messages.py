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

The codec is :mod:`._codec`; the incremental readers that find where a message ends in a
stream are :mod:`._readers`.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import attrs

from tunneld.core._errors import LocalProtocolError

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
    "MAX_MESSAGE_SIZE",
    "MESSAGE_CLASSES",
    "ProxyHeader",
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
    "decode_stream_type",
    "encode_stream_type",
]

#: Default (and usual) limit for one JSON control message or proxy header.
MAX_MESSAGE_SIZE = 64 * 1024



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
