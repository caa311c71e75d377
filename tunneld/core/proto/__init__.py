"""The sans-IO agent protocol: muxado frames, typed streams, JSON control messages.

Bytes in, events out; no trio, no sockets, no clock (a test enforces it).  The Trio adapter
is :mod:`tunneld.core._mux`.
"""

from __future__ import annotations

from .._errors import LocalProtocolError as LocalProtocolError
from .._errors import ProtocolError as ProtocolError
from .._errors import RemoteProtocolError as RemoteProtocolError
from ._codec import decode_message as decode_message
from ._codec import encode_message as encode_message
from ._flow import DEFAULT_WINDOW as DEFAULT_WINDOW
from ._flow import MAX_DATA_FRAME as MAX_DATA_FRAME
from ._flow import ReceiveWindow as ReceiveWindow
from ._frames import FLAG_FIN as FLAG_FIN
from ._frames import FLAG_SYN as FLAG_SYN
from ._frames import HEADER_SIZE as HEADER_SIZE
from ._frames import Data as Data
from ._frames import ErrorCode as ErrorCode
from ._frames import FrameDecoder as FrameDecoder
from ._frames import FrameType as FrameType
from ._frames import GoAway as GoAway
from ._frames import Reset as Reset
from ._frames import WindowUpdate as WindowUpdate
from ._frames import data_header as data_header
from ._frames import encode_data as encode_data
from ._frames import encode_goaway as encode_goaway
from ._frames import encode_rst as encode_rst
from ._frames import encode_wndinc as encode_wndinc
from ._messages import *  # noqa: F403  (its __all__ is the message surface)
from ._messages import __all__ as _messages_all
from ._proxyproto import PROXY_V2_SIGNATURE as PROXY_V2_SIGNATURE
from ._proxyproto import ProxyProtocolInfo as ProxyProtocolInfo
from ._proxyproto import encode_proxy_header as encode_proxy_header
from ._proxyproto import parse_proxy_header as parse_proxy_header
from ._readers import JsonObjectReader as JsonObjectReader
from ._readers import ProxyHeaderReader as ProxyHeaderReader
from ._readers import encode_proxy_stream_prefix as encode_proxy_stream_prefix
from ._streamrules import admit_syn as admit_syn
from ._streamrules import check_data_after_fin as check_data_after_fin
from ._streamrules import orphan_frame_reply as orphan_frame_reply

__all__ = [
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "DEFAULT_WINDOW",
    "MAX_DATA_FRAME",
    "ReceiveWindow",
    "FLAG_FIN",
    "FLAG_SYN",
    "HEADER_SIZE",
    "Data",
    "ErrorCode",
    "FrameDecoder",
    "FrameType",
    "GoAway",
    "Reset",
    "WindowUpdate",
    "data_header",
    "encode_data",
    "encode_goaway",
    "encode_rst",
    "encode_wndinc",
    "PROXY_V2_SIGNATURE",
    "ProxyProtocolInfo",
    "encode_proxy_header",
    "parse_proxy_header",
    "decode_message",
    "encode_message",
    "JsonObjectReader",
    "ProxyHeaderReader",
    "encode_proxy_stream_prefix",
    "admit_syn",
    "check_data_after_fin",
    "orphan_frame_reply",
    *_messages_all,
]
