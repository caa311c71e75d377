"""TLS tunnels end to end: SNI routing on the HTTPS port, passthrough, agent termination,
PROXY headers (tcp and tls), refusals, the access log and its fail2ban filter.

Upstream certificates come from a trustme CA of their own, so a client that verifies one
proves it talked to the upstream (or to the agent's --crt), never to the edge.
"""

from __future__ import annotations

import configparser
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trustme
from click.testing import CliRunner

from tunneld._logging import JsonFormatter, LogfmtFormatter, TermFormatter
from tunneld.cli import cli
from tunneld.core import Agent, ConfigError, PrefixedStream, TunnelConfig, TunnelRejected, proto
from tunneld.core._web import tunnel_json
from tunneld.plugins.tls import _edge as tls_edge

from ..conftest import DOMAIN, EdgeEnv, start_echo_server
from .test_clienthello import as_records, build_hello, padding
from .test_http import Upstream, curl, http_tunnel

ROOT = Path(__file__).resolve().parents[2]


# ---- fixtures and helpers ------------------------------------------------------------------------


@attrs.define
class Pki:
    """A CA that is not the edge's, and a wildcard certificate under the edge's domain."""

    ca: trustme.CA
    ca_file: Path
    crt: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.crt), str(self.key))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert(f"*.{DOMAIN}")
    crt, key, ca_file = tmp_path / "up.crt", tmp_path / "up.key", tmp_path / "up-ca.pem"
    crt.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, ca_file, crt, key)


async def serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@attrs.define
class TlsUpstream:
    """A TLS line server: greets, then answers each line with ``echo: LINE``; records SNIs."""

    port: int = 0
    server_names: list[str | None] = attrs.field(factory=list)
    proxy_headers: list[proto.ProxyProtocolInfo] = attrs.field(factory=list)

    async def start(self, nursery: trio.Nursery, ctx: ssl.SSLContext, *, proxy: bool = False) -> TlsUpstream:
        ctx.sni_callback = lambda _obj, name, _ctx: self.server_names.append(name)  # type: ignore[assignment]

        async def handle(tcp: trio.SocketStream) -> None:
            transport: trio.abc.Stream = tcp
            if proxy:
                info, rest = await read_proxy_header(tcp)
                self.proxy_headers.append(info)
                transport = PrefixedStream(tcp, rest)
            stream = trio.SSLStream(transport, ctx, server_side=True)
            await line_service(stream)

        self.port = await serve(nursery, handle)
        return self


async def read_proxy_header(stream: trio.abc.ReceiveStream) -> tuple[proto.ProxyProtocolInfo, bytes]:
    data = b""
    while (info := proto.parse_proxy_header(data)) is None:
        chunk = await stream.receive_some(4096)
        assert chunk, "stream ended before the PROXY header"
        data += chunk
    return info, data[info.length:]


