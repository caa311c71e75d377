"""ngrok's own clients, unmodified and as published, against a tunneld edge on loopback.

* the ngrok agent 2.3.41 (npm ``@expo/ngrok-bin-linux-x64@2.3.42``): ``ngrok http`` with a v2
  config file naming ``server_addr`` and ``root_cas``;
* the JavaScript SDK (npm ``@ngrok/ngrok@1.7.0``) under Node;
* the Python SDK (PyPI ``ngrok==1.7.0``, Python >= 3.12) in its own venv.

``.ci/install-ngrok-clients`` installs them into the git-ignored ``.clients/`` (another place
with ``TUNNELD_CLIENTS_DIR``).  A missing client skips its tests, or fails them when
``TUNNELD_INTEROP_REQUIRED=1`` (set by ``.ci/run``).  Each client runs as a subprocess that
prints JSON lines (the SDKs, through the small scripts beside this file) or writes its own
log (the agent); the public side is httpx through the in-process edge of ``edge_env``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tunneld.core._edge import SDK_MAX_STREAMS

from ..conftest import DOMAIN, EdgeEnv
from ..core.test_resume import RestartableEdge, http_get, restartable  # noqa: F401 - fixture
from ..linkproxy import LinkProxy
from ..plugins.test_http import Upstream, httpx_for

HERE = Path(__file__).resolve().parent
CLIENTS = Path(os.environ.get("TUNNELD_CLIENTS_DIR") or HERE.parents[1] / ".clients")
AGENT_BIN = CLIENTS / "npm" / "node_modules" / "@expo" / "ngrok-bin-linux-x64" / "ngrok"
JS_SDK = CLIENTS / "npm" / "node_modules" / "@ngrok" / "ngrok"
PY_SDK_PYTHON = CLIENTS / "python" / "bin" / "python"
MiB = 1024 * 1024


def require(path: Path, what: str) -> Path:
    """``path`` if it exists; otherwise skip (fail when TUNNELD_INTEROP_REQUIRED=1)."""
    if path.exists():
        return path
    reason = f"{what} is not installed at {path}; run `bash .ci/install-ngrok-clients`"
    if os.environ.get("TUNNELD_INTEROP_REQUIRED") == "1":
        pytest.fail(reason + " (TUNNELD_INTEROP_REQUIRED=1)", pytrace=False)
    pytest.skip(reason)


def node() -> str:
    return str(require(Path(shutil.which("node") or "/usr/bin/node"), "Node.js"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    return await Upstream("A").start(nursery)


# Synchronous fixtures, so that a skip (or failure) is reported with its reason, outside trio.


@pytest.fixture
def agent_bin() -> Path:
    return require(AGENT_BIN, "the ngrok agent 2.3.41 (npm @expo/ngrok-bin-linux-x64@2.3.42)")


@pytest.fixture
def js_sdk() -> list[str]:
    package = require(JS_SDK, "the ngrok JavaScript SDK @ngrok/ngrok 1.7.0")
    return [node(), str(HERE / "ngrok_js_forward.js"), str(package)]


@pytest.fixture
def py_sdk() -> list[str]:
    python = require(PY_SDK_PYTHON, "the ngrok Python SDK 1.7.0 (Python >= 3.12 venv)")
    return [str(python), str(HERE / "ngrok_py_forward.py")]


# --------------------------------------------------------------------------------------------
# Client processes and the public side
# --------------------------------------------------------------------------------------------


class ClientProcess:
    """A client subprocess; reads the JSON lines it prints and keeps its stderr for messages."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        self._send, self._lines = trio.open_memory_channel[str](100)

    async def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        async with self._send:
            while chunk := await self.proc.stdout.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    await self._send.send(line.decode(errors="replace"))

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(65536):
            self.stderr += chunk[: max(0, 64 * 1024 - len(self.stderr))]

    async def message(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next JSON object the client prints (other lines are skipped)."""
        with trio.move_on_after(timeout):
            async for line in self._lines:
                if line.startswith("{"):
                    return dict(json.loads(line))
        raise AssertionError(f"no message from the client within {timeout} s (exit status "
                             f"{self.proc.returncode}); "
                             f"stderr: {self.stderr.decode(errors='replace')[-2000:]}")

    async def stop(self, grace: float) -> None:
        """Close stdin (the SDK scripts then disconnect); after ``grace`` s terminate, then kill."""
        if self.proc.stdin is not None:
            await self.proc.stdin.aclose()
        with trio.move_on_after(grace):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.terminate()
            with trio.move_on_after(5):
                await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@asynccontextmanager
async def run_client(argv: Sequence[str], *, env: dict[str, str] | None = None,
                     grace: float = 5.0) -> AsyncIterator[ClientProcess]:
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=env)
        client = ClientProcess(proc)
        nursery.start_soon(client._pump_stdout)
        nursery.start_soon(client._pump_stderr)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.stop(grace)
            nursery.cancel_scope.cancel()


def run_sdk(command: list[str], env: EdgeEnv, port: int,
            **options: Any) -> AbstractAsyncContextManager[ClientProcess]:
    """Run an SDK script (``js_sdk`` or ``py_sdk``) forwarding to 127.0.0.1:``port``."""
    config = {"addr": f"127.0.0.1:{port}", "authtoken": env.token, "server_addr": env.agent_addr,
              "root_cas": str(env.ca), **options}
    return run_client([*command, json.dumps(config)])


async def fetch(env: EdgeEnv, url: str, method: str = "GET", content: bytes | None = None) -> httpx.Response:
    """``method`` on a public URL the edge gave out, connecting to the edge on 127.0.0.1."""
    parts = urlsplit(url)
    assert parts.hostname and parts.hostname.endswith("." + DOMAIN), url
    assert parts.port == {"http": env.http_port, "https": env.https_port}[parts.scheme], url
    client, base, ext = httpx_for(env, parts.scheme, parts.hostname)
    async with client:
        return await client.request(method, base + (parts.path or "/"), content=content, extensions=ext)


async def check_serves(env: EdgeEnv, url: str, *, post_size: int = 0) -> None:
    """GETs through ``url`` reach the upstream; a ``post_size`` body arrives intact."""
    for _ in range(3):
        resp = await fetch(env, url + "/hello")
        assert resp.status_code == 200, resp.text
        assert resp.text == "hello from A\n"
    if post_size:
        body = random.Random(post_size).randbytes(post_size)
        resp = await fetch(env, url + "/sha256", "POST", body)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def assert_refused(msg: dict[str, Any], what: str, code: int) -> None:
    """A Python SDK error message that carries our text and code, in both spellings."""
    assert msg.get("error") == "ValueError", msg
    text = " ".join(msg["args"])
    assert what in text and f"ERR_TUNNELD_{code}" in text, msg
    assert msg["args"][-1] == f"ERR_NGROK_{code}", msg


# --------------------------------------------------------------------------------------------
# The ngrok agent 2.3.41
# --------------------------------------------------------------------------------------------


def agent_command(agent_bin: Path, tmp_path: Path, server_addr: str, env: EdgeEnv,
                  port: int) -> tuple[list[str], dict[str, str], int, Path]:
    """argv, environment, web port and log file of ``ngrok http`` with a v2 config for our edge."""
    web_port = free_port()
    log = tmp_path / "ngrok-agent.log"
    config = tmp_path / "ngrok.yml"
    config.write_text("\n".join([
        f"server_addr: {server_addr}",
        f"root_cas: {env.ca}",
        f"authtoken: {env.token}",
        f"web_addr: 127.0.0.1:{web_port}",
        "update_check: false",
        "console_ui: false",
        f"log: {log}",
        "log_format: logfmt",
        "",
    ]))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environ = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return [str(agent_bin), "http", "-config", str(config), f"127.0.0.1:{port}"], environ, web_port, log


async def agent_urls(client: ClientProcess, web_port: int, log: Path) -> dict[str, str]:
    """proto → public URL, from the agent's own API, once both tunnels are listed."""
    tunnels: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=5) as api:
        with trio.fail_after(20):
            while len(tunnels) < 2:
                assert client.proc.returncode is None, log.read_text() if log.exists() else client.stderr  # noqa: ASYNC240
                try:
                    tunnels = (await api.get(f"http://127.0.0.1:{web_port}/api/tunnels")).json()["tunnels"]
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
    return {t["proto"]: t["public_url"] for t in tunnels}


