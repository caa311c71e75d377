"""End-to-end tests of the SSH gateway, driven by the real OpenSSH client (``/usr/bin/ssh``).

Each test runs an in-process edge with the gateway on 127.0.0.1 port 0, a throwaway ed25519
key from ``ssh-keygen`` in ``DATA_DIR/authorized_keys``, and ``ssh -R ... v2@127.0.0.1 http``
as a subprocess; the URLs it prints are fetched with httpx (or raw sockets) at 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import asyncssh
import attrs
import httpx
import pytest
import trio
import trio_websocket
import trustme

from tunneld.core import Edge, EdgeConfig, EdgeInfo
from tunneld.core._store import Store
from tunneld.plugins.ssh import _gateway
from tunneld.plugins.ssh._command import UsageError, binds_for, parse_command
from tunneld.plugins.ssh._keys import AuthorizedKeysFile

from ..conftest import DOMAIN, EdgeEnv, make_edge_config, start_echo_server
from .test_http import Upstream, pattern, ws_echo_server

MiB = 1024 * 1024
FORWARDING = re.compile(rb"Forwarding (\S+) -> ")


def make_ssh_edge_config(tmp: Path) -> EdgeConfig:
    return make_edge_config(tmp, ssh_addr=("127.0.0.1", 0))


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return path


@attrs.define(eq=False)
class SshClient:
    """A running ``ssh`` process, its output collected as it comes."""

    proc: trio.Process
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)
    done: trio.Event = attrs.field(factory=trio.Event)

    async def _collect(self, stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    async def run(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._collect, self.proc.stdout, self.stdout)
            nursery.start_soon(self._collect, self.proc.stderr, self.stderr)
            await self.proc.wait()
        self.done.set()

    async def urls(self, count: int) -> list[str]:
        """The first ``count`` public URLs printed (waits for them)."""
        while len(FORWARDING.findall(self.stdout)) < count:
            assert not self.done.is_set(), f"ssh ended: {bytes(self.stdout)!r} {bytes(self.stderr)!r}"
            await trio.sleep(0.02)
        return [u.decode() for u in FORWARDING.findall(self.stdout)[:count]]

    async def finished(self) -> int:
        await self.done.wait()
        return int(self.proc.returncode or 0)

    def output(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")


@attrs.define(eq=False)
class SshEnv:
    edge: Edge
    info: EdgeInfo
    data_dir: Path
    key: Path
    ca: Path
    nursery: trio.Nursery

    @property
    def ssh_port(self) -> int:
        return self.info.ports["ssh"]

    async def ssh(self, *command: str, forwards: tuple[str, ...] = (), key: Path | None = None,
                  user: str = "v2") -> SshClient:
        args = ["ssh", "-F", "/dev/null", "-T", "-i", str(key or self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.data_dir / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR",
                "-p", str(self.ssh_port)]
        for forward in forwards:
            args += ["-R", forward]
        args += [f"{user}@127.0.0.1", *command]
        proc = await trio.lowlevel.open_process(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
        client = SshClient(proc)
        self.nursery.start_soon(client.run)
        return client

    def http_client(self, scheme: str, url: str) -> tuple[httpx.AsyncClient, str, dict[str, str]]:
        """A client for a printed URL, connecting to 127.0.0.1 (the names do not resolve)."""
        host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        if scheme == "http":
            return (httpx.AsyncClient(headers={"Host": host}, timeout=30),
                    f"http://127.0.0.1:{self.info.ports['http']}", {})
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return (httpx.AsyncClient(verify=ctx, headers={"Host": host}, timeout=30),
                f"https://127.0.0.1:{self.info.ports['https']}", {"sni_hostname": host})


@pytest.fixture
async def ssh_env(tmp_path: Path, nursery: trio.Nursery,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SshEnv]:
    monkeypatch.setattr(_gateway, "FORWARD_TIMEOUT", 1.0)
    monkeypatch.setattr(_gateway, "COMMAND_TIMEOUT", 2.0)
    config = make_ssh_edge_config(tmp_path)
    key = keygen(tmp_path / "id_ed25519")
    (tmp_path / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
    store = Store.open(tmp_path)
    edge = Edge(config, store)
    async with trio.open_nursery() as edge_nursery:
        info = await edge_nursery.start(edge.serve)
        yield SshEnv(edge, info, tmp_path, key, tmp_path / "ca.pem", nursery)
        edge_nursery.cancel_scope.cancel()
    store.close()


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    return await Upstream("A").start(nursery)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


async def test_http_both_schemes_then_teardown_on_exit(ssh_env: SshEnv, upstream: Upstream) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh("http", forwards=(f"0:localhost:{upstream.port}",))
        https_url, http_url = await client.urls(2)
        assert https_url.startswith("https://") and http_url.startswith("http://")
        assert https_url.split("://")[1] == http_url.split("://")[1].replace(
            str(ssh_env.info.ports["http"]), str(ssh_env.info.ports["https"]))
        for scheme, url in (("https", https_url), ("http", http_url)):
            http, base, ext = ssh_env.http_client(scheme, url)
            async with http:
                resp = await http.get(f"{base}/hello", extensions=ext)
                assert resp.status_code == 200 and resp.text == "hello from A\n"
        # ssh goes away: the name stops answering at once.
        client.proc.terminate()
        await client.finished()
        http, base, ext = ssh_env.http_client("http", http_url)
        async with http:
            while (resp := await http.get(f"{base}/hello")).status_code != 404:
                await trio.sleep(0.05)
            assert resp.headers["tunneld-error-code"] == "ERR_TUNNELD_3200"


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_http_20mb_download_and_upload(ssh_env: SshEnv, upstream: Upstream, scheme: str) -> None:
    port = ssh_env.info.ports[scheme]
    payload = pattern(20 * MiB, 3)
    with trio.fail_after(40):
        client = await ssh_env.ssh("http", forwards=(f"{port}:localhost:{upstream.port}",))
        [url] = await client.urls(1)
        assert url.startswith(f"{scheme}://")
        http, base, ext = ssh_env.http_client(scheme, url)
        async with http:
            resp = await http.get(f"{base}/big", params={"size": str(20 * MiB)}, extensions=ext)
            assert resp.status_code == 200 and resp.content == b"x" * (20 * MiB)
            resp = await http.post(f"{base}/sha256", content=payload, extensions=ext)
            assert resp.json() == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


async def test_several_forwards_and_a_websocket(ssh_env: SshEnv, upstream: Upstream,
                                                nursery: trio.Nursery) -> None:
    ws_port = await ws_echo_server(nursery)
    with trio.fail_after(20):
        forwards = (f"443:localhost:{upstream.port}", f"0:localhost:{ws_port}",
                    f"80:localhost:{upstream.port}")
        client = await ssh_env.ssh("http", forwards=forwards)
        web_url, ws_url, _ws_http_url, plain_url = await client.urls(4)
        hosts = {url.split("://")[1].split(":")[0] for url in (web_url, ws_url, plain_url)}
        assert len(hosts) == 3  # each forward has a name of its own
        http, base, ext = ssh_env.http_client("https", web_url)
        async with http:
            assert (await http.get(f"{base}/hello", extensions=ext)).text == "hello from A\n"
        host = ws_url.split("://")[1].split(":")[0]
        ctx = ssl.create_default_context(cafile=str(ssh_env.ca))
        tcp = await trio.open_tcp_stream("127.0.0.1", ssh_env.info.ports["https"])
        stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
        async with trio.open_nursery() as ws_nursery:
            ws = await trio_websocket.wrap_client_stream(ws_nursery, stream, host, "/chat")
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            big = pattern(512 * 1024, 9)
            await ws.send_message(big)
            assert await ws.get_message() == big
            await ws.aclose()


async def test_basic_auth(ssh_env: SshEnv, upstream: Upstream) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh("http", "--basic-auth", "'alice:correct horse'",
                                   forwards=(f"80:localhost:{upstream.port}",))
        [url] = await client.urls(1)
        http, base, _ = ssh_env.http_client("http", url)
        async with http:
            resp = await http.get(f"{base}/hello")
            assert resp.status_code == 401
            assert resp.headers["tunneld-error-code"] == "ERR_TUNNELD_3401"
            resp = await http.get(f"{base}/hello", auth=("alice", "correct horse"))
            assert resp.status_code == 200


async def test_hostname_from_the_forward(ssh_env: SshEnv, upstream: Upstream) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh("http", forwards=(f"myapp.{DOMAIN}:80:localhost:{upstream.port}",))
        [url] = await client.urls(1)
        assert url == f"http://myapp.{DOMAIN}:{ssh_env.info.ports['http']}"
        http, base, _ = ssh_env.http_client("http", url)
        async with http:
            assert (await http.get(f"{base}/hello")).status_code == 200


async def test_local_service_down_502(ssh_env: SshEnv) -> None:
    with trio.fail_after(20):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        closed_port = listener.getsockname()[1]
        listener.close()
        client = await ssh_env.ssh("http", forwards=(f"80:localhost:{closed_port}",))
        [url] = await client.urls(1)
        http, base, _ = ssh_env.http_client("http", url)
        async with http:
            resp = await http.get(f"{base}/hello")
            assert resp.status_code == 502, resp.text
            assert resp.headers["tunneld-error-code"] == "ERR_TUNNELD_8012"


async def test_ctrl_c_with_a_pty_ends_the_session(ssh_env: SshEnv, upstream: Upstream) -> None:
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            ["ssh", "-F", "/dev/null", "-tt", "-i", str(ssh_env.key), "-o", "IdentitiesOnly=yes", "-o",
             "BatchMode=yes", "-o", f"UserKnownHostsFile={ssh_env.data_dir / 'known_hosts'}", "-o",
             "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR", "-p", str(ssh_env.ssh_port),
             "-R", f"80:localhost:{upstream.port}", "v2@127.0.0.1", "http"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        client = SshClient(proc)
        ssh_env.nursery.start_soon(client.run)
        [url] = await client.urls(1)
        assert proc.stdin is not None
        await proc.stdin.send_all(b"\x03")
        assert await client.finished() == 130
        assert "Interrupted" in client.output()
        http, base, _ = ssh_env.http_client("http", url)
        async with http:
            assert (await http.get(f"{base}/hello")).status_code == 404


async def test_stuck_client_does_not_stall_others(ssh_env: SshEnv, upstream: Upstream) -> None:
    with trio.fail_after(30):
        stuck = await ssh_env.ssh("http", forwards=(f"80:localhost:{upstream.port}",))
        healthy = await ssh_env.ssh("http", forwards=(f"80:localhost:{upstream.port}",))
        [stuck_url], [healthy_url] = await stuck.urls(1), await healthy.urls(1)
        os.kill(stuck.proc.pid, signal.SIGSTOP)
        try:
            stuck_host = stuck_url.split("://")[1].split(":")[0]
            pusher = await trio.open_tcp_stream("127.0.0.1", ssh_env.info.ports["http"])
            head = (f"POST /sha256 HTTP/1.1\r\nHost: {stuck_host}\r\nContent-Length: {40 * MiB}\r\n\r\n")

            async def push() -> None:
                await pusher.send_all(head.encode())
                with trio.move_on_after(8):
                    await pusher.send_all(bytes(40 * MiB))  # stalls: its ssh client reads nothing

            async with trio.open_nursery() as n:
                n.start_soon(push)
                await trio.sleep(1)
                http, base, _ = ssh_env.http_client("http", healthy_url)
                async with http:
                    for _ in range(20):
                        with trio.fail_after(2):
                            assert (await http.get(f"{base}/hello")).status_code == 200
                n.cancel_scope.cancel()
            await pusher.aclose()
        finally:
            os.kill(stuck.proc.pid, signal.SIGCONT)


# --------------------------------------------------------------------------------------------
# TCP and TLS
# --------------------------------------------------------------------------------------------


async def test_tcp_random_port_echo(ssh_env: SshEnv, nursery: trio.Nursery) -> None:
    echo_port = await start_echo_server(nursery)
    with trio.fail_after(20):
        client = await ssh_env.ssh("tcp", "22", forwards=(f"0:localhost:{echo_port}",))
        [url] = await client.urls(1)
        assert url.startswith(f"tcp://{DOMAIN}:")
        port = int(url.rsplit(":", 1)[1])
        low, high = ssh_env.edge.config.tcp_ports
        assert low <= port <= high
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        data = pattern(3 * MiB, 5)
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, data)
            got = bytearray()
            while len(got) < len(data):
                got += await stream.receive_some(65536)
        assert got == data
        await stream.send_eof()
        assert await stream.receive_some(1) == b""
        await stream.aclose()
        # The client was told the real port for its -R 0 forward.
        assert f"Allocated port {port}" in client.output() or b"Allocated" not in client.stderr


async def test_tls_passthrough_by_sni(ssh_env: SshEnv, nursery: trio.Nursery) -> None:
    host = f"secure.{DOMAIN}"
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(server_ctx)

    async def tls_echo(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        async for chunk in tls:
            await tls.send_all(b"tls:" + chunk)

    [listener] = await nursery.start(partial(trio.serve_tcp, tls_echo, 0, host="127.0.0.1"))
    local_port = listener.socket.getsockname()[1]
    with trio.fail_after(20):
        client = await ssh_env.ssh("tls", "--subdomain", "secure", forwards=(f"443:localhost:{local_port}",))
        [url] = await client.urls(1)
        assert url == f"tls://{host}:{ssh_env.info.ports['https']}"
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)  # the upstream's certificate, not the edge's: passed through
        tcp = await trio.open_tcp_stream("127.0.0.1", ssh_env.info.ports["https"])
        tls = trio.SSLStream(tcp, client_ctx, server_hostname=host)
        await tls.send_all(b"ping")
        assert await tls.receive_some(100) == b"tls:ping"
        await tls.aclose()


# --------------------------------------------------------------------------------------------
# Refusals and messages
# --------------------------------------------------------------------------------------------


async def test_unknown_key_refused(ssh_env: SshEnv, upstream: Upstream) -> None:
    other = keygen(ssh_env.data_dir / "stranger")
    with trio.fail_after(20):
        client = await ssh_env.ssh("http", forwards=(f"80:localhost:{upstream.port}",), key=other)
        assert await client.finished() == 255
        assert "Permission denied (publickey)" in client.output()
        # Repeated failures from one address are slowed down (the edge's FailureLimiter).
        for _ in range(3):
            client = await ssh_env.ssh("http", forwards=(f"80:localhost:{upstream.port}",), key=other)
            assert await client.finished() == 255
    assert ssh_env.edge.limiter.delay("127.0.0.1", time.monotonic()) > 0


async def test_key_registered_through_the_control_plane(ssh_env: SshEnv, upstream: Upstream) -> None:
    """A key in the store's ssh_credentials logs in (no authorized_keys line), and only while it is there."""
    other = keygen(ssh_env.data_dir / "registered")
    store = ssh_env.edge.store
    record = store.create_ssh_credential("default", other.with_suffix(".pub").read_text(), description="ci")
    with trio.fail_after(20):
        client = await ssh_env.ssh("http", forwards=(f"443:localhost:{upstream.port}",), key=other)
        (url,) = await client.urls(1)
        http, base, ext = ssh_env.http_client("https", url)
        async with http:
            assert (await http.get(f"{base}/hello", extensions=ext)).text == "hello from A\n"
        client.proc.terminate()
        await client.finished()
        assert store.delete_ssh_credential("default", record.id)
        client = await ssh_env.ssh("http", forwards=(f"443:localhost:{upstream.port}",), key=other)
        assert await client.finished() == 255
        assert "Permission denied (publickey)" in client.output()


