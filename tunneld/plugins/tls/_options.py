"""The tls tunnel type's settings: config keys and ``tunneld tls`` flags."""

from __future__ import annotations

from tunneld.plugin import NAME_OPTIONS, PROXY_PROTO_OPTION, TunnelOption

TLS_OPTIONS = (
    *NAME_OPTIONS,
    TunnelOption("crt", "--crt", "Certificate chain (PEM): the agent terminates TLS and forwards plaintext "
                 "to ADDR.", default="", requires=("key",), metavar="FILE"),
    TunnelOption("key", "--key", "Private key (PEM) of --crt.", default="", requires=("crt",),
                 metavar="FILE"),
    PROXY_PROTO_OPTION,
)

TLS_HELP = """Forward public TLS connections for a name to ADDR (a port or HOST:PORT), routed by SNI.

The edge does not decrypt: ADDR gets the client's TLS as is, unless --crt and --key are
given, in which case the agent terminates TLS with them and ADDR gets plaintext.

\b
Examples:
  tunneld tls 443 --subdomain mail
  tunneld tls 8080 --crt site.crt --key site.key
"""