async def serves_again_within(env: EdgeEnv, url: str, timeout: float) -> float:
    """Seconds until a GET through ``url`` succeeds again."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            try:
                resp = await fetch(env, url + "/hello")
                if resp.status_code == 200:
                    return trio.current_time() - start
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def test_agent_2_3_41_http_tunnels(agent_bin: Path, edge_env: EdgeEnv, upstream: Upstream,
                                         tmp_path: Path) -> None:
    """`ngrok http` binds https and http, serves GETs and 3 MB bodies through both, lists the
    edge's URLs in its own API, and keeps its one session through ~27 s of heartbeats."""
    argv, env, web_port, log = agent_command(agent_bin, tmp_path, edge_env.agent_addr, edge_env,
                                             upstream.port)
    async with run_client(argv, env=env, grace=0) as client:
        started = trio.current_time()
        # Its local API lists both tunnels once the edge has answered both Binds.
        urls = await agent_urls(client, web_port, log)
        assert set(urls) == {"https", "http"}, urls
        https_host = urlsplit(urls["https"]).hostname
        assert https_host == urlsplit(urls["http"]).hostname, urls  # one name for both schemes
        assert urls == {"https": f"https://{https_host}:{edge_env.https_port}",
                        "http": f"http://{https_host}:{edge_env.http_port}"}
        # The URLs it shows are the ones the edge returned in BindResp (its log quotes them).
        logged = set(re.findall(r'msg="started tunnel" .* url=(\S+)', log.read_text()))
        assert logged == set(urls.values()), log.read_text()

        for url in urls.values():
            await check_serves(edge_env, url, post_size=3 * MiB)
        sessions = set(edge_env.edge.sessions)
        assert len(sessions) == 1

        # Heartbeats: 10 s interval, 25 s before the agent gives up on a silent edge.
        await trio.sleep_until(started + 27)
        for url in urls.values():
            await check_serves(edge_env, url)
        assert set(edge_env.edge.sessions) == sessions, "the agent reconnected"
        assert client.proc.returncode is None
        text = log.read_text()
        assert text.count('msg="client session established"') == 1, text
        assert "lvl=eror" not in text and "lvl=crit" not in text, text