@pytest.mark.parametrize(("command", "message"), [
    (("ftp",), "unknown command 'ftp'"),
    (("http", "--bogus"), "unknown flag '--bogus'"),
    (("http", "--host-header=rewrite"), "--host-header is not supported through SSH"),
    (("tcp", "--subdomain", "x"), "--subdomain does not apply to tcp"),
])
async def test_bad_command_message(ssh_env: SshEnv, command: tuple[str, ...], message: str) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh(*command, forwards=("443:localhost:1",))
        assert await client.finished() == 2
        assert f"Error: {message}" in client.output()


async def test_help_and_refused_forward(ssh_env: SshEnv) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh("http", "--help", forwards=("443:localhost:1",))
        assert await client.finished() == 0
        assert "Usage: ssh -R" in client.output()
        client = await ssh_env.ssh("http", forwards=("8444:localhost:1",))
        assert await client.finished() == 1
        assert "-R 8444: HTTP tunnels use port 443 (https), 80 (http) or 0 (both)" in client.output()
        client = await ssh_env.ssh("http", forwards=("80:localhost:1",), user="root")
        assert await client.finished() == 2
        assert "log in as v2@" in client.output()


async def test_session_without_forward_times_out(ssh_env: SshEnv) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh("http")
        assert await client.finished() == 2
        assert "Error: no -R forward was requested" in client.output()


