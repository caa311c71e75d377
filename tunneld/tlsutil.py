"""TLS building blocks for plugins: pyOpenSSL contexts, handshakes, certificate checks.

A public module of the plugin API (see :mod:`tunneld.plugin`): the tls plugin terminates TLS
with these, the http plugin the public HTTPS port.  Streams are :class:`BulkTLSStream`, a
trio stream over a pyOpenSSL memory-BIO engine, several times faster than ``trio.SSLStream``
on bulk data.
"""

from __future__ import annotations

from tunneld.core._certs import certificate_names as certificate_names
from tunneld.core._certs import load_cert_key_pair as load_cert_key_pair
from tunneld.core._certs import name_matches as name_matches
from tunneld.core._tls import BulkTLSStream as BulkTLSStream
from tunneld.core._tls import accept_tls as accept_tls
from tunneld.core._tls import client_context as client_context
from tunneld.core._tls import open_tls_client as open_tls_client
from tunneld.core._tls import server_context as server_context

__all__ = [
    "BulkTLSStream",
    "accept_tls",
    "certificate_names",
    "client_context",
    "load_cert_key_pair",
    "name_matches",
    "open_tls_client",
    "server_context",
]
