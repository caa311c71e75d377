"""HTTP tunnel options end to end: basic auth, Host rewriting, HTTPS and remote upstreams,
schemes, WebSockets and their idle timer, limits, and 1 GiB transfers with bounded memory.

Like ``test_http.py``: a real edge and real agents on loopback, real clients (curl, httpx, the
``websockets`` package, raw sockets).  The 1 GiB test runs the edge and the agent as separate
``tunneld`` processes so that each one's peak RSS can be read from /proc.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing
import trustme
import websockets.exceptions
import websockets.sync.client
from click.testing import CliRunner

from tunneld.core import ERROR_HEADER, Agent, Code, TunnelConfig, TunnelRejected
from tunneld.core._config import ConfigError, parse_agent_config
from tunneld.core._web import tunnel_json
from tunneld.http1._wire import MAX_HEAD
from tunneld.plugins.http import _edge, _pool
from tunneld.plugins.http._agent import parse_http_addr, upstream_authority
from tunneld.plugins.http._auth import BasicAuth

from ..conftest import EdgeEnv
from ..interop.test_ngrok_clients import AGENT_BIN, JS_SDK, require
from .test_http import (
    OK,
    RawClient,
    Upstream,
    curl,
    host_of,
    request_bytes,
    scripted_upstream,
    ws_echo_server,
)

MiB = 1024 * 1024
ALICE = "alice:correct horse"
BOB = "bob:battery staple"


def options(tunnel: TunnelConfig, *keys: str) -> tuple[object, ...]:
    return tuple(tunnel.option(key) for key in keys)


def basic(credential: str) -> str:
    return "Basic " + base64.b64encode(credential.encode()).decode()


@attrs.define(eq=False)
class CountingUpstream(Upstream):
    """An :class:`Upstream` that also counts every connection it accepts."""

    connections: int = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        await super()._handle(stream)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    return await Upstream("A").start(nursery)


async def tunnel(env: EdgeEnv, addr: str, name: str = "web", **kw: Any) -> tuple[Agent, str]:
    """Start an agent with one HTTP tunnel to ``addr``; returns it and the public host."""
    agent = await env.start_agent(TunnelConfig(name=name, proto="http", addr=addr, **kw))
    return agent, host_of(agent, len(agent.tunnels) - 1)


# --------------------------------------------------------------------------------------------
# Basic auth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_basic_auth_enforced_at_the_edge(edge_env: EdgeEnv, nursery: trio.Nursery, scheme: str) -> None:
    upstream = await CountingUpstream("A").start(nursery)
    agent, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}", basic_auth=[ALICE, BOB])
    if scheme == "http":
        base, args = f"http://127.0.0.1:{edge_env.http_port}", ["-H", f"Host: {host}"]
    else:
        port = edge_env.https_port
        base = f"https://{host}:{port}"
        args = ["--cacert", str(edge_env.ca), "--resolve", f"{host}:{port}:127.0.0.1"]
    refused = [
        [],                                                    # no credentials
        ["-u", "alice:battery staple"],                        # another user's password
        ["-u", "alice:correct horsE"],                         # one character off
        ["-u", "alice:correct horse "],                        # one character more
        ["-u", "mallory:correct horse"],                       # unknown user
        ["-H", "Authorization: Basic !!!notbase64"],
        ["-H", "Authorization: Bearer " + base64.b64encode(ALICE.encode()).decode()],
        ["-H", f"Authorization: {basic(ALICE)}", "-H", f"Authorization: {basic(BOB)}"],
    ]
    with trio.fail_after(30):
        for extra in refused:
            proc = await trio.run_process(["curl", "-s", "-S", "-i", *args, *extra, f"{base}/hello"],
                                          capture_stdout=True, capture_stderr=True, check=False)
            head = proc.stdout.split(b"\r\n\r\n", 1)[0].decode().lower()
            assert head.startswith(("http/1.1 401", "http/2 401")), (extra, head)
            assert 'www-authenticate: basic realm="tunneld"' in head, head
            assert f"{ERROR_HEADER.lower()}: err_tunneld_3401" in head, head
        # Nothing reached the agent, let alone the upstream.
        assert [t.metrics.conns_count for t in agent.tunnels] == [0, 0]
        assert upstream.connections == 0

        for credential in (ALICE, BOB):
            status, body = await curl(*args, "-u", credential, f"{base}/hello")
            assert (status, body) == (200, b"hello from A\n")
        # The Authorization header is passed on (as ngrok does): the application may use it.
        status, body = await curl(*args, "-u", BOB, f"{base}/echo")
        assert ["authorization", basic(BOB)] in json.loads(body)["headers"]


async def test_basic_auth_checked_per_request_on_keep_alive(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    upstream = await Upstream("A").start(nursery)
    public = await Upstream("P").start(nursery)
    _, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}", basic_auth=[ALICE])
    _, open_host = await tunnel(edge_env, f"127.0.0.1:{public.port}", name="public")
    auth = [("Authorization", basic(ALICE))]
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        for _ in range(3):
            assert (await client.request("GET", "/hello", host, headers=auth)).status == 200
        # The same connection without credentials: refused, then closed.
        resp = await client.request("GET", "/hello", host)
        assert resp.status == 401 and resp.header(ERROR_HEADER) == "ERR_TUNNELD_3401"
        assert await client.at_eof()
        # A connection that starts on a public tunnel cannot carry on into the protected one.
        client = await RawClient.connect(edge_env.http_port)
        assert (await client.request("GET", "/hello", open_host)).body == b"hello from P\n"
        resp = await client.request("GET", "/hello", host)
        assert resp.status == 401
        assert await client.at_eof()
        # HEAD gets the 401 without a body, so the framing stays right.
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("HEAD", "/hello", host)
        assert resp.status == 401 and resp.body == b""
        await client.aclose()
    assert len(upstream.requests) == 3


async def test_basic_auth_never_logged_or_shown(edge_env: EdgeEnv, upstream: Upstream,
                                               caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-never-logged"
    credential = f"carol:{secret}"
    token = base64.b64encode(credential.encode()).decode()
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(10):
        agent, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}", basic_auth=[credential])
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/hello", host, headers=[("Authorization", f"Basic {token}")])
        assert resp.status == 200
        wrong = [("Authorization", "Basic d3Jvbmc6d3Jvbmc=")]
        resp = await client.request("GET", "/hello", host, headers=wrong)
        assert resp.status == 401
        await client.aclose()
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "status=401" in logged  # the access log ran, and recorded the refusal
    for tunnel_ in agent.tunnels:
        shown = json.dumps(tunnel_json(tunnel_)) + repr(tunnel_.config)
        assert secret not in shown
    assert secret not in logged and token not in logged


@pytest.mark.parametrize(("opts", "code"), [
    ({"Auth": "alice:short"}, Code.BASIC_AUTH_PASSWORD),
    ({"Auth": ":longenough"}, Code.BASIC_AUTH_USERNAME),
    ({"Auth": "nocolonatall"}, Code.BASIC_AUTH_PASSWORD),
    ({"Auth": "alice:" + "x" * 129}, Code.BASIC_AUTH_PASSWORD),
    ({"BasicAuth": {"credentials": [{"username": "bob", "cleartext_password": "1234567"}]}},
     Code.BASIC_AUTH_PASSWORD),
    ({"BasicAuth": {"credentials": [{"username": "", "cleartext_password": "12345678"}]}},
     Code.BASIC_AUTH_USERNAME),
    ({"BasicAuth": {"credentials": [{"username": "a:b", "cleartext_password": "12345678"}]}},
     Code.BASIC_AUTH_USERNAME),
    ({"BasicAuth": {"credentials": [{"username": "bob", "hashed_password": "AAAA"}]}},
     Code.OPTION_UNSUPPORTED),
    ({"BasicAuth": {"credentials": "bob:12345678"}}, Code.BIND_MALFORMED),
], ids=["short", "no-user", "no-colon", "long", "sdk-short", "sdk-no-user", "sdk-colon", "sdk-hashed",
        "sdk-malformed"])
async def test_bad_credentials_refused_at_bind(edge_env: EdgeEnv, upstream: Upstream, opts: dict[str, Any],
                                              code: Code) -> None:
    """A client that skips the agent's checks (or speaks the SDK shape) is refused by the edge."""
    agent = Agent(edge_env.agent_config(), [TunnelConfig(name="w", proto="http", addr=str(upstream.port),
                                                         schemes=["http"])])
    agent.tunnels[0].bind = attrs.evolve(agent.tunnels[0].bind, opts={**agent.tunnels[0].bind.opts, **opts})
    with trio.fail_after(10):
        with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, check=lambda e: e.code == code),
                                flatten_subgroups=True):
            await edge_env.nursery.start(agent.run)
    assert not edge_env.edge.routes.hosts  # no name was taken