async def test_no_command_times_out(ssh_env: SshEnv) -> None:
    with trio.fail_after(20):
        client = await ssh_env.ssh("-N", forwards=("443:localhost:1",))
        assert await client.finished() == 255
        assert "no command within" in client.output()


def test_authorized_keys_reread_when_changed(tmp_path: Path) -> None:
    one, two = keygen(tmp_path / "one"), keygen(tmp_path / "two")
    key_one = asyncssh.import_public_key(one.with_suffix(".pub").read_bytes())
    key_two = asyncssh.import_public_key(two.with_suffix(".pub").read_bytes())
    path = tmp_path / "authorized_keys"
    keys = AuthorizedKeysFile(path)
    assert keys.lookup(key_one) is None  # no file: nobody
    path.write_bytes(one.with_suffix(".pub").read_bytes())
    found = keys.lookup(key_one)
    assert found is not None and found.owner == "ssh:" + key_one.get_fingerprint("sha256")
    assert found.comment == "one" and keys.lookup(key_two) is None
    # Options cannot be enforced: such a line is skipped, not obeyed halfway.
    path.write_bytes(b"# comment\n" + two.with_suffix(".pub").read_bytes() + b'from="10.0.0.1" '
                     + one.with_suffix(".pub").read_bytes())
    assert keys.lookup(key_two) is not None and keys.lookup(key_one) is None
    weak = tmp_path / "weak"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(weak)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    path.write_bytes(weak.with_suffix(".pub").read_bytes())
    assert keys.lookup(asyncssh.import_public_key(weak.with_suffix(".pub").read_bytes())) is None