async def line_service(stream: trio.abc.Stream) -> None:
    """``hello\\n`` first, then ``echo: LINE\\n`` per line, until the client closes."""
    try:
        await stream.send_all(b"hello\n")
        buf = b""
        while data := await stream.receive_some(65536):
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                await stream.send_all(b"echo: " + line + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def tls_client(env: EdgeEnv, server_hostname: str | None, ctx: ssl.SSLContext) -> trio.SSLStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", env.https_port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_hostname, https_compatible=True)
    await stream.do_handshake()
    return stream


async def tls_tunnel(env: EdgeEnv, addr: int | str, **kw: object) -> tuple[Agent, str]:
    agent = await env.start_agent(TunnelConfig(name="secure", proto="tls", addr=str(addr), **kw))  # type: ignore[arg-type]
    url = agent.tunnels[0].public_url
    m = re.fullmatch(rf"tls://([a-z0-9-]+\.{re.escape(DOMAIN)}):{env.https_port}", url)
    assert m, url
    return agent, m.group(1)


async def talk(stream: trio.abc.Stream, line: bytes) -> bytes:
    assert await read_line(stream) == b"hello\n"
    await stream.send_all(line + b"\n")
    return await read_line(stream)


# ---- passthrough ---------------------------------------------------------------------------------


async def test_passthrough_end_to_end(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki) -> None:
    upstream = await TlsUpstream().start(nursery, pki.server_context())
    agent, host = await tls_tunnel(edge_env, upstream.port, subdomain="secure")
    assert host == f"secure.{DOMAIN}"
    assert agent.tunnels[0].proto == "tls"
    with trio.fail_after(10):
        # Verified against the upstream's own CA: the edge never terminated this TLS.
        client = await tls_client(edge_env, host, pki.client_context())
        assert await talk(client, b"ping") == b"echo: ping\n"
        await client.aclose()
    assert upstream.server_names == [host]


async def test_random_name_and_hostname(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki) -> None:
    upstream = await TlsUpstream().start(nursery, pki.server_context())
    _agent, random_host = await tls_tunnel(edge_env, upstream.port)
    assert re.fullmatch(rf"[0-9a-f]{{8}}\.{re.escape(DOMAIN)}", random_host)
    _agent, named = await tls_tunnel(edge_env, upstream.port, hostname=f"IMAPS.{DOMAIN}.")
    assert named == f"imaps.{DOMAIN}"
    with trio.fail_after(10):
        for host in (random_host, named):
            client = await tls_client(edge_env, host, pki.client_context())
            assert await talk(client, host.encode()) == b"echo: " + host.encode() + b"\n"
            await client.aclose()


async def test_custom_hostname_needs_no_edge_certificate(tmp_path: Path, nursery: trio.Nursery) -> None:
    """``tls --hostname app.example.org`` (CNAME to the edge): the upstream's certificate is
    the one clients see, so the edge needs none of its own for the name, unlike HTTPS."""
    from tunneld.core import Edge
    from tunneld.core._hostnames import AllowedHostname
    from tunneld.core._store import Store

    from ..conftest import make_edge_config

    store = Store.open(tmp_path)
    _rec, token = store.create_token("t")
    edge = Edge(make_edge_config(tmp_path, allowed_hostnames=(AllowedHostname("*.example.org"),)), store)
    info = await nursery.start(edge.serve)
    env = EdgeEnv(edge, info, store, token, tmp_path / "ca.pem", tmp_path, nursery)
    ca = trustme.CA()
    leaf = ca.issue_cert("app.example.org")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    upstream = await TlsUpstream().start(nursery, ctx)
    agent = await env.start_agent(TunnelConfig("c", "tls", str(upstream.port), hostname="app.example.org"))
    assert agent.tunnels[0].public_url == f"tls://app.example.org:{env.https_port}"
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(10):
        client = await tls_client(env, "app.example.org", client_ctx)
        assert await talk(client, b"custom") == b"echo: custom\n"
        await client.aclose()
    edge.shutdown()
    store.close()


async def test_https_and_tls_tunnels_share_the_port(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                    pki: Pki) -> None:
    """Same listener, same moment: one name is terminated by the edge, the other passed through."""
    tls_up = await TlsUpstream().start(nursery, pki.server_context())
    _agent, tls_host = await tls_tunnel(edge_env, tls_up.port)
    http_up = await Upstream("H").start(nursery)
    _agent, http_host = await http_tunnel(edge_env, http_up.port)
    port = edge_env.https_port
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            async def via_http(i: int) -> None:
                status, body = await curl("--cacert", str(edge_env.ca), "--resolve",
                                          f"{http_host}:{port}:127.0.0.1", f"https://{http_host}:{port}/hello")
                assert (status, body) == (200, b"hello from H\n")

            async def via_tls(i: int) -> None:
                client = await tls_client(edge_env, tls_host, pki.client_context())
                assert await talk(client, b"x%d" % i) == b"echo: x%d\n" % i
                await client.aclose()

            for i in range(5):
                n.start_soon(via_http, i)
                n.start_soon(via_tls, i)


async def test_https_upstream_through_curl(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki) -> None:
    """The seed's example: ``curl https://NAME`` reaches a local HTTPS server, its certificate intact."""
    ctx = pki.server_context()

    async def https(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        body = b"served by the upstream itself\n"
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        await stream.send_all(head + body)
        await stream.aclose()

    port = await serve(nursery, https)
    _agent, host = await tls_tunnel(edge_env, port, subdomain="web443")
    p = edge_env.https_port
    with trio.fail_after(15):
        status, body = await curl("--cacert", str(pki.ca_file), "--resolve", f"{host}:{p}:127.0.0.1",
                                  f"https://{host}:{p}/")
    assert (status, body) == (200, b"served by the upstream itself\n")


async def test_openssl_s_client(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki) -> None:
    """A TLS-wrapped line protocol, spoken by ``openssl s_client`` with verification on."""
    upstream = await TlsUpstream().start(nursery, pki.server_context())
    _agent, host = await tls_tunnel(edge_env, upstream.port)
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{edge_env.https_port}", "-servername", host,
           "-CAfile", str(pki.ca_file), "-verify_return_error", "-verify_hostname", host, "-quiet",
           "-no_ign_eof"]
    with trio.fail_after(15):
        proc = await trio.lowlevel.open_process(cmd, stdin=-1, stdout=-1, stderr=-1)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            assert await read_line(proc.stdout) == b"hello\n"
            await proc.stdin.send_all(b"over openssl\n")
            assert await read_line(proc.stdout) == b"echo: over openssl\n"
            await proc.stdin.aclose()
            assert await proc.wait() == 0
        finally:
            proc.kill()
            await proc.wait()


# ---- agent termination (--crt/--key) ----------------------------------------------------------------


async def test_agent_terminates_with_crt_and_key(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki) -> None:
    got: list[bytes] = []

    async def plain(stream: trio.SocketStream) -> None:
        await line_service(_Recording(stream, got))

    port = await serve(nursery, plain)
    _agent, host = await tls_tunnel(edge_env, port, crt=str(pki.crt), key=str(pki.key))
    with trio.fail_after(10):
        client = await tls_client(edge_env, host, pki.client_context())
        assert await talk(client, b"plain upstream") == b"echo: plain upstream\n"
        assert client.selected_alpn_protocol() is None
        await client.aclose()
    # The upstream saw plaintext, not a ClientHello.
    assert b"".join(got) == b"plain upstream\n"


class _Recording(trio.abc.Stream):
    def __init__(self, stream: trio.abc.Stream, log: list[bytes]) -> None:
        self.stream, self.log = stream, log

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.log.append(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def test_bad_crt_key_pair_fails_before_connecting(tmp_path: Path, pki: Pki) -> None:
    other = trustme.CA().issue_cert(f"x.{DOMAIN}")
    wrong_key = tmp_path / "wrong.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    # Nothing listens on the server address: the error must come before any connection.
    config = TunnelConfig(name="t", proto="tls", addr="443", crt=str(pki.crt), key=str(wrong_key))
    with pytest.raises(ConfigError, match=r"tunnels\.t\.key: .*does not match"):
        Agent(attrs.evolve(_agent_config(), server_addr="127.0.0.1:1"), [config])

    runner = CliRunner()
    result = runner.invoke(cli, ["tls", "443", "--crt", str(pki.crt), "--key", str(wrong_key),
                                 "--server-addr", "127.0.0.1:1", "--web-addr", "false"])
    assert result.exit_code == 1
    assert "--key: " in result.output and "does not match" in result.output
    result = runner.invoke(cli, ["tls", "443", "--crt", str(pki.crt)])
    assert result.exit_code == 2 and "--crt and --key go together" in result.output


def _agent_config() -> object:
    from tunneld.core import AgentConfig

    return AgentConfig(authtoken="x", web_addr=None)


# ---- refusals: no SNI, unknown SNI, junk, stalls -----------------------------------------------------


async def test_no_sni_gets_an_alert_and_a_log_line(edge_env: EdgeEnv,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ctx = ssl.create_default_context(cafile=str(edge_env.ca))
    ctx.check_hostname = False
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        await tls_client(edge_env, None, ctx)
    assert "HANDSHAKE_FAILURE" in str(info.value.__cause__)
    tls_lines = [r.getMessage() for r in caplog.records if r.name == "tunneld.tls"]
    assert any("sent no server name (SNI)" in m for m in tls_lines)
    assert any("result=no_sni" in r.getMessage() for r in caplog.records if r.name == "tunneld.access")


async def test_unknown_sni_gets_the_edge_404(edge_env: EdgeEnv) -> None:
    host = f"nobody.{DOMAIN}"
    with trio.fail_after(10):
        # Terminated by the edge, with the edge's certificate (its CA verifies it).
        client = await tls_client(edge_env, host, ssl.create_default_context(cafile=str(edge_env.ca)))
        await client.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await client.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 404 ")
    assert f"Tunnel {host} not found".encode() in data


async def closed_within(stream: trio.SocketStream, seconds: float) -> tuple[float, bytes]:
    """Seconds until the edge closed ``stream`` and what it sent before."""
    start = trio.current_time()
    got = b""
    with trio.fail_after(seconds):
        try:
            while data := await stream.receive_some(65536):
                got += data
        except trio.BrokenResourceError:
            pass
    return trio.current_time() - start, got


async def test_stalled_huge_and_garbage_clients_do_not_harm_others(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                                   pki: Pki) -> None:
    upstream = await TlsUpstream().start(nursery, pki.server_context())
    _agent, host = await tls_tunnel(edge_env, upstream.port)
    port = edge_env.https_port
    results: dict[str, tuple[float, bytes]] = {}

    async def stalled() -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(as_records(build_hello(padding(20)))[:20])  # part of a ClientHello, then silence
        results["stalled"] = await closed_within(s, tls_edge.HELLO_TIMEOUT + 2)

    async def huge() -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await s.send_all(as_records(build_hello(padding(20_000))))
        except trio.BrokenResourceError:
            pass
        results["huge"] = await closed_within(s, 2)

    async def garbage() -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"SSH-2.0-OpenSSH_9.6\r\n")
        results["garbage"] = await closed_within(s, 2)

    async def working() -> None:
        # Starts while the others are pending, and is served at once.
        await trio.sleep(0.2)
        start = trio.current_time()
        client = await tls_client(edge_env, host, pki.client_context())
        assert await talk(client, b"still fine") == b"echo: still fine\n"
        await client.aclose()
        results["working"] = (trio.current_time() - start, b"")

    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            for fn in (stalled, huge, garbage, working):
                n.start_soon(fn)
    assert results["working"][0] < 2
    assert tls_edge.HELLO_TIMEOUT - 0.5 <= results["stalled"][0] <= tls_edge.HELLO_TIMEOUT + 1.5
    assert results["stalled"][1] == b""
    assert results["huge"][0] < 1.5 and results["garbage"][0] < 1.5
    assert tls_edge.HELLO_TIMEOUT == 3.0  # ngrok's figure; the test above waited for the real one


# ---- names ---------------------------------------------------------------------------------------


async def refused(env: EdgeEnv, config: TunnelConfig) -> str:
    """The reason the edge refuses the tunnel ``config`` asks for."""
    with trio.fail_after(10), pytest.RaisesGroup(TunnelRejected, flatten_subgroups=True) as caught:
        await env.start_agent(config)
    err: BaseException = caught.value.exceptions[0]
    assert isinstance(err, TunnelRejected)
    return err.reason


async def test_one_name_cannot_be_http_and_tls(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    port = await start_echo_server(nursery)
    await edge_env.start_agent(TunnelConfig(name="web", proto="http", addr=str(port), subdomain="both"))
    reason = await refused(edge_env, TunnelConfig(name="t", proto="tls", addr=str(port), subdomain="both"))
    assert reason.startswith(f"tunnel t: both.{DOMAIN} is already in use by another tunnel (http")

    await edge_env.start_agent(TunnelConfig(name="t", proto="tls", addr=str(port), subdomain="first"))
    reason = await refused(edge_env, TunnelConfig(name="web", proto="http", addr=str(port),
                                                  subdomain="first"))
    assert reason == f"tunnel web: first.{DOMAIN} is already in use by another tunnel (tls://first.{DOMAIN})"
    reason = await refused(edge_env, TunnelConfig(name="t2", proto="tls", addr=str(port), subdomain="first"))
    assert reason == f"tunnel t2: tls://first.{DOMAIN} is already in use by another tunnel"


async def test_bind_options_checked(edge_env: EdgeEnv) -> None:
    from tunneld.core import MuxSession
    from tunneld.core._rpc import call
    from tunneld.core._tls import client_context, open_tls_client

    tls = await open_tls_client("127.0.0.1", edge_env.info.ports["agent"], client_context(edge_env.ca),
                                server_hostname="127.0.0.1")
    mux = MuxSession(tls, client=True)
    async with trio.open_nursery() as n:
        await n.start(mux.run)
        auth = await call(mux, proto.StreamType.AUTH, proto.Auth(version=["2"], extra=proto.AuthExtra(
            authtoken=edge_env.token)), proto.AuthResp)
        assert not auth.error
        for opts, error in [({"ProxyProto": 3}, "PROXY protocol version 3"),
                            ({"MutualTLSAtAgent": True}, "MutualTLSAtAgent"),
                            ({"TLSTermination": {"ServerCertificate": "x"}}, "TLSTermination"),
                            ({"Hostname": "evil.example.com"}, "not reserved for your account"),
                            ({"Subdomain": "www"}, "reserved")]:
            resp = await call(mux, proto.StreamType.BIND, proto.Bind(proto="tls", opts=opts), proto.BindResp)
            assert error in resp.error, (opts, resp.error)
        resp = await call(mux, proto.StreamType.BIND, proto.Bind(proto="tls", opts={"ProxyProto": 2}),
                          proto.BindResp)
        assert not resp.error and resp.url.startswith("tls://")
        await mux.aclose()
        n.cancel_scope.cancel()


# ---- PROXY protocol: the upstream learns the real client address ---------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kind", ["tcp", "tls", "tls+crt"])
async def test_proxy_protocol(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki, version: int,
                              kind: str) -> None:
    headers: list[proto.ProxyProtocolInfo] = []
    if kind == "tls":
        upstream = await TlsUpstream().start(nursery, pki.server_context(), proxy=True)
        port, headers = upstream.port, upstream.proxy_headers
    else:
        async def plain(tcp: trio.SocketStream) -> None:
            info, rest = await read_proxy_header(tcp)
            headers.append(info)
            await line_service(PrefixedStream(tcp, rest))

        port = await serve(nursery, plain)
    if kind == "tcp":
        agent = await edge_env.start_agent(TunnelConfig(name="t", proto="tcp", addr=str(port),
                                                        proxy_proto=version))
        public_port = int(agent.tunnels[0].public_url.rsplit(":", 1)[1])
        with trio.fail_after(10):
            client: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", public_port)
            me = client.socket.getsockname()  # type: ignore[attr-defined]
            assert await talk(client, b"who am i") == b"echo: who am i\n"
    else:
        extra = {"crt": str(pki.crt), "key": str(pki.key)} if kind == "tls+crt" else {}
        agent, host = await tls_tunnel(edge_env, port, proxy_proto=version, **extra)
        public_port = edge_env.https_port
        with trio.fail_after(10):
            client = await tls_client(edge_env, host, pki.client_context())
            me = client.transport_stream.socket.getsockname()  # type: ignore[attr-defined]
            assert await talk(client, b"who am i") == b"echo: who am i\n"
    await client.aclose()
    assert headers == [proto.ProxyProtocolInfo(version, (me[0], me[1]), ("127.0.0.1", public_port),
                                               headers[0].length)]
    # The agent shows the same public address, in its API and its log.
    record = agent.tunnels[0].metrics.recent[-1]
    assert record.client_addr == f"{me[0]}:{me[1]}"
    assert tunnel_json(agent.tunnels[0])["connections"][-1]["client_addr"] == f"{me[0]}:{me[1]}"


async def test_proxy_proto_config_and_cli_keys() -> None:
    from tunneld.core._config import parse_agent_config

    cfg = parse_agent_config("tunnels:\n  a:\n    proto: tls\n    addr: 443\n    proxy_proto: 2\n"
                             "    crt: c.pem\n    key: k.pem\n"
                             "  b:\n    proto: tcp\n    addr: 22\n    proxy_proto: '1'\n")
    a = cfg.tunnels["a"]
    assert (a.option("proxy_proto"), a.option("crt"), a.option("key")) == (2, "c.pem", "k.pem")
    assert cfg.tunnels["b"].option("proxy_proto") == 1
    for body, message in [
        ("    proto: tls\n    addr: 1\n    proxy_proto: 3\n", "line 5: tunnels.a.proxy_proto: expected 1 or"),
        ("    proto: http\n    addr: 1\n    proxy_proto: 1\n", "line 5: tunnels.a.proxy_proto: tunneld sup"),
        ("    proto: tcp\n    addr: 1\n    crt: x\n", "line 5: tunnels.a.crt: only tls tunnels"),
        ("    proto: tls\n    addr: 1\n    key: x\n", "line 5: tunnels.a.key: needs crt"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_agent_config("tunnels:\n  a:\n" + body)
    result = CliRunner().invoke(cli, ["tcp", "22", "--proxy-proto", "3"])
    assert result.exit_code == 2 and "expected 1 or 2" in result.output


# ---- the access log and its fail2ban filter ------------------------------------------------------------


def fail2ban_regexes() -> list[re.Pattern[str]]:
    """contrib/fail2ban/tunneld.conf's failregex lines, ``<HOST>`` expanded as fail2ban does.

    fail2ban (server/failregex.py, server/ipdns.py) turns ``<HOST>`` into an IPv4 / IPv6 /
    DNS alternation with the groups ip4, ip6 and dns.
    """
    ip4 = r"(?:\d{1,3}\.){3}\d{1,3}"
    ip6 = r"(?:[0-9a-fA-F]{1,4}::?|::){1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):)"
    addr = rf"\[?(?:(?:::f{{4,6}}:)?(?P<ip4>{ip4})|(?P<ip6>{ip6}))\]?"
    host = rf"(?:{addr}|(?P<dns>[\w\-.^_]*\w))"
    parser = configparser.ConfigParser()
    parser.read(ROOT / "contrib" / "fail2ban" / "tunneld.conf")
    lines = [line.strip() for line in parser.get("Definition", "failregex").splitlines() if line.strip()]
    assert lines
    return [re.compile(line.replace("<HOST>", host)) for line in lines]


def banned_address(regexes: list[re.Pattern[str]], line: str) -> str | None:
    for regex in regexes:
        m = regex.search(line)
        if m:
            return m.group("ip4") or m.group("ip6") or m.group("dns")
    return None


async def test_access_log_and_fail2ban_filter(edge_env: EdgeEnv, nursery: trio.Nursery, pki: Pki,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld.access")
    upstream = await TlsUpstream().start(nursery, pki.server_context())
    _agent, host = await tls_tunnel(edge_env, upstream.port)
    echo_port = await start_echo_server(nursery)
    tcp_agent = await edge_env.start_agent(TunnelConfig(name="t", proto="tcp", addr=str(echo_port)))
    tcp_port = int(tcp_agent.tunnels[0].public_url.rsplit(":", 1)[1])
    http_up = await Upstream("A").start(nursery)
    _agent, http_host = await http_tunnel(edge_env, http_up.port)
    p = edge_env.https_port
    with trio.fail_after(15):
        client = await tls_client(edge_env, host, pki.client_context())
        assert await talk(client, b"12345") == b"echo: 12345\n"
        await client.aclose()
        tcp = await trio.open_tcp_stream("127.0.0.1", tcp_port)
        await tcp.send_all(b"abc")
        await tcp.send_eof()
        assert await tcp.receive_some(10) == b"abc"
        await tcp.aclose()
        assert (await curl("--cacert", str(edge_env.ca), "--resolve", f"{http_host}:{p}:127.0.0.1",
                           f"https://{http_host}:{p}/hello"))[0] == 200
        status, _ = await curl("-H", f"Host: nobody.{DOMAIN}", f"http://127.0.0.1:{edge_env.http_port}/")
        assert status == 404
        junk = await trio.open_tcp_stream("127.0.0.1", p)
        await junk.send_all(b"\x16\x03\x01\x00\x00")
        await closed_within(junk, 2)
        ctx = ssl.create_default_context(cafile=str(edge_env.ca))
        ctx.check_hostname = False
        with pytest.raises(trio.BrokenResourceError):
            await tls_client(edge_env, None, ctx)
        # The access line is written when the connection's task ends.
        await _wait_for(caplog, lambda msgs: sum("proto=tcp" in m for m in msgs) == 1
                        and sum("proto=tls" in m for m in msgs) == 3)

    records = [r for r in caplog.records if r.name == "tunneld.access"]
    messages = [r.getMessage() for r in records]
    tls_ok = next(m for m in messages if "proto=tls" in m and "result=ok" in m)
    assert re.fullmatch(rf"client=127\.0\.0\.1:\d+ proto=tls host={re.escape(host)} tunnel=tn_\w+ "
                        rf"url=tls://{re.escape(host)}:{p} result=ok bytes_in=\d+ bytes_out=\d+ "
                        rf"duration_ms=[\d.]+", tls_ok), tls_ok
    # bytes_out: greeting + echo line; bytes_in: the client's TLS records, ClientHello included.
    assert int(re.search(r"bytes_in=(\d+)", tls_ok).group(1)) > 200  # type: ignore[union-attr]
    http_ok = next(m for m in messages if "status=200" in m)
    assert re.match(rf"client=127\.0\.0\.1:\d+ host={re.escape(http_host)} tunnel=tn_\w+ method=GET ",
                    http_ok), http_ok
    tcp_line = next(m for m in messages if "proto=tcp" in m)
    assert "result=ok bytes_in=3 bytes_out=3 " in tcp_line and f"url=tcp://{DOMAIN}:{tcp_port}" in tcp_line

    regexes = fail2ban_regexes()
    should_ban = {"status=404", "result=malformed", "result=no_sni"}
    seen = set()
    for record in records:
        message = record.getMessage()
        marker = next((m for m in should_ban if m in message), None)
        for formatter in (TermFormatter(), LogfmtFormatter(), JsonFormatter()):
            line = formatter.format(record)
            # fail2ban cuts the timestamp out of a line before matching; match both ways.
            for candidate in (line, re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", "", line)):
                got = banned_address(regexes, candidate)
                assert got == ("127.0.0.1" if marker else None), (candidate, got)
        seen.add(marker)
    assert seen >= should_ban  # each kind of failure was produced and matched
    # Basic auth failures (401) match as well, in every format.
    fake = logging.LogRecord("tunneld.access", logging.INFO, __file__, 0,
                             'client=%s host=%s tunnel=%s method=%s path="%s" status=%d duration_ms=%.1f',
                             ("[2001:db8::7]:4431", http_host, "tn_1", "GET", "/ status=200", 401, 1.0), None)
    for formatter in (TermFormatter(), LogfmtFormatter(), JsonFormatter()):
        assert banned_address(regexes, formatter.format(fake)) == "2001:db8::7"


async def _wait_for(caplog: pytest.LogCaptureFixture, done: Callable[[list[str]], bool]) -> None:
    # Polling: log records come from other tasks' finally blocks, which signal nothing.
    while not done([r.getMessage() for r in caplog.records if r.name == "tunneld.access"]):  # noqa: ASYNC110
        await trio.sleep(0.02)


def test_log_injection_cannot_frame_another_address() -> None:
    """A client controls the Host and the path, but never what precedes ``client=``."""
    regexes = fail2ban_regexes()
    record = logging.LogRecord("tunneld.access", logging.INFO, __file__, 0,
                               'client=%s host=%s tunnel=%s method=%s path="%s" status=%d duration_ms=%.1f',
                               ("192.0.2.1:5", "x", "tn_1", "GET", "/ client=203.0.113.9:1 status=404", 200,
                                1.0), None)
    for formatter in (TermFormatter(), LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert banned_address(regexes, line) in (None, "192.0.2.1"), line


def test_http_plugin_does_not_import_the_tls_plugin() -> None:
    import subprocess
    import sys

    code = ("import sys, tunneld.plugins.http\n"
            "assert not [m for m in sys.modules if m.startswith('tunneld.plugins.tls')]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_json_log_keeps_message_intact() -> None:
    # Guard for the filter's JSON anchor: the message is a JSON string after '"msg": "'.
    record = logging.LogRecord("tunneld.access", logging.INFO, __file__, 0, "client=%s", ("1.2.3.4:5",), None)
    assert json.loads(JsonFormatter().format(record))["msg"] == "client=1.2.3.4:5"