async def test_sdk_basic_auth_shape_accepted(edge_env: EdgeEnv, upstream: Upstream) -> None:
    """ngrok SDKs' ``BasicAuth`` (and differently-cased keys) next to a v2 ``Auth``: all count."""
    agent = Agent(edge_env.agent_config(), [TunnelConfig(name="w", proto="http", addr=str(upstream.port),
                                                         schemes=["http"])])
    sdk = {"BasicAuth": {"Credentials": [
        {"username": "sdk", "cleartext_password": "sdk-password"},
        {"Username": "sdk2", "Cleartext_Password": "another-password"}]}, "Auth": "v2:v2-password"}
    agent.tunnels[0].bind = attrs.evolve(agent.tunnels[0].bind, opts={**agent.tunnels[0].bind.opts, **sdk})
    with trio.fail_after(10):
        await edge_env.nursery.start(agent.run)
        host = host_of(agent, 0)
        base = ["-H", f"Host: {host}", f"http://127.0.0.1:{edge_env.http_port}/hello"]
        for credential in ("sdk:sdk-password", "sdk2:another-password", "v2:v2-password"):
            assert (await curl("-u", credential, *base))[0] == 200
        assert (await curl("-u", "sdk:v2-password", *base))[0] == 401


def test_basic_auth_check_unit() -> None:
    """The check itself: exact matches only, every header shape a client may send."""
    auth = BasicAuth([ALICE, BOB, "ünï:cödé-pässwörd"])

    def hdrs(*values: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"Host", b"x")] + [(b"Authorization", v) for v in values]

    def token(credential: str) -> bytes:
        return base64.b64encode(credential.encode())

    for credential in (ALICE, BOB, "ünï:cödé-pässwörd"):
        assert auth.check(hdrs(b"Basic " + token(credential)))
    assert auth.check([(b"AUTHORIZATION", b"  basic   " + token(ALICE) + b" ")])
    assert not auth.check(hdrs())
    assert not auth.check(hdrs(b"Basic " + token(ALICE), b"Basic " + token(ALICE)))
    assert not auth.check(hdrs(b"Basic"))
    assert not auth.check(hdrs(b"Basic " + token(ALICE)[:-2]))
    assert not auth.check(hdrs(b"Digest " + token(ALICE)))
    assert not auth.check(hdrs(b"Basic " + base64.b64encode("ünï:cödé-pässwörd".encode("latin-1"))))
    assert not auth.check(hdrs(b"Basic " + b"A" * 5000))
    # Near misses: a weaker comparison (a prefix, a few bytes of the digest) would let some by.
    rng = random.Random(4)
    for _ in range(3000):
        i = rng.randrange(len(ALICE))
        wrong = ALICE[:i] + chr(rng.randrange(33, 127)) + ALICE[i + 1:]
        if wrong != ALICE:
            assert not auth.check(hdrs(b"Basic " + token(wrong)))
    assert "correct horse" not in repr(auth) and "alice" not in repr(auth)


def test_agent_bind_opts_wire_shape() -> None:
    """One credential goes out as v2's ``Auth`` string, several in the SDKs' ``BasicAuth`` shape."""
    from tunneld.plugins.http import HttpTunnelType

    one = HttpTunnelType().agent_binds(TunnelConfig(name="w", proto="http", addr="80", basic_auth=[ALICE]))
    assert [b.bind.opts["Auth"] for b in one] == [ALICE, ALICE]
    assert all("BasicAuth" not in b.bind.opts for b in one)
    two = HttpTunnelType().agent_binds(TunnelConfig(name="w", proto="http", addr="80",
                                                    basic_auth=[ALICE, BOB], host_header="rewrite"))
    assert two[0].bind.opts["Auth"] == ""
    assert two[0].bind.opts["BasicAuth"] == {"credentials": [
        {"username": "alice", "cleartext_password": "correct horse"},
        {"username": "bob", "cleartext_password": "battery staple"}]}
    assert two[0].bind.opts["HostHeaderRewrite"] is True
    none = HttpTunnelType().agent_binds(TunnelConfig(name="w", proto="http", addr="80"))
    assert none[0].bind.opts["Auth"] == "" and none[0].bind.opts["HostHeaderRewrite"] is False


