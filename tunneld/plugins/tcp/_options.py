"""The tcp tunnel type's settings: config keys and ``tunneld tcp`` flags."""

from __future__ import annotations

from tunneld.plugin import PROXY_PROTO_OPTION, TunnelOption

TCP_OPTIONS = (
    TunnelOption("remote_addr", "--remote-addr", "Public HOST:PORT to ask for (within the edge's range).",
                 default="", metavar="HOST:PORT"),
    PROXY_PROTO_OPTION,
)

TCP_HELP = """Forward a public TCP port to ADDR (a port or HOST:PORT).

\b
Examples:
  tunneld tcp 22
  tunneld tcp 5432 --remote-addr tunnels.example.com:10022 --proxy-proto 2
"""
