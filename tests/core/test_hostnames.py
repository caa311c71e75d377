"""Public names: subdomain rules, custom hostnames (allowed per account, with their own certs)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from tunneld.core import Edge, MuxSession, TunnelConfig, TunnelRejected, proto
from tunneld.core._hostnames import AllowedHostname, requested_hostname
from tunneld.core._rpc import call
from tunneld.core._store import Store
from tunneld.core._tls import client_context, open_tls_client

from ..conftest import EdgeEnv, make_edge_config, start_hello_upstream


async def curl(url: str, port: int, *extra: str) -> tuple[int, str]:
    host = url.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
    res = await trio.run_process(["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1",
                                  *extra, url], capture_stdout=True, capture_stderr=True, check=False)
    return res.returncode, (res.stdout + res.stderr).decode()


# ---- units ------------------------------------------------------------------------------------


def test_allowed_hostname_parse_and_match() -> None:
    a = AllowedHostname.parse("App.Example.org.")
    assert a == AllowedHostname("app.example.org", "")
    assert a.matches("app.example.org") and not a.matches("x.app.example.org")
    w = AllowedHostname.parse("*.corp.test=abc123")
    assert w.token_id == "abc123"
    assert w.matches("one.corp.test")
    assert not w.matches("corp.test") and not w.matches("a.b.corp.test")
    for bad in ("", "example", "*.com.*", "a..b", "-a.example.org", "a.*.org", "*"):
        with pytest.raises(ValueError):
            AllowedHostname.parse(bad)


@pytest.mark.parametrize(("opts", "want"), [
    ({"Hostname": "A.Example.org"}, "a.example.org"),
    ({"Domain": "a.example.org."}, "a.example.org"),
    ({"URL": "https://a.example.org:443/"}, "a.example.org"),
    ({"url": "a.example.org"}, "a.example.org"),
    ({"Subdomain": "x"}, ""),
])
def test_requested_hostname(opts: dict[str, str], want: str) -> None:
    assert requested_hostname(opts) == want


OTHER_TOKEN: dict[Edge, str] = {}


# ---- end to end --------------------------------------------------------------------------------


@pytest.fixture
async def custom_env(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[EdgeEnv]:
    """An edge in dev mode allowing some custom hostnames; OTHER_TOKEN holds a second account's token."""
    store = Store.open(tmp_path)
    rec, token = store.create_token("mine")
    _other, other_token = store.create_token("other")
    config = make_edge_config(tmp_path, dev=True, allowed_hostnames=(
        AllowedHostname("app.example.org"), AllowedHostname("*.corp.test", rec.id),
        AllowedHostname("theirs.example.org", _other.id)))
    edge = Edge(config, store)
    async with trio.open_nursery() as inner:
        info = await inner.start(edge.serve)
        env = EdgeEnv(edge, info, store, token, tmp_path / "ca.pem", tmp_path, nursery)
        OTHER_TOKEN[env.edge] = other_token
        yield env
        inner.cancel_scope.cancel()
    store.close()


async def test_custom_hostname_http_and_https(custom_env: EdgeEnv, nursery: trio.Nursery) -> None:
    up = await start_hello_upstream(nursery)
    for name in ("app.example.org", "dev.corp.test"):
        agent = await custom_env.start_agent(TunnelConfig(name, "http", str(up), hostname=name))
        urls = sorted(t.public_url for t in agent.tunnels)
        assert urls == [f"http://{name}:{custom_env.http_port}", f"https://{name}:{custom_env.https_port}"]
        # HTTPS shows a certificate for the custom name, signed by the dev CA: curl verifies it.
        code, out = await curl(f"https://{name}:{custom_env.https_port}/", custom_env.https_port,
                               "--cacert", str(custom_env.ca))
        assert code == 0 and out == f"hello {name}:{custom_env.https_port}", out
        code, out = await curl(f"http://{name}:{custom_env.http_port}/", custom_env.http_port)
        assert code == 0 and out.startswith("hello"), out
    # Tunnel names under the edge's domain still get the edge's own certificate.
    agent = await custom_env.start_agent(TunnelConfig("s", "http", str(up), subdomain="plain"))
    code, out = await curl(agent.tunnels[0].public_url + "/", custom_env.https_port,
                           "--cacert", str(custom_env.ca))
    assert code == 0, out