async def test_off_unless_configured(edge_env: EdgeEnv) -> None:
    assert "ssh" not in edge_env.info.ports
    assert not (edge_env.data_dir / _gateway.HOST_KEY_FILE).exists()


def test_host_key_made_once(tmp_path: Path) -> None:
    first = _gateway.load_host_key(tmp_path)
    assert (tmp_path / _gateway.HOST_KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = _gateway.load_host_key(tmp_path)
    assert again.get_fingerprint("sha256") == first.get_fingerprint("sha256")


def test_command_parsing() -> None:
    cmd = parse_command("http 8080 --subdomain app --basic-auth=u:password1 --scheme http,https")
    assert (cmd.proto, cmd.addr, cmd.subdomain, cmd.schemes) == ("http", "8080", "app", ("http", "https"))
    binds = binds_for(cmd, "localhost", 443, {"http": 80, "https": 443}, DOMAIN)
    assert [b.proto for b in binds] == ["http", "https"]
    assert binds[0].opts == {"Subdomain": "app", "Auth": "u:password1"}
    tcp = parse_command("tcp 22 --remote-addr tunneld.test:10005")
    assert binds_for(tcp, "localhost", 0, {}, DOMAIN)[0].opts == {"Addr": "tunneld.test:10005"}
    assert binds_for(parse_command("tcp"), "localhost", 0, {}, DOMAIN)[0].opts == {}
    for bad in ("http --basic-auth u:short", "http --scheme ftp", "http 1 2", "tls --basic-auth a:bbbbbbbb",
                "http 'unbalanced"):
        with pytest.raises(UsageError):
            parse_command(bad)
    with pytest.raises(UsageError):
        binds_for(parse_command("tcp"), "elsewhere.example", 0, {}, DOMAIN)


async def test_registered_key_acl_and_reservations(ssh_env: SshEnv, upstream: Upstream) -> None:
    """A registered key's ACL and every account's reservations apply to its forwards, as to agents'."""
    store = ssh_env.edge.store
    domain = ssh_env.edge.config.domain
    carol = store.ensure_account("carol").id
    dave = store.ensure_account("dave").id
    key = keygen(ssh_env.data_dir / "carol")
    store.create_ssh_credential(carol, key.with_suffix(".pub").read_text(), acl=[f"bind:*.{domain}"])
    store.create_reserved_domain(dave, f"taken.{domain}")
    forward = (f"443:localhost:{upstream.port}",)
    with trio.fail_after(30):
        client = await ssh_env.ssh("http", "--subdomain", "carol", forwards=forward, key=key)
        (url,) = await client.urls(1)
        assert url.startswith(f"https://carol.{domain}")
        client.proc.terminate()
        await client.finished()
        client = await ssh_env.ssh("http", "--subdomain", "taken", forwards=forward, key=key)
        assert await client.finished() == 1
        assert "reserved by another account" in client.output() and "320" in client.output()
        client = await ssh_env.ssh("tcp", "22", forwards=("0:localhost:22",), key=key)
        assert await client.finished() == 1
        assert "does not allow a random address" in client.output() and "356" in client.output()
    assert ssh_env.edge.metrics.refused_binds.get("ERR_TUNNELD_320") == 1
    assert ssh_env.edge.metrics.refused_binds.get("ERR_TUNNELD_356") == 1


async def test_ssh_sessions_in_the_admin_api(ssh_env: SshEnv, upstream: Upstream) -> None:
    """SSH sessions are listed with their tunnels, by their account's API keys only."""
    from tunneld.core._admin import AdminApi

    store = ssh_env.edge.store
    erin = store.ensure_account("erin").id
    key = keygen(ssh_env.data_dir / "erin")
    record = store.create_ssh_credential(erin, key.with_suffix(".pub").read_text())
    _, erin_key = store.create_api_key(erin, "erin")
    _, default_key = store.create_api_key("default", "ops")
    admin = AdminApi(ssh_env.edge, ("127.0.0.1", 0))
    bound = await ssh_env.nursery.start(admin.run)
    with trio.fail_after(30):
        client = await ssh_env.ssh("http", forwards=(f"443:localhost:{upstream.port}",), key=key)
        (url,) = await client.urls(1)
        async with httpx.AsyncClient(base_url=f"http://{bound}", timeout=10,
                                     headers={"Authorization": f"Bearer {erin_key}"}) as api:
            (listed,) = (await api.get("/tunnel_sessions")).json()["tunnel_sessions"]
            assert listed["transport"] == "ssh" and listed["credential"]["id"] == record.id
            assert listed["agent_version"].startswith("SSH-2.0-OpenSSH") and listed["ip"] == "127.0.0.1"
            assert len(listed["tunnels"]) == 1
            one = (await api.get(f"/tunnel_sessions/{listed['id']}")).json()
            assert one["id"] == listed["id"]
            (tunnel,) = (await api.get("/tunnels")).json()["tunnels"]
            assert tunnel["public_url"] == url and tunnel["tunnel_session"]["id"] == listed["id"]
            others = (await api.get("/tunnel_sessions", headers={"Authorization": f"Bearer {default_key}"}))
            assert others.json()["tunnel_sessions"] == []
            restart = await api.post(f"/tunnel_sessions/{listed['id']}/restart")
            assert restart.status_code == 400 and "only stop it" in restart.json()["msg"]
            wrong = await api.post(f"/tunnel_sessions/{listed['id']}/stop",
                                   headers={"Authorization": f"Bearer {default_key}"})
            assert wrong.status_code == 404
            assert (await api.post(f"/tunnel_sessions/{listed['id']}/stop")).status_code == 204
        assert await client.finished() == 0
        assert "Stopped by the edge" in client.output()
        with trio.fail_after(5):
            while ssh_env.edge.plugin_sessions:
                await trio.sleep(0.02)
