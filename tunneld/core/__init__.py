"""The surface plugins may import: the edge/agent core, tunnel types, streams and errors."""

from __future__ import annotations

from . import proto as proto
from ._agent import Agent as Agent
from ._agent import AgentInfo as AgentInfo
from ._agent import AgentTunnel as AgentTunnel
from ._agent import Metrics as Metrics
from ._config import AgentConfig as AgentConfig
from ._config import TunnelConfig as TunnelConfig
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
from ._forward import forward as forward
from ._mux import MuxSession as MuxSession
from ._mux import MuxStream as MuxStream
from ._tls import accept_tls as accept_tls
from ._tunnel import BindRequest as BindRequest
from ._tunnel import EdgeService as EdgeService
from ._tunnel import EdgeTunnel as EdgeTunnel
from ._tunnel import TunnelInfo as TunnelInfo
from ._tunnel import TunnelType as TunnelType
from ._tunnel import TunnelTypeRegistry as TunnelTypeRegistry
from ._tunnel import refuse_unenforced as refuse_unenforced
from ._util import open_listeners as open_listeners
from ._util import peer_addr as peer_addr
from ._util import set_nodelay as set_nodelay
from ._util import split_host_port as split_host_port

__all__ = [
    "proto", "Agent", "AgentInfo", "AgentTunnel", "Metrics", "AgentConfig", "TunnelConfig",
    "AgentSession", "Edge", "EdgeConfig", "EdgeInfo", "ERROR_HEADER", "AuthFailed", "Code",
    "ConfigError", "PluginError", "RemoteProtocolError", "TunneldError", "TunnelRejected", "CHUNK",
    "forward", "MuxSession", "MuxStream", "accept_tls", "BindRequest", "EdgeService", "EdgeTunnel",
    "TunnelInfo", "TunnelType", "TunnelTypeRegistry", "refuse_unenforced", "open_listeners", "peer_addr",
    "set_nodelay", "split_host_port",
]