async def test_agent_2_3_41_host_header_rewrite(agent_bin: Path, edge_env: EdgeEnv, upstream: Upstream,
                                                tmp_path: Path) -> None:
    """ngrok's v2 agent rewrites Host itself and sends HostHeaderRewrite for information: the
    edge binds it (only SDK clients, which expect the edge to rewrite, are refused)."""
    argv, env, web_port, log = agent_command(agent_bin, tmp_path, edge_env.agent_addr, edge_env,
                                             upstream.port)
    argv.insert(2, "-host-header=rewrite")
    async with run_client(argv, env=env, grace=0) as client:
        urls = await agent_urls(client, web_port, log)
        resp = await fetch(edge_env, urls["http"] + "/hello")
        assert resp.status_code == 200, resp.text
    public = urlsplit(urls["http"]).hostname
    hosts = {dict((k.lower(), v) for k, v in r["headers"])["host"] for r in upstream.requests}
    assert hosts and not any(public in h for h in hosts), hosts


# --------------------------------------------------------------------------------------------
# The JavaScript SDK @ngrok/ngrok 1.7.0
# --------------------------------------------------------------------------------------------


async def test_js_sdk_forward(js_sdk: list[str], edge_env: EdgeEnv, upstream: Upstream) -> None:
    """ngrok.forward() under Node: the URL it prints serves GETs and a 3 MB body; its
    disconnect() unbinds the tunnel at once."""
    async with run_sdk(js_sdk, edge_env, upstream.port) as client:
        msg = await client.message()
        assert "url" in msg, msg
        url = msg["url"]
        assert url.startswith("https://"), url
        await check_serves(edge_env, url, post_size=3 * MiB)
        await client.proc.stdin.aclose()  # type: ignore[union-attr]
        assert await client.message() == {"closed": True}
        resp = await fetch(edge_env, url + "/hello")
        assert resp.status_code == 404 and resp.headers["Tunneld-Error-Code"] == "ERR_TUNNELD_3200"


async def test_js_sdk_compression_refused(js_sdk: list[str], edge_env: EdgeEnv, upstream: Upstream) -> None:
    """``compression: true`` arrives as ``"Compression": {}``; an empty object is still a request."""
    async with run_sdk(js_sdk, edge_env, upstream.port, compression=True) as client:
        msg = await client.message()
        assert "compression is not supported" in msg.get("error", ""), msg
        assert "ERR_TUNNELD_336" in msg["error"] and msg["code"] == "ERR_NGROK_336", msg