# --------------------------------------------------------------------------------------------
# Command line and config file
# --------------------------------------------------------------------------------------------


@pytest.fixture
def captured_tunnels(monkeypatch: pytest.MonkeyPatch) -> list[TunnelConfig]:
    """Tunnels the CLI would start (the agent itself is not run)."""
    import tunneld.cli

    seen: list[TunnelConfig] = []
    monkeypatch.setattr(tunneld.cli, "_run_agent_cli", lambda cfg, tunnels, *a: seen.extend(tunnels))
    return seen


def test_cli_http_options(captured_tunnels: list[TunnelConfig], tmp_path: Path) -> None:
    from tunneld.cli import cli

    runner = CliRunner()
    (tmp_path / "empty.yml").write_text("")
    cfg = ["--config", str(tmp_path / "empty.yml")]
    result = runner.invoke(cli, ["http", "8080", *cfg, "--basic-auth", ALICE, "--basic-auth", BOB,
                                 "--host-header=rewrite", "--scheme", "https"])
    assert result.exit_code == 0, result.output
    (t,) = captured_tunnels
    assert options(t, "basic_auth", "host_header", "schemes") == ([ALICE, BOB], "rewrite", ["https"])
    result = runner.invoke(cli, ["http", "8080", *cfg, "--host-header", "example.test:8080",
                                 "--schemes", "http"])
    assert result.exit_code == 0, result.output
    assert options(captured_tunnels[1], "host_header", "schemes") == ("example.test:8080", ["http"])

    for bad, code in [("alice:short", "ERR_TUNNELD_360"), ("alice", "ERR_TUNNELD_359"),
                      (":longenough", "ERR_TUNNELD_359")]:
        result = runner.invoke(cli, ["http", "8080", *cfg, "--basic-auth", bad])
        assert result.exit_code == 2
        assert "--basic-auth" in result.output and code in result.output
        assert bad.partition(":")[2] not in result.output or not bad.partition(":")[2]
    result = runner.invoke(cli, ["http", "8080", *cfg, "--host-header", "bad value"])
    assert result.exit_code == 2 and "--host-header" in result.output
    assert len(captured_tunnels) == 2


def test_config_keys_v2_and_v3() -> None:
    cfg = parse_agent_config(
        "version: 2\n"
        "tunnels:\n"
        "  v3:\n"
        "    proto: http\n"
        "    addr: 8080\n"
        f"    basic_auth: ['{ALICE}', '{BOB}']\n"
        "    host_header: rewrite\n"
        "    schemes: [https]\n"
        "  v2:\n"
        "    proto: http\n"
        "    addr: 8081\n"
        f"    auth: '{ALICE}'\n"
        "    host_header: example.test\n"
        "    bind_tls: false\n"
        "  plain:\n"
        "    proto: http\n"
        "    addr: 8082\n"
        "    host_header: preserve\n")
    v3, v2, plain = cfg.tunnels["v3"], cfg.tunnels["v2"], cfg.tunnels["plain"]
    assert options(v3, "basic_auth", "host_header", "schemes") == ([ALICE, BOB], "rewrite", ["https"])
    assert options(v2, "basic_auth", "host_header", "schemes") == ([ALICE], "example.test", ["http"])
    assert options(plain, "basic_auth", "host_header") == ([], "")


@pytest.mark.parametrize(("snippet", "line", "message"), [
    ("    basic_auth: ['alice:short']", 5, "tunnels.web.basic_auth: a basic auth password must be 8 to 128"),
    ("    basic_auth:\n      - 'alice:long enough'\n      - ':nouser12'", 7, "username must be 1 to 128"),
    ("    basic_auth: 'alice:long enough'", 5, "expected a list"),
    ("    auth: 'alice'", 5, "tunnels.web.auth: basic auth credentials must look like USERNAME:PASSWORD"),
    ("    host_header: 'two words'", 5, "tunnels.web.host_header: 'two words' is not a valid Host"),
    ("    host_header: [a]", 5, "expected a single value"),
])
def test_config_errors_name_key_and_line(snippet: str, line: int, message: str) -> None:
    text = f"tunnels:\n  web:\n    proto: http\n    addr: 8080\n{snippet}\n"
    with pytest.raises(ConfigError) as info:
        parse_agent_config(text, Path("t.yml"))
    assert f"t.yml line {line}: " in str(info.value) and message in str(info.value)
    assert "long enough" not in str(info.value)


def test_config_http_options_refused_on_tcp_tunnels() -> None:
    """A tcp tunnel 'with basic auth' would be wide open: the option is refused, never ignored."""
    for key in ("basic_auth: ['alice:long enough']", "auth: 'alice:long enough'", "host_header: rewrite"):
        with pytest.raises(ConfigError, match=r"line 5: tunnels.ssh.\w+: only http tunnels"):
            parse_agent_config(f"tunnels:\n  ssh:\n    proto: tcp\n    addr: 22\n    {key}\n")


# --------------------------------------------------------------------------------------------
# Host header
# --------------------------------------------------------------------------------------------