@pytest.mark.parametrize(("hostname", "token", "why"), [
    ("evil.example.net", "mine", "not reserved for your account"),
    ("theirs.example.org", "mine", "not reserved for your account"),
    ("a.corp.test", "other", "not reserved for your account"),
    ("a.b.tunneld.test", "mine", "not reserved for your account"),
])
async def test_custom_hostname_refused(custom_env: EdgeEnv, nursery: trio.Nursery, hostname: str, token: str,
                                       why: str) -> None:
    up = await start_hello_upstream(nursery)
    authtoken = custom_env.token if token == "mine" else OTHER_TOKEN[custom_env.edge]
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match=why), flatten_subgroups=True):
        await custom_env.start_agent(TunnelConfig("x", "http", str(up), hostname=hostname),
                                     authtoken=authtoken)


@pytest.mark.parametrize("spelling", ["Hostname", "Domain", "URL"])
async def test_ngrok_spellings_of_hostname(custom_env: EdgeEnv, nursery: trio.Nursery, spelling: str) -> None:
    """ngrok v2 sends Hostname; the Rust SDK Domain; the Go v2 SDK a URL."""
    tls = await open_tls_client("127.0.0.1", custom_env.info.ports["agent"], client_context(custom_env.ca))
    mux = MuxSession(tls, client=True)
    await nursery.start(mux.run)
    auth = await call(mux, proto.StreamType.AUTH, proto.Auth(version=["2"], extra=proto.AuthExtra(
        authtoken=custom_env.token)), proto.AuthResp)
    assert not auth.error
    value = "https://app.example.org" if spelling == "URL" else "app.example.org"
    resp = await call(mux, proto.StreamType.BIND, proto.Bind(proto="https", opts={spelling: value}),
                      proto.BindResp)
    assert not resp.error, resp.error
    assert resp.url == f"https://app.example.org:{custom_env.https_port}"
    await mux.aclose()


@pytest.mark.parametrize(("subdomain", "why"), [
    ("www", "reserved"), ("Admin", "reserved"), ("-bad", "not a valid DNS label"),
    ("a_b", "not a valid DNS label"),
    ("x" * 64, "not a valid DNS label"), ("a.b", "not a valid DNS label"),
])
async def test_subdomain_rules(edge_env: EdgeEnv, nursery: trio.Nursery, subdomain: str, why: str) -> None:
    up = await start_hello_upstream(nursery)
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match=why), flatten_subgroups=True):
        await edge_env.start_agent(TunnelConfig("x", "http", str(up), subdomain=subdomain))


async def test_subdomain_lower_cased_and_taken(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    up = await start_hello_upstream(nursery)
    agent = await edge_env.start_agent(TunnelConfig("x", "http", str(up), subdomain="MixedCase"))
    assert agent.tunnels[0].public_url.startswith("https://mixedcase.tunneld.test:")
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match="already in use"), flatten_subgroups=True):
        await edge_env.start_agent(TunnelConfig("y", "http", str(up), subdomain="mixedcase"))


async def test_reserved_names_configurable(tmp_path: Path, nursery: trio.Nursery) -> None:
    store = Store.open(tmp_path)
    _rec, token = store.create_token("t")
    edge = Edge(make_edge_config(tmp_path, reserved_names=frozenset({"blocked"})), store)
    info = await nursery.start(edge.serve)
    env = EdgeEnv(edge, info, store, token, tmp_path / "ca.pem", tmp_path, nursery)
    up = await start_hello_upstream(nursery)
    agent = await env.start_agent(TunnelConfig("x", "http", str(up), subdomain="www"))
    assert agent.tunnels[0].public_url.startswith("https://www.tunneld.test:")
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match="reserved"), flatten_subgroups=True):
        await env.start_agent(TunnelConfig("y", "http", str(up), subdomain="blocked"))
    edge.shutdown()


