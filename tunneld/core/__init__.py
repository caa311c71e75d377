"""The surface plugins may import: the edge/agent core, tunnel types, streams and errors.

Names are resolved lazily (PEP 562) so that importing the sans-IO ``tunneld.core.proto``
pulls in neither trio nor the IO layer; a test enforces it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import proto as proto
    from ._access import log_connection as log_connection
    from ._agent import Agent as Agent
    from ._agent import AgentInfo as AgentInfo
    from ._agent import AgentTunnel as AgentTunnel
    from ._agent import Metrics as Metrics
    from ._agent import forward_to_upstream as forward_to_upstream
    from ._agent import open_upstream as open_upstream
    from ._config import AgentConfig as AgentConfig
    from ._config import TunnelConfig as TunnelConfig
    from ._config import check_host_header as check_host_header
    from ._config import split_basic_auth as split_basic_auth
    from ._edge import AgentSession as AgentSession
    from ._edge import Edge as Edge
    from ._edge import EdgeConfig as EdgeConfig
    from ._edge import EdgeInfo as EdgeInfo
    from ._errors import ERROR_HEADER as ERROR_HEADER
    from ._errors import AuthFailed as AuthFailed
    from ._errors import Code as Code
    from ._errors import ConfigError as ConfigError
    from ._errors import PluginError as PluginError
    from ._errors import RemoteProtocolError as RemoteProtocolError
    from ._errors import TunneldError as TunneldError
    from ._errors import TunnelRejected as TunnelRejected
    from ._forward import CHUNK as CHUNK
    from ._forward import ByteCounts as ByteCounts
    from ._forward import forward as forward
    from ._lean import LeanSocketStream as LeanSocketStream
    from ._lean import ReadyStreak as ReadyStreak
    from ._lean import lean as lean
    from ._mux import MuxSession as MuxSession
    from ._mux import MuxStream as MuxStream
    from ._streams import PrefixedStream as PrefixedStream
    from ._tls import accept_tls as accept_tls
    from ._tunnel import BindRequest as BindRequest
    from ._tunnel import ClaimTunnel as ClaimTunnel
    from ._tunnel import EdgeService as EdgeService
    from ._tunnel import EdgeTunnel as EdgeTunnel
    from ._tunnel import TlsFront as TlsFront
    from ._tunnel import TunnelInfo as TunnelInfo
    from ._tunnel import TunnelType as TunnelType
    from ._tunnel import TunnelTypeRegistry as TunnelTypeRegistry
    from ._tunnel import UpstreamHandler as UpstreamHandler
    from ._tunnel import proxy_proto_option as proxy_proto_option
    from ._tunnel import refuse_unenforced as refuse_unenforced
    from ._util import connect_tcp as connect_tcp
    from ._util import local_addr as local_addr
    from ._util import open_listeners as open_listeners
    from ._util import parse_local_addr as parse_local_addr
    from ._util import peer_addr as peer_addr
    from ._util import set_nodelay as set_nodelay
    from ._util import split_host_port as split_host_port

_EXPORTS: dict[str, str] = {
    "proto": "",
    "Agent": "._agent",
    "AgentInfo": "._agent",
    "AgentTunnel": "._agent",
    "Metrics": "._agent",
    "forward_to_upstream": "._agent",
    "open_upstream": "._agent",
    "AgentConfig": "._config",
    "TunnelConfig": "._config",
    "check_host_header": "._config",
    "split_basic_auth": "._config",
    "AgentSession": "._edge",
    "Edge": "._edge",
    "EdgeConfig": "._edge",
    "EdgeInfo": "._edge",
    "ERROR_HEADER": "._errors",
    "AuthFailed": "._errors",
    "Code": "._errors",
    "ConfigError": "._errors",
    "PluginError": "._errors",
    "RemoteProtocolError": "._errors",
    "TunneldError": "._errors",
    "TunnelRejected": "._errors",
    "log_connection": "._access",
    "CHUNK": "._forward",
    "ByteCounts": "._forward",
    "forward": "._forward",
    "MuxSession": "._mux",
    "MuxStream": "._mux",
    "accept_tls": "._tls",
    "PrefixedStream": "._streams",
    "BindRequest": "._tunnel",
    "ClaimTunnel": "._tunnel",
    "EdgeService": "._tunnel",
    "EdgeTunnel": "._tunnel",
    "TlsFront": "._tunnel",
    "TunnelInfo": "._tunnel",
    "TunnelType": "._tunnel",
    "TunnelTypeRegistry": "._tunnel",
    "UpstreamHandler": "._tunnel",
    "proxy_proto_option": "._tunnel",
    "refuse_unenforced": "._tunnel",
    "connect_tcp": "._util",
    "local_addr": "._util",
    "open_listeners": "._util",
    "parse_local_addr": "._util",
    "peer_addr": "._util",
    "LeanSocketStream": "._lean",
    "lean": "._lean",
    "ReadyStreak": "._lean",
    "set_nodelay": "._util",
    "split_host_port": "._util",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if not module:
        value: Any = importlib.import_module(f"{__name__}.{name}")
    else:
        value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