def seen_headers(resp_body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in json.loads(resp_body)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_host_header_preserve_rewrite_and_literal(edge_env: EdgeEnv, upstream: Upstream) -> None:
    addr = f"127.0.0.1:{upstream.port}"
    _, kept = await tunnel(edge_env, addr, name="kept")
    _, rewritten = await tunnel(edge_env, addr, name="rw", host_header="rewrite")
    _, literal = await tunnel(edge_env, addr, name="lit", host_header="app.example:8443")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        for host, want in [(kept, None), (rewritten, addr), (literal, "app.example:8443")]:
            public = f"{host}:{edge_env.http_port}"
            headers = seen_headers((await client.request("GET", "/echo", public)).body)
            assert headers["host"] == [want or public]  # exactly one Host
            # The public name is still there for the application to find.
            assert headers["x-forwarded-host"] == [public]
        await client.aclose()


def test_rewrite_host_is_the_upstreams_authority() -> None:
    """--host-header=rewrite sends the forwarding address' host, and its port unless default."""
    assert upstream_authority(parse_http_addr("site.test:80")) == "site.test"
    assert upstream_authority(parse_http_addr("site.test:8080")) == "site.test:8080"
    assert upstream_authority(parse_http_addr("443")) == "localhost"
    assert upstream_authority(parse_http_addr("https://Site.Test:8443")) == "site.test:8443"
    assert upstream_authority(parse_http_addr("[::1]:8080")) == "[::1]:8080"


async def test_host_rewrite_maps_redirects_back(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """Absolute redirects to the rewritten Host point back at the public URL; others are kept."""
    replies: list[bytes] = []
    # The redirects name the upstream's own port: start it, then write its replies.
    port = await scripted_upstream(nursery, replies)
    for target in (f"http://127.0.0.1:{port}/login?next=/", f"HTTPS://127.0.0.1:{port}",
                   f"http://127.0.0.1:{port}0/other-port", "https://elsewhere.test/x", "/relative"):
        replies.append(f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode())
    _, host = await tunnel(edge_env, f"127.0.0.1:{port}", host_header="rewrite")
    public = f"{host}:{edge_env.http_port}"
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        locations = [(await client.request("GET", "/", public)).header("Location") for _ in replies]
        await client.aclose()
    assert locations == [f"http://{public}/login?next=/", f"http://{public}", f"http://127.0.0.1:{port}0/other-port",
                         "https://elsewhere.test/x", "/relative"]


# --------------------------------------------------------------------------------------------
# Upstreams: HTTPS, other addresses and names
# --------------------------------------------------------------------------------------------


def test_parse_forwarding_addresses() -> None:
    assert parse_http_addr("8080") == "http://localhost:8080"
    assert parse_http_addr("443") == "https://localhost:443"
    assert parse_http_addr("192.168.1.2:80") == "http://192.168.1.2:80"
    assert parse_http_addr("192.168.1.2:443") == "https://192.168.1.2:443"
    assert parse_http_addr("example.internal:8080") == "http://example.internal:8080"
    assert parse_http_addr("example.internal") == "http://example.internal:80"
    assert parse_http_addr("[::1]:8080") == "http://[::1]:8080"
    assert parse_http_addr("https://localhost:8443") == "https://localhost:8443"
    assert parse_http_addr("https://example.internal") == "https://example.internal:443"
    assert parse_http_addr("http://localhost:443") == "http://localhost:443"  # forced plain HTTP
    for bad in ("", "ftp://x", "localhost:0", "localhost:70000", "http://:80"):
        with pytest.raises(ValueError):
            parse_http_addr(bad)


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


async def https_upstream(nursery: trio.Nursery, ca: trustme.CA,
                         names: list[str]) -> tuple[int, list[str | None]]:
    """An HTTPS server answering every request with the SNI it was reached by."""
    cert = ca.issue_cert(*names)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    snis: list[str | None] = []

    def record_sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        snis.append(name)

    ctx.sni_callback = record_sni  # type: ignore[assignment]

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    body = f"tls ok, Host {dict(event.headers)[b'host'].decode()}".encode()
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                        ("Content-Length", str(len(body)))])) + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage()))
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return

    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, handle, 0, ctx, host="127.0.0.1"))
    return int(listeners[0].transport_listener.socket.getsockname()[1]), snis


async def test_https_upstream_not_verified(edge_env: EdgeEnv, nursery: trio.Nursery,
                                           upstream_ca: trustme.CA) -> None:
    """https:// upstreams get TLS with SNI; a certificate of an unknown CA, for another name, is accepted."""
    port, snis = await https_upstream(nursery, upstream_ca, ["not-this-name.test"])
    _, host = await tunnel(edge_env, f"https://localhost:{port}", host_header="rewrite")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        for _ in range(2):  # the second one on the kept-alive TLS connection
            resp = await client.request("GET", "/", host)
            assert (resp.status, resp.body) == (200, f"tls ok, Host localhost:{port}".encode())
        await client.aclose()
        assert snis == ["localhost"]

        # The same server named as plain http://: its TLS alert is no HTTP response.
        _, plain = await tunnel(edge_env, f"http://127.0.0.1:{port}", name="plain")
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/", plain)
        assert resp.status == 502
        assert resp.header(ERROR_HEADER) in ("ERR_TUNNELD_3004", "ERR_TUNNELD_8012")
        await client.aclose()


async def test_https_upstream_connection_serves_the_next_public_connections(
        edge_env: EdgeEnv, nursery: trio.Nursery, upstream_ca: trustme.CA) -> None:
    """The TLS connection to an https:// upstream is parked between public connections: one
    handshake for all of them (see ``_pool``)."""
    port, snis = await https_upstream(nursery, upstream_ca, ["localhost"])
    _, host = await tunnel(edge_env, f"https://localhost:{port}")
    with trio.fail_after(10):
        for _ in range(4):
            client = await RawClient.connect(edge_env.http_port)
            resp = await client.request("GET", "/", host, headers=[("Connection", "close")])
            assert resp.status == 200 and resp.header("Connection") == "close"
            await client.aclose()
    assert snis == ["localhost"]


async def test_stray_ciphertext_keeps_an_https_upstream_connection_from_the_pool(
        edge_env: EdgeEnv, nursery: trio.Nursery, upstream_ca: trustme.CA) -> None:
    """An upstream that answers one request twice: the second answer, still encrypted in the
    TLS layer's buffer when the first ended, must never reach the next public client.

    The first response fills one TLS record exactly and the stray one follows in a second
    record of the same socket write, so the agent decrypts the first only: its socket is not
    readable and its reader's buffer is empty, yet the connection is not clean.
    """
    cert = upstream_ca.issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    connections = 0
    record = 16384  # the largest TLS record's plaintext

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        nonlocal connections
        connections += 1
        first, buf = connections == 1, b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                buf = buf.split(b"\r\n\r\n", 1)[1]
                if first:
                    first = False
                    head, size = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", record
                    while len(head % size) + size > record:
                        size -= 1
                    answer = head % size + b"a" * size
                    assert len(answer) == record
                    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
                    await stream.send_all(answer + stray)
                else:
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        except trio.BrokenResourceError:
            return

    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, handle, 0, ctx, host="127.0.0.1"))
    port = int(listeners[0].transport_listener.socket.getsockname()[1])
    _, host = await tunnel(edge_env, f"https://localhost:{port}")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        resp = await client.request("GET", "/", host, headers=[("Connection", "close")])
        assert resp.status == 200 and resp.body == b"a" * len(resp.body) and len(resp.body) > 16000
        await client.aclose()
        for _ in range(2):
            client = await RawClient.connect(edge_env.http_port)
            resp = await client.request("GET", "/", host, headers=[("Connection", "close")])
            assert (resp.status, resp.body) == (200, b"fresh")
            await client.aclose()
    assert connections == 2  # the tainted connection was dropped; the clean one was reused


