"""TLS tunnels with ngrok's own clients: the Python SDK (``forward(proto="tls")``, with and
without PROXY protocol) and the 2.3.41 agent (``ngrok tls -subdomain``).

Skipped like the other interop tests unless ``bash .ci/install-ngrok-clients`` has run.
"""

from __future__ import annotations

import os
import ssl
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from tunneld.core import PrefixedStream, proto

from ..conftest import DOMAIN, EdgeEnv
from .test_ngrok_clients import agent_bin, free_port, py_sdk, run_client, run_sdk  # noqa: F401 - fixtures


class TlsEcho:
    """A TLS echo upstream with its own CA; records any PROXY header in front of the TLS."""

    def __init__(self, *, proxy: bool = False) -> None:
        self.ca = trustme.CA()
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(f"*.{DOMAIN}").configure_cert(self.ctx)
        self.proxy = proxy
        self.headers: list[proto.ProxyProtocolInfo] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> TlsEcho:
        async def handle(tcp: trio.SocketStream) -> None:
            transport: trio.abc.Stream = tcp
            if self.proxy:
                data = b""
                while (info := proto.parse_proxy_header(data)) is None:
                    chunk = await tcp.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                self.headers.append(info)
                transport = PrefixedStream(tcp, data[info.length:])
            stream = trio.SSLStream(transport, self.ctx, server_side=True)
            try:
                async for chunk in stream:
                    await stream.send_all(chunk)
            except trio.BrokenResourceError:
                pass

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return self

    async def roundtrip(self, env: EdgeEnv, host: str, payload: bytes) -> tuple[bytes, tuple[str, int]]:
        """Echo ``payload`` through the edge's HTTPS port with SNI ``host``; (echo, client address)."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        tcp = await trio.open_tcp_stream("127.0.0.1", env.https_port)
        me = tcp.socket.getsockname()
        stream = trio.SSLStream(tcp, ctx, server_hostname=host)
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            got += await stream.receive_some(65536)
        await stream.aclose()
        return got, (me[0], me[1])


@pytest.mark.parametrize("proxy_proto", ["", "1", "2"])
async def test_python_sdk_tls_tunnel(py_sdk: list[str], edge_env: EdgeEnv, nursery: trio.Nursery,  # noqa: F811
                                     proxy_proto: str) -> None:
    upstream = await TlsEcho(proxy=bool(proxy_proto)).start(nursery)
    options = {"proto": "tls", "domain": f"sdk{proxy_proto or 0}.{DOMAIN}"}
    if proxy_proto:
        options["proxy_proto"] = proxy_proto
    with trio.fail_after(30):
        async with run_sdk(py_sdk, edge_env, upstream.port, **options) as client:
            msg = await client.message()
            host = f"sdk{proxy_proto or 0}.{DOMAIN}"
            assert msg.get("url") == f"tls://{host}:{edge_env.https_port}", msg
            echo, me = await upstream.roundtrip(edge_env, host, b"through the official SDK")
            assert echo == b"through the official SDK"
    if proxy_proto:
        # The edge wrote the header, the SDK passed it on: the upstream sees the real client.
        assert [(h.version, h.source) for h in upstream.headers] == [(int(proxy_proto), me)]


async def test_agent_2_3_41_tls_tunnel(agent_bin: Path, edge_env: EdgeEnv, nursery: trio.Nursery,  # noqa: F811
                                       tmp_path: Path) -> None:
    upstream = await TlsEcho().start(nursery)
    web = free_port()
    config = tmp_path / "ngrok.yml"
    config.write_text(f"server_addr: {edge_env.agent_addr}\nroot_cas: {edge_env.ca}\n"
                      f"authtoken: {edge_env.token}\n"
                      f"web_addr: 127.0.0.1:{web}\nupdate_check: false\nconsole_ui: false\n"
                      f"log: {tmp_path / 'agent.log'}\nlog_format: logfmt\n")
    (tmp_path / "home").mkdir()
    env = {"HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    argv = [str(agent_bin), "tls", "-config", str(config), "-subdomain", "agent2",
            f"127.0.0.1:{upstream.port}"]
    host = f"agent2.{DOMAIN}"
    with trio.fail_after(30):
        async with run_client(argv, env=env):
            tunnels: list[dict[str, object]] = []
            async with httpx.AsyncClient(timeout=5) as api:
                while not tunnels:
                    try:
                        tunnels = (await api.get(f"http://127.0.0.1:{web}/api/tunnels")).json()["tunnels"]
                    except httpx.TransportError:
                        await trio.sleep(0.1)
            assert [(t["proto"], t["public_url"]) for t in tunnels] == [("tls", f"tls://{host}:{edge_env.https_port}")]
            echo, me = await upstream.roundtrip(edge_env, host, b"through the 2.x agent")
            assert echo == b"through the 2.x agent"
            log = (tmp_path / "agent.log").read_text()
            assert f"r=127.0.0.1:{me[1]}" in log  # the agent's own "join connections" line