# --------------------------------------------------------------------------------------------
# The Python SDK ngrok 1.7.0
# --------------------------------------------------------------------------------------------


async def test_py_sdk_forward(py_sdk: list[str], edge_env: EdgeEnv, upstream: Upstream) -> None:
    """ngrok.forward(..., server_addr=, root_cas=) under Python 3.12: GETs served, then
    disconnect() unbinds."""
    async with run_sdk(py_sdk, edge_env, upstream.port) as client:
        msg = await client.message()
        assert "url" in msg, msg
        url = msg["url"]
        assert url.startswith("https://"), url
        await check_serves(edge_env, url)
        await client.proc.stdin.aclose()  # type: ignore[union-attr]
        assert await client.message() == {"closed": True}
        resp = await fetch(edge_env, url + "/hello")
        assert resp.status_code == 404 and resp.headers["Tunneld-Error-Code"] == "ERR_TUNNELD_3200"


async def test_py_sdk_wrong_authtoken(py_sdk: list[str], edge_env: EdgeEnv, upstream: Upstream) -> None:
    """A revoked authtoken: the SDK's own ValueError carries our message and code."""
    record, token = edge_env.store.create_token("revoked")
    edge_env.store.revoke_token(record.id)
    async with run_sdk(py_sdk, edge_env, upstream.port, authtoken=token) as client:
        msg = await client.message()
    assert msg["args"][0] == "failed to connect session", msg
    assert_refused(msg, "the authtoken is invalid or has been revoked", 107)


@pytest.mark.parametrize(("options", "what"), [
    ({"oauth_provider": "google", "oauth_allow_emails": ["a@example.com"]}, "OAuth"),
    # ngrok-python 1.7.0 spells IP restrictions allow_cidr/deny_cidr (it silently drops
    # ip_restriction_allow_cidrs, which only the JavaScript SDK knows).
    ({"allow_cidr": "10.0.0.0/8", "deny_cidr": "10.1.0.0/16"}, "IP restrictions"),
])
async def test_py_sdk_unenforced_options_refused(py_sdk: list[str], edge_env: EdgeEnv, upstream: Upstream,
                                                 options: dict[str, Any], what: str) -> None:
    """Options tunneld cannot enforce make forward() raise with our message, never bind."""
    async with run_sdk(py_sdk, edge_env, upstream.port, **options) as client:
        msg = await client.message()
    assert msg["args"][0] == "failed to start listener", msg
    assert_refused(msg, f"{what} is not supported by this edge", 336)


# --------------------------------------------------------------------------------------------
# Reconnect and resume: the link breaks, the client comes back to the same URLs
# --------------------------------------------------------------------------------------------


async def test_agent_2_3_41_resumes_same_urls(agent_bin: Path, edge_env: EdgeEnv, upstream: Upstream,
                                              tmp_path: Path, nursery: trio.Nursery) -> None:
    """The link is reset under the agent: it reconnects with its ClientId, Cookie and tunnel
    Tokens, and the edge gives both tunnels their old URLs back."""
    proxy = await LinkProxy(edge_env.info.ports["agent"]).start(nursery)
    argv, env, web_port, log = agent_command(agent_bin, tmp_path, f"127.0.0.1:{proxy.port}", edge_env,
                                             upstream.port)
    async with run_client(argv, env=env, grace=0) as client:
        urls = await agent_urls(client, web_port, log)
        for url in urls.values():
            await check_serves(edge_env, url)
        (session,) = edge_env.edge.sessions
        proxy.cut()
        for url in urls.values():
            await serves_again_within(edge_env, url, 15)
        assert proxy.connections == 2
        (resumed,) = edge_env.edge.sessions
        assert resumed is not session and resumed.client_id == session.client_id
        assert await agent_urls(client, web_port, log) == urls


async def test_py_sdk_resumes_same_url(py_sdk: list[str], edge_env: EdgeEnv, upstream: Upstream,
                                       nursery: trio.Nursery) -> None:
    """The Rust-based SDK rebinds with its tunnel Token after a reset link: same URL."""
    proxy = await LinkProxy(edge_env.info.ports["agent"]).start(nursery)
    async with run_sdk(py_sdk, edge_env, upstream.port, server_addr=f"127.0.0.1:{proxy.port}") as client:
        msg = await client.message()
        url = msg["url"]
        await check_serves(edge_env, url)
        (session,) = edge_env.edge.sessions
        proxy.cut()
        took = await serves_again_within(edge_env, url, 15)
        (resumed,) = edge_env.edge.sessions
        assert resumed is not session and resumed.client_id == session.client_id, took