def test_a_tls_stream_whose_buffers_cannot_be_seen_is_not_known_clean() -> None:
    """Should trio keep an SSLStream's buffers elsewhere one day, its connections are no
    longer parked rather than parked unchecked."""
    ours, _ = trio.testing.memory_stream_pair()
    tls = trio.SSLStream(ours, ssl.create_default_context(), server_hostname="localhost")
    assert not _pool._tls_holds_bytes(tls) and not _pool._tls_holds_bytes(ours)
    del tls._incoming
    assert _pool._tls_holds_bytes(tls)


async def test_forward_to_other_addresses_and_names(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """Upstreams named by another address or by a host name (all loopback here)."""
    other = Upstream("other")
    listeners = await nursery.start(partial(trio.serve_tcp, other._handle, 0, host="127.0.0.2"))
    other_port = int(listeners[0].socket.getsockname()[1])
    named = await Upstream("named").start(nursery)
    cases = [(f"127.0.0.2:{other_port}", b"hello from other\n"),
             (f"http://127.0.0.2:{other_port}", b"hello from other\n"),
             (f"localhost:{named.port}", b"hello from named\n"),
             (f"http://{socket.gethostname()}:{named.port}", b"hello from named\n")]
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), 80)}
    except socket.gaierror:
        resolved = set()
    if not resolved or not resolved <= {"127.0.0.1", "::1"}:
        cases.pop()  # this machine's name is not a loopback one: nothing may leave loopback
    with trio.fail_after(15):
        for i, (addr, want) in enumerate(cases):
            _, host = await tunnel(edge_env, addr, name=f"t{i}")
            client = await RawClient.connect(edge_env.http_port)
            resp = await client.request("GET", "/hello", host)
            assert (resp.status, resp.body) == (200, want), addr
            await client.aclose()


# --------------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("only", ["http", "https"])
async def test_only_the_chosen_scheme_exists(edge_env: EdgeEnv, upstream: Upstream, only: str) -> None:
    agent, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}", schemes=[only])
    assert [t.public_url.split("://")[0] for t in agent.tunnels] == [only]
    port = edge_env.http_port if only == "http" else edge_env.https_port
    other_port = edge_env.https_port if only == "http" else edge_env.http_port
    tls = ["--cacert", str(edge_env.ca)]
    with trio.fail_after(10):
        other = {"http": "https", "https": "http"}[only]
        for scheme, p, want in [(only, port, 200), (other, other_port, 404)]:
            proc = await trio.run_process(["curl", "-s", "-i", *tls, "--resolve", f"{host}:{p}:127.0.0.1",
                                           f"{scheme}://{host}:{p}/hello"], capture_stdout=True)
            head = proc.stdout.split(b"\r\n\r\n", 1)[0].decode().lower()
            assert head.startswith(f"http/1.1 {want}"), head
            if want == 404:
                assert f"{ERROR_HEADER.lower()}: err_tunneld_3200" in head


# --------------------------------------------------------------------------------------------
# WebSockets (the `websockets` package as the client; trio-websocket as the upstream)
# --------------------------------------------------------------------------------------------


def ws_connect(env: EdgeEnv, host: str, scheme: str = "http") -> websockets.sync.client.ClientConnection:
    """A websockets client reaching ``host`` through the edge at 127.0.0.1 (pings off: idle is idle)."""
    port = env.http_port if scheme == "http" else env.https_port
    sock = socket.create_connection(("127.0.0.1", port))
    ctx = ssl.create_default_context(cafile=str(env.ca)) if scheme == "https" else None
    url = f"{'ws' if scheme == 'http' else 'wss'}://{host}:{port}/chat"
    return websockets.sync.client.connect(url, sock=sock, ssl=ctx, ping_interval=None, open_timeout=15,
                                          close_timeout=2, max_size=4 * MiB)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_websockets_client_through_tunnel(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                scheme: str) -> None:
    ws_port = await ws_echo_server(nursery)
    _, host = await tunnel(edge_env, f"127.0.0.1:{ws_port}", basic_auth=[ALICE])
    big = os.urandom(MiB - 64)

    def talk() -> None:
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            ws_connect(edge_env, host, scheme)  # no credentials: the 401 comes before any upgrade
        assert info.value.response.status_code == 401
        port = edge_env.http_port if scheme == "http" else edge_env.https_port
        sock = socket.create_connection(("127.0.0.1", port))
        ctx = ssl.create_default_context(cafile=str(edge_env.ca)) if scheme == "https" else None
        url = f"{'ws' if scheme == 'http' else 'wss'}://{ALICE.replace(' ', '%20')}@{host}:{port}/chat"
        with websockets.sync.client.connect(url, sock=sock, ssl=ctx, ping_interval=None, open_timeout=15,
                                            max_size=4 * MiB) as ws:
            ws.send("hello")
            assert ws.recv(timeout=15) == "hello"
            ws.send(big)
            assert ws.recv(timeout=15) == big
            for i in range(50):
                ws.send(f"m{i}")
            assert [ws.recv(timeout=15) for _ in range(50)] == [f"m{i}" for i in range(50)]

    with trio.fail_after(30):
        await trio.to_thread.run_sync(talk)