async def test_custom_hostname_needs_a_certificate_outside_dev(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Without --dev, HTTPS for a custom name needs the operator's certificate in DATA_DIR/certs."""
    store = Store.open(tmp_path)
    _rec, token = store.create_token("t")
    config = make_edge_config(tmp_path, allowed_hostnames=(AllowedHostname("*.example.org"),))
    edge = Edge(config, store)
    info = await nursery.start(edge.serve)
    env = EdgeEnv(edge, info, store, token, tmp_path / "ca.pem", tmp_path, nursery)
    up = await start_hello_upstream(nursery)
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match="no certificate for a.example.org"),
                            flatten_subgroups=True):
        await env.start_agent(TunnelConfig("x", "http", str(up), hostname="a.example.org"))
    # http only needs no certificate.
    agent = await env.start_agent(TunnelConfig("x", "http", str(up), hostname="a.example.org",
                                               schemes=["http"]))
    assert agent.tunnels[0].public_url == f"http://a.example.org:{env.http_port}"
    # The operator drops in a certificate (here from another CA): HTTPS works and shows it.
    ca = trustme.CA()
    leaf = ca.issue_cert("b.example.org")
    (tmp_path / "certs").mkdir(exist_ok=True)
    leaf.private_key_pem.write_to_path(str(tmp_path / "certs" / "b.example.org-key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "certs" / "b.example.org.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    await env.start_agent(TunnelConfig("b", "http", str(up), hostname="b.example.org", schemes=["https"]))
    code, out = await curl(f"https://b.example.org:{env.https_port}/", env.https_port,
                           "--cacert", str(tmp_path / "other-ca.pem"))
    assert code == 0 and out == f"hello b.example.org:{env.https_port}", out
    edge.shutdown()


def test_cli_allow_hostname_and_cname(tmp_path: Path) -> None:
    """A malformed --allow-hostname is a usage error; valid ones are announced with the CNAME target."""
    from ..test_cli import TUNNELD, Proc, base_env, start_edge

    bad = subprocess.run([*TUNNELD, "edge", "--dev", "--data-dir", str(tmp_path),
                          "--allow-hostname", "not a host"],
                         capture_output=True, text=True, env=base_env(tmp_path), timeout=20)
    assert bad.returncode == 2 and "--allow-hostname" in bad.stderr
    procs: list[Proc] = []

    def start(args: list[str]) -> Proc:
        procs.append(Proc([*TUNNELD, *args], base_env(tmp_path)))
        return procs[-1]

    try:
        edge = start_edge(start, tmp_path / "edge", "--allow-hostname", "app.example.org",
                          "--allow-hostname", "*.corp.test=abc123", "--cname-target", "edge.example.net")
        line = edge.proc.wait_line(lambda text: "custom hostnames" in text)
        assert "app.example.org, *.corp.test (token abc123): CNAME them to edge.example.net" in line
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.parametrize(("client_type", "twins"), [("", True), ("tunneld", True), ("ngrok-python", False)])
async def test_only_agents_get_twin_names(edge_env: EdgeEnv, nursery: trio.Nursery, client_type: str,
                                          twins: bool) -> None:
    """ngrok's v2 agent binds https and http for one tunnel: one name.  An SDK's two listeners
    with the same options are two tunnels: two names."""
    tls = await open_tls_client("127.0.0.1", edge_env.info.ports["agent"], client_context(edge_env.ca))
    mux = MuxSession(tls, client=True)
    await nursery.start(mux.run)
    await call(mux, proto.StreamType.AUTH, proto.Auth(version=["2"], extra=proto.AuthExtra(
        authtoken=edge_env.token, client_type=client_type)), proto.AuthResp)
    urls = []
    for scheme in ("https", "http"):
        resp = await call(mux, proto.StreamType.BIND, proto.Bind(proto=scheme, opts={"Subdomain": ""}),
                          proto.BindResp)
        assert not resp.error
        urls.append(resp.url.split("://")[1].split(":")[0])
    assert (urls[0] == urls[1]) is twins, urls
    await mux.aclose()
