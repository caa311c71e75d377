"""Agent side of TLS tunnels: pass the client's TLS through, or terminate it with --crt/--key.

Without a certificate the proxy stream is relayed to the upstream byte for byte: the upstream
speaks TLS itself (HTTPS, IMAPS, ...) and sees the client's ClientHello, PROXY header first if
the tunnel asked for one.  With ``--crt``/``--key`` the agent runs the TLS handshake itself
(``BulkTLSStream``) and the upstream gets plaintext; a PROXY header is taken off the front
before the handshake and passed on to the upstream ahead of the plaintext.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio
from OpenSSL import SSL

from tunneld.plugin import (
    AgentTunnelContext,
    ConfigError,
    PrefixedStream,
    RemoteProtocolError,
    close_forcefully,
    forward,
    parse_local_addr,
    proto,
)
from tunneld.tlsutil import accept_tls, load_cert_key_pair, server_context

log = logging.getLogger("tunneld.tls")

#: Budget for the client's TLS handshake when the agent terminates.
HANDSHAKE_TIMEOUT = 10.0
#: Largest PROXY header the agent waits for (the edge writes at most 52 bytes).
MAX_PROXY_HEADER = 4096


def parse_tls_addr(addr: str) -> str:
    """``443`` → ``localhost:443``; ``host:port`` kept; ``tls://`` / ``tcp://`` prefixes accepted."""
    return parse_local_addr(addr, "tls", "tcp")


def termination_context(crt: str, key: str, *, crt_name: str = "--crt",
                        key_name: str = "--key") -> SSL.Context:
    """The server context for agent-side termination; ConfigError naming the option if the pair is bad."""
    crt_path, key_path = Path(os.path.expanduser(crt)), Path(os.path.expanduser(key))
    load_cert_key_pair(crt_path, key_path, cert_flag=crt_name, key_flag=key_name)
    try:
        return server_context(crt_path, key_path)
    except SSL.Error as exc:
        raise ConfigError(f"{crt_name}/{key_name}: OpenSSL cannot use {crt_path} with {key_path}: "
                          f"{exc}") from None


async def _take_proxy_header(stream: trio.abc.HalfCloseableStream) -> tuple[bytes, bytes]:
    """Read the PROXY header the edge put first: (header bytes, bytes that followed it)."""
    data = b""
    while (info := proto.parse_proxy_header(data)) is None:
        if len(data) > MAX_PROXY_HEADER:
            raise RemoteProtocolError("PROXY header too long")
        chunk = await stream.receive_some(MAX_PROXY_HEADER)
        if not chunk:
            raise RemoteProtocolError("stream ended inside the PROXY header")
        data += chunk
    return data[: info.length], data[info.length:]


async def serve_tls_stream(tunnel: AgentTunnelContext, stream: trio.abc.HalfCloseableStream,
                           header: proto.ProxyHeader, context: SSL.Context | None) -> None:
    """Serve one proxied TLS connection (``context``: terminate with it; None: pass through)."""
    if context is None:
        await tunnel.forward_to_upstream(stream, header)
        return
    prefix = b""
    transport: trio.abc.HalfCloseableStream = stream
    if tunnel.config.option("proxy_proto"):
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            prefix, rest = await _take_proxy_header(stream)
        transport = PrefixedStream(stream, rest)
    try:
        tls = await accept_tls(transport, context, timeout=HANDSHAKE_TIMEOUT)
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        log.info("tunnel %s: TLS handshake with %s failed: %s", tunnel.name, header.client_addr, exc)
        return
    try:
        upstream = await tunnel.open_upstream(stream, header)
        if upstream is None:
            return
        try:
            if prefix:
                await upstream.send_all(prefix)
            await forward(tls, upstream)
        finally:
            await close_forcefully(upstream)
    finally:
        await trio.aclose_forcefully(tls)