async def test_idle_websocket_outlives_the_http_timers(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Upgraded connections have their own idle timer, not the head or keep-alive ones."""
    assert (_edge.HEAD_TIMEOUT, _edge.IDLE_TIMEOUT) == (10.0, 300.0)
    assert _edge.UPGRADED_IDLE_TIMEOUT >= 300  # no idle WebSocket is cut before 5 minutes
    ws_port = await ws_echo_server(nursery)
    _, host = await tunnel(edge_env, f"127.0.0.1:{ws_port}")
    monkeypatch.setattr(_edge, "HEAD_TIMEOUT", 0.2)
    monkeypatch.setattr(_edge, "IDLE_TIMEOUT", 0.2)

    def survives_idle() -> None:
        with ws_connect(edge_env, host) as ws:
            ws.send("before")
            assert ws.recv(timeout=15) == "before"
            time.sleep(1.0)  # five times the (patched) head and keep-alive timers
            ws.send("after")
            assert ws.recv(timeout=15) == "after"

    with trio.fail_after(20):
        await trio.to_thread.run_sync(survives_idle)

    # The timer that does apply: patched down, it reaps an idle socket, but not a busy one.
    monkeypatch.setattr(_edge, "UPGRADED_IDLE_TIMEOUT", 0.5)

    def reaped_when_idle() -> float:
        with ws_connect(edge_env, host) as ws:
            ws.send("x")
            assert ws.recv(timeout=15) == "x"
            start = time.monotonic()
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                ws.recv(timeout=15)
            return time.monotonic() - start

    def kept_while_busy() -> None:
        with ws_connect(edge_env, host) as ws:
            for i in range(8):  # 1.6 s in all, never 0.5 s quiet
                ws.send(f"tick {i}")
                assert ws.recv(timeout=15) == f"tick {i}"
                time.sleep(0.2)

    with trio.fail_after(20):
        waited = await trio.to_thread.run_sync(reaped_when_idle)
        assert 0.4 < waited < 3
        await trio.to_thread.run_sync(kept_while_busy)


# --------------------------------------------------------------------------------------------
# Limits and timers
# --------------------------------------------------------------------------------------------


def head_of_size(size: int, host: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    """A GET head of exactly ``size`` bytes (padded with one large header)."""
    base = request_bytes("GET", "/echo", host, headers=[*(headers or []), ("X-Pad", "")])
    pad = size - len(base)
    assert pad >= 0
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * pad)


async def test_head_of_exactly_max_head_passes(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """The client gets the whole 1 MiB, although the edge adds X-Forwarded-* on the way."""
    upstream = await CountingUpstream("A").start(nursery)
    _, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}")
    with trio.fail_after(15):
        client = await RawClient.connect(edge_env.http_port)
        # A client's own X-Forwarded-For is kept and appended to: the head grows further.
        head = head_of_size(MAX_HEAD, host, [("X-Forwarded-For", "192.0.2.1")])
        assert len(head) == MAX_HEAD
        await client.send(head)
        resp = await client.read_response()
        assert resp.status == 200, (resp.status, resp.header(ERROR_HEADER))
        headers = seen_headers(resp.body)
        assert len(headers["x-pad"][0]) > MAX_HEAD - 200
        assert headers["x-forwarded-for"] == ["192.0.2.1, 127.0.0.1"]
        # One byte more: 431 from the edge; the upstream saw nothing new.
        await client.send(head_of_size(MAX_HEAD + 1, host))
        resp = await client.read_response()
        assert (resp.status, resp.header(ERROR_HEADER)) == (431, "ERR_TUNNELD_3431")
        await client.aclose()
    assert upstream.connections == 1 and len(upstream.requests) == 1


async def test_idle_keep_alive_closed(edge_env: EdgeEnv, upstream: Upstream,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert _edge.IDLE_TIMEOUT == 300.0  # five minutes, like ngrok's keep-alive
    monkeypatch.setattr(_edge, "IDLE_TIMEOUT", 0.5)
    _, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        assert (await client.request("GET", "/hello", host)).status == 200
        await trio.sleep(0.3)  # shorter than the timer: still open
        assert (await client.request("GET", "/hello", host)).status == 200
        start = trio.current_time()
        assert await client.at_eof()  # closed without a byte (no 408 to a keep-alive client)
        assert 0.4 < trio.current_time() - start < 3


async def test_slowloris_trickle_cut(edge_env: EdgeEnv, nursery: trio.Nursery,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The head timer is a budget for the whole head: a byte now and then does not extend it."""
    monkeypatch.setattr(_edge, "HEAD_TIMEOUT", 0.6)
    upstream = await CountingUpstream("A").start(nursery)
    _, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}")
    data = request_bytes("GET", "/hello", host, headers=[("X-Slow", "x" * 100)])
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        start = trio.current_time()

        async def trickle() -> None:
            try:
                for i in range(len(data) - 1):
                    await client.send(data[i:i + 1])
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as n:
            n.start_soon(trickle)
            resp = await client.read_response()
            n.cancel_scope.cancel()
        assert (resp.status, resp.header(ERROR_HEADER)) == (408, "ERR_TUNNELD_3408")
        assert 0.5 < trio.current_time() - start < 3
    assert upstream.connections == 0


@pytest.mark.parametrize("head", [
    b"GET /\x01 HTTP/1.1\r\nHost: {host}\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\nX-Bad: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\n Folded: header\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: {host}\r\n\r\n",
], ids=["ctl-in-target", "nul-in-value", "obs-fold", "te-not-chunked", "two-lengths", "http2-line"])
async def test_malformed_request_never_reaches_upstream(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                        head: bytes) -> None:
    upstream = await CountingUpstream("A").start(nursery)
    agent, host = await tunnel(edge_env, f"127.0.0.1:{upstream.port}")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(head.replace(b"{host}", host.encode()))
        resp = await client.read_response()
        assert resp.status in (400, 505)
        assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3400"
        assert await client.at_eof()
    assert [t.metrics.conns_count for t in agent.tunnels] == [0, 0]
    assert upstream.connections == 0