async def test_py_sdk_more_concurrent_connections_than_it_accepts(py_sdk: list[str], edge_env: EdgeEnv,
                                                                  nursery: trio.Nursery) -> None:
    """ngrok-rust breaks down past 512 streams per session: the edge queues public connections
    beyond SDK_MAX_STREAMS instead.  600 requests at once, most of the allowed ones held open."""
    n = 600
    arrived = trio.Event()
    count = [0]

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            if not (data := await stream.receive_some()):
                return
            buf += data
        count[0] += 1
        if count[0] >= SDK_MAX_STREAMS - 10:  # most of the allowed streams are held open
            arrived.set()
        with trio.move_on_after(1.0):
            await arrived.wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with run_sdk(py_sdk, edge_env, port, schemes=["HTTP"]) as client:
        url = (await client.message())["url"]
        host = urlsplit(url).hostname
        statuses: list[bytes] = []

        async def one() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", edge_env.http_port)
            async with stream:
                await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                got = b""
                while data := await stream.receive_some():
                    got += data
                statuses.append(got[9:12])

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                for _ in range(n):
                    inner.start_soon(one)
        assert statuses.count(b"200") == n, {s: statuses.count(s) for s in set(statuses)}


async def test_py_sdk_back_on_its_url_after_an_edge_restart(py_sdk: list[str],
                                                            restartable: RestartableEdge,
                                                            upstream: Upstream,
                                                            nursery: trio.Nursery) -> None:
    """The edge dies and comes back on the same data dir: the SDK reconnects by itself and its
    URL serves again (the name was held for it, and its resume token is still valid)."""
    token = restartable.store.create_token("sdk")[1]
    await restartable.start(nursery)
    config = {"addr": f"127.0.0.1:{upstream.port}", "authtoken": token, "schemes": ["HTTP"],
              "server_addr": f"127.0.0.1:{restartable.ports['agent']}",
              "root_cas": str(restartable.tmp / "ca.pem")}
    async with run_client([*py_sdk, json.dumps(config)]) as client:
        url = (await client.message())["url"]
        host = urlsplit(url).hostname
        assert host

        async def get() -> bytes:
            return await http_get(restartable.ports["http"], host, "/hello")

        assert b"hello from A" in await get()
        restartable.kill()
        await trio.sleep(0.5)
        await restartable.start(nursery)
        back = trio.current_time()
        with trio.fail_after(20):
            while b"hello from A" not in await get():
                await trio.sleep(0.1)
        print(f"the SDK's URL served again {trio.current_time() - back:.2f}s after the edge came back")


async def test_agent_2_3_41_back_on_its_urls_after_an_edge_restart(agent_bin: Path,
                                                                   restartable: RestartableEdge,
                                                                   upstream: Upstream, tmp_path: Path,
                                                                   nursery: trio.Nursery) -> None:
    """ngrok's own agent reconnects by itself when the edge restarts on the same data dir, and
    both its tunnels are back on the URLs they had."""
    token = restartable.store.create_token("agent")[1]
    await restartable.start(nursery)
    # What agent_command and httpx_for read of an EdgeEnv.
    env_like: Any = SimpleNamespace(ca=restartable.tmp / "ca.pem", token=token,
                                    http_port=restartable.ports["http"],
                                    https_port=restartable.ports["https"])
    argv, environ, web_port, log = agent_command(agent_bin, tmp_path,
                                                 f"127.0.0.1:{restartable.ports['agent']}",
                                                 env_like, upstream.port)
    async with run_client(argv, env=environ, grace=0) as client:
        urls = await agent_urls(client, web_port, log)

        async def serves(url: str) -> bool:
            parts = urlsplit(url)
            http, base, ext = httpx_for(env_like, parts.scheme, parts.hostname or "")
            try:
                async with http:
                    resp = await http.get(base + "/hello", extensions=ext)
            except httpx.TransportError:
                return False
            return resp.status_code == 200 and resp.text == "hello from A\n"

        for url in urls.values():
            assert await serves(url)
        restartable.kill()
        await trio.sleep(0.5)
        await restartable.start(nursery)
        with trio.fail_after(30):
            for url in urls.values():
                while not await serves(url):
                    await trio.sleep(0.2)
        assert await agent_urls(client, web_port, log) == urls
