"""The plugin API: everything a tunnel type or an edge service may use, and nothing else.

Built-in plugins (http, tcp, tls, file, ssh, labeled) import from here, from the public building
blocks :mod:`tunneld.http1` (HTTP/1 heads and relay) and :mod:`tunneld.tlsutil` (TLS
contexts), and from their own package, exactly as a third-party plugin would;
``tests/test_plugin_api.py`` enforces it.

The core is seen through three protocols, never through its classes:

* :class:`EdgeContext`: the edge process: claim and release hostnames and transport-keyed
  addresses (``("tcp", 20001)`` and ``("udp", 20001)`` are different), public listeners,
  TLS, access lines, metrics, the data dir and the store;
* :class:`SessionContext`: one connected agent, on the edge: who owns its names, and
  :meth:`~SessionContext.open_stream` to reach it for a public connection;
* :class:`AgentTunnelContext`: one configured tunnel, on the agent: its config, its
  upstream and how to reach it.

A plugin module holds hookimpls (``@hookimpl``, the specs are in :mod:`tunneld.hookspecs`)
that register :class:`TunnelType` objects in the :class:`TunnelTypeRegistry` or return
objects with ``run(*, task_status)`` (:class:`EdgeService`) that the core starts.

Names are resolved on first use (PEP 562), so importing this module imports neither trio nor
the edge and agent implementation: ``tunneld.hookspecs`` can be typed against it without an
import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunneld import hookimpl as hookimpl

if TYPE_CHECKING:
    from tunneld.core import proto as proto
    from tunneld.core._commands import tunnel_command as tunnel_command
    from tunneld.core._errors import ERROR_HEADER as ERROR_HEADER
    from tunneld.core._errors import Code as Code
    from tunneld.core._errors import ConfigError as ConfigError
    from tunneld.core._errors import PluginError as PluginError
    from tunneld.core._errors import RemoteProtocolError as RemoteProtocolError
    from tunneld.core._errors import TunneldError as TunneldError
    from tunneld.core._errors import TunnelRejected as TunnelRejected
    from tunneld.core._forward import CHUNK as CHUNK
    from tunneld.core._forward import RELAY_CHUNK as RELAY_CHUNK
    from tunneld.core._forward import ByteCounts as ByteCounts
    from tunneld.core._forward import forward as forward
    from tunneld.core._lean import aclose_at_once as aclose_at_once
    from tunneld.core._lean import close_forcefully as close_forcefully
    from tunneld.core._lean import lean as lean
    from tunneld.core._options import NAME_OPTIONS as NAME_OPTIONS
    from tunneld.core._options import PROXY_PROTO_OPTION as PROXY_PROTO_OPTION
    from tunneld.core._options import check_host_header as check_host_header
    from tunneld.core._options import parse_proxy_proto as parse_proxy_proto
    from tunneld.core._options import split_basic_auth as split_basic_auth
    from tunneld.core._store import DEFAULT_ACCOUNT as DEFAULT_ACCOUNT
    from tunneld.core._store import Store as Store
    from tunneld.core._streams import PrefixedStream as PrefixedStream
    from tunneld.core._tunnel import AgentTunnelContext as AgentTunnelContext
    from tunneld.core._tunnel import BindRequest as BindRequest
    from tunneld.core._tunnel import ClaimTunnel as ClaimTunnel
    from tunneld.core._tunnel import EdgeContext as EdgeContext
    from tunneld.core._tunnel import EdgeService as EdgeService
    from tunneld.core._tunnel import EdgeTunnel as EdgeTunnel
    from tunneld.core._tunnel import ExchangeRecorder as ExchangeRecorder
    from tunneld.core._tunnel import LabeledTunnels as LabeledTunnels
    from tunneld.core._tunnel import ListedSession as ListedSession
    from tunneld.core._tunnel import SessionContext as SessionContext
    from tunneld.core._tunnel import TlsFront as TlsFront
    from tunneld.core._tunnel import TunnelConfig as TunnelConfig
    from tunneld.core._tunnel import TunnelInfo as TunnelInfo
    from tunneld.core._tunnel import TunnelOption as TunnelOption
    from tunneld.core._tunnel import TunnelType as TunnelType
    from tunneld.core._tunnel import TunnelTypeRegistry as TunnelTypeRegistry
    from tunneld.core._tunnel import UpstreamHandler as UpstreamHandler
    from tunneld.core._tunnel import proxy_proto_option as proxy_proto_option
    from tunneld.core._tunnel import refuse_unenforced as refuse_unenforced
    from tunneld.core._util import connect_tcp as connect_tcp
    from tunneld.core._util import format_host_port as format_host_port
    from tunneld.core._util import local_addr as local_addr
    from tunneld.core._util import open_listeners as open_listeners
    from tunneld.core._util import parse_local_addr as parse_local_addr
    from tunneld.core._util import peer_addr as peer_addr
    from tunneld.core._util import set_nodelay as set_nodelay
    from tunneld.core._util import split_host_port as split_host_port

# Name → the module defining it, or the module itself when it has that name (``proto``).  Only
# modules below the edge and agent implementation belong here (tests/test_plugin_api.py reads
# this table as imports and checks the graph).
_EXPORTS: dict[str, str] = {
    # what the core hands plugins
    "EdgeContext": "tunneld.core._tunnel",
    "SessionContext": "tunneld.core._tunnel",
    "ListedSession": "tunneld.core._tunnel",
    "AgentTunnelContext": "tunneld.core._tunnel",
    "ExchangeRecorder": "tunneld.core._tunnel",
    # tunnel types and what they return
    "TunnelType": "tunneld.core._tunnel",
    "TunnelTypeRegistry": "tunneld.core._tunnel",
    "TunnelInfo": "tunneld.core._tunnel",
    "BindRequest": "tunneld.core._tunnel",
    "EdgeTunnel": "tunneld.core._tunnel",
    "ClaimTunnel": "tunneld.core._tunnel",
    "LabeledTunnels": "tunneld.core._tunnel",
    "EdgeService": "tunneld.core._tunnel",
    "TlsFront": "tunneld.core._tunnel",
    "UpstreamHandler": "tunneld.core._tunnel",
    "refuse_unenforced": "tunneld.core._tunnel",
    "proxy_proto_option": "tunneld.core._tunnel",
    # the type's settings and its agent command
    "TunnelConfig": "tunneld.core._tunnel",
    "TunnelOption": "tunneld.core._tunnel",
    "tunnel_command": "tunneld.core._commands",
    "NAME_OPTIONS": "tunneld.core._options",
    "PROXY_PROTO_OPTION": "tunneld.core._options",
    "check_host_header": "tunneld.core._options",
    "parse_proxy_proto": "tunneld.core._options",
    "split_basic_auth": "tunneld.core._options",
    "Store": "tunneld.core._store",
    "DEFAULT_ACCOUNT": "tunneld.core._store",
    # the wire protocol's messages (Bind, ProxyHeader, encode_proxy_header, ...)
    "proto": "tunneld.core.proto",
    # errors
    "TunneldError": "tunneld.core._errors",
    "TunnelRejected": "tunneld.core._errors",
    "ConfigError": "tunneld.core._errors",
    "PluginError": "tunneld.core._errors",
    "RemoteProtocolError": "tunneld.core._errors",
    "Code": "tunneld.core._errors",
    "ERROR_HEADER": "tunneld.core._errors",
    # streams and sockets
    "forward": "tunneld.core._forward",
    "ByteCounts": "tunneld.core._forward",
    "CHUNK": "tunneld.core._forward",
    "RELAY_CHUNK": "tunneld.core._forward",
    "lean": "tunneld.core._lean",
    "close_forcefully": "tunneld.core._lean",
    "aclose_at_once": "tunneld.core._lean",
    "PrefixedStream": "tunneld.core._streams",
    "connect_tcp": "tunneld.core._util",
    "format_host_port": "tunneld.core._util",
    "local_addr": "tunneld.core._util",
    "open_listeners": "tunneld.core._util",
    "parse_local_addr": "tunneld.core._util",
    "peer_addr": "tunneld.core._util",
    "set_nodelay": "tunneld.core._util",
    "split_host_port": "tunneld.core._util",
}

__all__ = ["hookimpl", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if module.rsplit(".", 1)[-1] == name:
        value: Any = importlib.import_module(module)
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