async def test_slow_upstream_is_streamed_not_timed_out(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow answer is waited for (the head timer is the client's), and streamed as it comes."""
    monkeypatch.setattr(_edge, "HEAD_TIMEOUT", 0.2)
    monkeypatch.setattr(_edge, "IDLE_TIMEOUT", 0.2)
    go_on = trio.Event()

    async def slow(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        await trio.sleep(0.8)  # thinks for longer than the patched timers
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await go_on.wait()  # the rest only once the client has shown it has the first part
        await stream.send_all(b"4\r\nlast\r\n0\r\nX-Trailer: done\r\n\r\n")
        await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, slow, 0, host="127.0.0.1"))
    _, host = await tunnel(edge_env, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    with trio.fail_after(10):
        client = await RawClient.connect(edge_env.http_port)
        await client.send(request_bytes("GET", "/", host))
        while b"first\r\n" not in client.buf:
            assert await client._fill()
        go_on.set()
        resp = await client.read_response()
        assert (resp.status, resp.body) == (200, b"firstlast")
        assert b"X-Trailer: done" not in client.buf  # the trailer was consumed as part of the body
        await client.aclose()


async def test_connection_header_decides_keep_alive(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """Keep-alive follows the client's Connection header and the response framing, whatever
    the upstream says (regression: llhttp forgets Connection once a body-less message ends)."""
    found = b"HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n"
    created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    port = await scripted_upstream(nursery, [OK, found, created, OK] * 3)
    _, host = await tunnel(edge_env, f"127.0.0.1:{port}")
    with trio.fail_after(10):
        # Empty bodies (Content-Length: 0) keep the connection.
        client = await RawClient.connect(edge_env.http_port)
        assert [(await client.request("GET", "/", host)).status for _ in range(4)] == [200, 302, 201, 200]
        await client.aclose()
        # HTTP/1.0 asking for keep-alive gets it, though the upstream speaks 1.1.
        client = await RawClient.connect(edge_env.http_port)
        statuses = [(await client.request("GET", "/", host, version="1.0",
                                          headers=[("Connection", "keep-alive")])).status for _ in range(2)]
        assert statuses == [200, 302]  # the upstream's answers to a connection's 1st and 2nd request
        # HTTP/1.1 asking to close is closed after the answer, though the upstream would keep it.
        resp = await client.request("GET", "/", host, headers=[("Connection", "close")])
        assert resp.status == 201
        assert await client.at_eof()


# --------------------------------------------------------------------------------------------
# 1 GiB each way through `tunneld edge` and `tunneld http` processes, with bounded memory
# --------------------------------------------------------------------------------------------

GiB = 1024 * MiB
#: Peak RSS allowed to the edge and to the agent while 1 GiB moves through them.
RSS_LIMIT = 150 * MiB
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss(pid: int) -> int:
    """VmHWM (the peak resident set) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.fixture
async def tunneld_procs() -> AsyncIterator[list[trio.Process]]:
    """Processes started by a test; stopped (SIGTERM, then SIGKILL) at its end."""
    procs: list[trio.Process] = []
    yield procs
    with trio.CancelScope(shield=True):
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def bulk_upstream(stream: trio.SocketStream) -> None:
    """``POST``: count the Content-Length body and answer the count.
    ``GET /download?n=N``: send N bytes as a chunked body of 1 MiB chunks."""
    buf = bytearray()
    try:
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, target, _ = lines[0].split(" ")
        if method == "POST":
            fields = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(fields["content-length"])
            got = len(rest)
            while got < length:
                data = await stream.receive_some(MiB)
                if not data:
                    return
                got += len(data)
            body = str(got).encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            left = int(target.split("n=", 1)[1])
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n" % MiB + bytes(MiB) + b"\r\n"
            while left >= MiB:
                await stream.send_all(chunk)
                left -= MiB
            if left:
                await stream.send_all(b"%x\r\n" % left + bytes(left) + b"\r\n")
            await stream.send_all(b"0\r\n\r\n")
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def gib_upload(port: int, host: str, size: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    block = memoryview(bytes(MiB))
    await stream.send_all(f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n".encode())
    left = size
    while left:
        n = min(left, MiB)
        await stream.send_all(block[:n])
        left -= n
    answer = b""
    while not answer.endswith(str(size).encode()):
        data = await stream.receive_some(65536)
        if not data:
            break
        answer += data
    await stream.aclose()
    return answer


async def gib_download(port: int, host: str, size: int) -> tuple[bytes, int]:
    """The response head and the number of body bytes (chunk framing included) that followed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET /download?n={size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    # The body is exactly the upstream's chunks, so its framed length is known in advance.
    sizes = [MiB] * (size // MiB) + ([size % MiB] if size % MiB else [])
    want = size + sum(len(b"%x\r\n\r\n" % n) for n in sizes) + len(b"0\r\n\r\n")
    got = len(rest)
    tail = rest[-5:]
    while got < want:
        data = await stream.receive_some(MiB)
        if not data:
            break
        got += len(data)
        tail = (tail + data)[-5:]
    await stream.aclose()
    assert tail == b"0\r\n\r\n"
    return head, got - want


@pytest.mark.slow
async def test_gib_each_way_with_bounded_memory(tmp_path: Path, nursery: trio.Nursery,
                                                tunneld_procs: list[trio.Process]) -> None:
    up_listeners = await nursery.start(partial(trio.serve_tcp, bulk_upstream, 0, host="127.0.0.1"))
    up_port = int(up_listeners[0].socket.getsockname()[1])
    http_port, agent_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    data = tmp_path / "edge"
    low = 40000 + os.getpid() % 2000 * 10
    edge = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tunneld", "edge", "--dev", "--data-dir", str(data), "--domain", "bulk.test",
         "--http-addr", f"127.0.0.1:{http_port}", "--https-addr", "false", "--agent-addr",
         f"127.0.0.1:{agent_port}", "--tcp-ports", f"127.0.0.1:{low}-{low + 9}", "--log-level", "warn"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "edge.log").open("wb"))
    tunneld_procs.append(edge)
    host = "gib.bulk.test"
    with trio.fail_after(120):
        while not (data / "dev-authtoken").exists() or not (data / "ca.pem").exists():
            assert edge.returncode is None, (tmp_path / "edge.log").read_text()
            await trio.sleep(0.05)
        token = (data / "dev-authtoken").read_text().strip()
        agent = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tunneld", "http", f"127.0.0.1:{up_port}", "--subdomain", "gib",
             "--scheme", "http", "--server-addr", f"127.0.0.1:{agent_port}",
             "--root-cas", str(data / "ca.pem"),
             "--authtoken", token, "--web-addr", "false", "--log", "stderr", "--log-level", "warn"],
            env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "agent.log").open("wb"))
        tunneld_procs.append(agent)
        while True:  # until the tunnel answers (404 while the agent is still connecting)
            assert agent.returncode is None, (tmp_path / "agent.log").read_text()
            try:
                probe = await RawClient.connect(http_port)
                status = (await probe.request("POST", "/", host, body=b"x")).status
                await probe.aclose()
                if status == 200:
                    break
            except (OSError, EOFError, trio.BrokenResourceError):
                pass
            await trio.sleep(0.1)
        before = {"edge": peak_rss(edge.pid), "agent": peak_rss(agent.pid)}

        started = time.monotonic()
        assert (await gib_upload(http_port, host, GiB)).endswith(b"\r\n\r\n%d" % GiB)
        uploaded = time.monotonic()
        head, extra = await gib_download(http_port, host, GiB)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        assert extra == 0
        done = time.monotonic()

    after = {"edge": peak_rss(edge.pid), "agent": peak_rss(agent.pid)}
    report = (f"1 GiB up {uploaded - started:.1f}s, down {done - uploaded:.1f}s; peak RSS MB before/after: "
              + ", ".join(f"{k} {before[k] / 1e6:.0f}/{after[k] / 1e6:.0f}" for k in after))
    print(report)
    assert max(after.values()) < RSS_LIMIT, report


# --------------------------------------------------------------------------------------------
# Official ngrok clients' basic-auth options (run where .clients/ holds them; see below)
# --------------------------------------------------------------------------------------------

# The official clients, from ``tests/interop`` (installed by ``.ci/install-ngrok-clients``).


@pytest.fixture
def ngrok_v2() -> Path:
    return require(AGENT_BIN, "the ngrok agent 2.3.41")


@pytest.fixture
def ngrok_js() -> Path:
    require(Path(shutil.which("node") or "/usr/bin/node"), "Node.js")
    return require(JS_SDK, "the ngrok JavaScript SDK 1.7.0")


async def read_line(proc: trio.Process) -> str:
    """One line of a client's output (byte by byte: nothing after it is consumed)."""
    assert proc.stdout is not None
    buf = b""
    while not buf.endswith(b"\n"):
        data = await proc.stdout.receive_some(1)
        assert data, "the client exited"
        buf += data
    return buf.decode().strip()


async def check_auth(env: EdgeEnv, url: str, good: list[str], bad: list[str]) -> None:
    host = url.split("://", 1)[1].split(":")[0]
    base = ["-H", f"Host: {host}", f"http://127.0.0.1:{env.http_port}/hello"]
    for credential in good:
        assert await curl("-u", credential, *base) == (200, b"hello from A\n")
    for credential in bad:
        assert (await curl("-u", credential, *base))[0] == 401
    assert (await curl(*base))[0] == 401


async def test_ngrok_v2_agent_auth_flag(ngrok_v2: Path, edge_env: EdgeEnv, upstream: Upstream,
                                        tmp_path: Path) -> None:
    """The 2.3 agent's ``-auth user:pass`` (sent as ``Auth``) is enforced; a short one refused."""
    web_port = free_port()
    config = tmp_path / "ngrok.yml"
    config.write_text(f"server_addr: {edge_env.agent_addr}\nroot_cas: {edge_env.ca}\n"
                      f"authtoken: {edge_env.token}\nupdate_check: false\nconsole_ui: false\n"
                      f"web_addr: 127.0.0.1:{web_port}\n")
    cmd = [str(ngrok_v2), "http", "-config", str(config), "-log", "stdout", "-bind-tls=false",
           "-auth", "v2user:v2-password", str(upstream.port)]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):
            while True:
                try:
                    tunnels = json.loads((await curl(f"http://127.0.0.1:{web_port}/api/tunnels"))[1])["tunnels"]
                except (AssertionError, ValueError, KeyError):
                    tunnels = []
                if tunnels:
                    break
                await trio.sleep(0.2)
            await check_auth(edge_env, tunnels[0]["public_url"], ["v2user:v2-password"],
                             ["v2user:v2-passwore", "other:v2-password"])
    finally:
        proc.kill()
        await proc.wait()

    # A password the 2.3 agent lets through but ngrok's limits do not: refused by the edge.
    cmd[-2] = "v2user:short"
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = ""
    try:
        with trio.move_on_after(20):
            while "ERR_NGROK_360" not in output:
                output += await read_line(proc) + "\n"
    finally:
        proc.kill()
        await proc.wait()
    assert "ERR_NGROK_360" in output and "8 to 128" in output, output[-2000:]


async def test_ngrok_sdk_basic_auth(ngrok_js: Path, edge_env: EdgeEnv, upstream: Upstream,
                                    tmp_path: Path) -> None:
    """The SDK's ``basic_auth`` list (sent as ``BasicAuth.credentials``) is enforced; a short one refused."""
    script = tmp_path / "sdk.js"
    script.write_text(
        "const ngrok = require(process.env.NGROK_JS);\n"
        "(async () => {\n"
        "  try {\n"
        "    const l = await ngrok.forward({addr: process.env.UPSTREAM, authtoken: process.env.TOKEN,\n"
        "      server_addr: process.env.SERVER, root_cas: process.env.CA, schemes: ['HTTP'],\n"
        "      basic_auth: JSON.parse(process.env.CREDENTIALS)});\n"
        "    console.log('URL ' + l.url());\n"
        "  } catch (e) { console.log('ERROR ' + JSON.stringify(e.message) + ' ' + e.errorCode); }\n"
        "  setInterval(() => {}, 1000);\n"
        "})();\n")
    env = {**os.environ, "NGROK_JS": str(ngrok_js), "UPSTREAM": f"http://127.0.0.1:{upstream.port}",
           "TOKEN": edge_env.token, "SERVER": edge_env.agent_addr, "CA": str(edge_env.ca)}

    async def run(credentials: list[str]) -> tuple[trio.Process, str]:
        proc = await trio.lowlevel.open_process(["node", str(script)], stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL,
                                                env={**env, "CREDENTIALS": json.dumps(credentials)})
        with trio.fail_after(20):
            return proc, await read_line(proc)

    proc, line = await run(["sdk1:sdk-password-1", "sdk2:sdk-password-2"])
    try:
        assert line.startswith("URL http://"), line
        with trio.fail_after(20):
            await check_auth(edge_env, line.split(" ", 1)[1], ["sdk1:sdk-password-1", "sdk2:sdk-password-2"],
                             ["sdk1:sdk-password-2"])
    finally:
        proc.kill()
        await proc.wait()
    proc, line = await run(["sdk1:short"])
    try:
        assert line.startswith("ERROR") and "8 to 128" in line and "360" in line, line
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.parametrize("client_type, refused", [("ngrok-go", True), ("tunneld", False)])
async def test_host_header_rewrite_from_an_sdk_is_refused(edge_env: EdgeEnv, upstream: Upstream,
                                                          client_type: str, refused: bool) -> None:
    """SDKs expect the edge to rewrite Host, which it cannot (it does not know their upstream):
    their HostHeaderRewrite is refused.  From an agent it is informational, as in ngrok's v2."""
    agent = Agent(edge_env.agent_config(), [TunnelConfig(name="w", proto="http", addr=str(upstream.port),
                                                         schemes=["http"], host_header="rewrite")])
    agent.client_type = client_type
    assert agent.tunnels[0].bind.opts["HostHeaderRewrite"] is True
    with trio.fail_after(10):
        if refused:
            def refusal(e: TunnelRejected) -> bool:
                return e.code == Code.OPTION_UNSUPPORTED and "HostHeaderRewrite" in str(e)

            with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, check=refusal), flatten_subgroups=True):
                await edge_env.nursery.start(agent.run)
            assert not edge_env.edge.routes.hosts
        else:
            await edge_env.nursery.start(agent.run)
            assert edge_env.edge.routes.hosts
