"""pyngrok (PyPI, unmodified) driving tunneld through ``tunneld-ngrok`` instead of ngrok.

pyngrok runs ``tunneld-ngrok start --none --log stdout --config PATH --authtoken T``, waits for
the agent's log lines, then starts and stops tunnels through the local API: ``/api/tunnels``
with ``config_version="2"``, ``/api/endpoints`` with ``"3"``.  Its calls block, so they run in
threads beside the in-process edge of ``edge_env``; the public side is httpx and raw sockets.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import trio
import yaml

# pyngrok is in the test extra (README command 2 installs it): missing, the module fails to
# import instead of skipping, as tunneld-ngrok missing fails below.
from pyngrok import conf, installer, ngrok
from pyngrok.exception import PyngrokNgrokError

from ..conftest import EdgeEnv, start_echo_server
from ..core.test_resume import tcp_echo
from ..plugins.test_http import Upstream, httpx_for

T = TypeVar("T")


def launcher() -> str:
    """The installed ``tunneld-ngrok`` console script (beside this Python's, else on PATH)."""
    beside = Path(sys.executable).parent / "tunneld-ngrok"
    found = str(beside) if beside.exists() else shutil.which("tunneld-ngrok")
    if found is None:
        pytest.fail("tunneld-ngrok is not installed: pip install -e '.[test]'", pytrace=False)
    return found


def write_config(env: EdgeEnv, path: Path, version: str) -> None:
    """An ngrok config file as a pyngrok user would write it, pointing at the test edge."""
    settings = {"server_addr": env.agent_addr, "root_cas": str(env.ca), "web_addr": "127.0.0.1:0"}
    if version == "3":
        data: dict[str, Any] = {"version": "3", "agent": {"connect_url": settings["server_addr"],
                                                          "connect_cas": settings["root_cas"],
                                                          "web_addr": settings["web_addr"]}}
    else:
        data = {"version": "2", **settings}
    path.write_text(yaml.safe_dump(data))


def edit_config(cfg: conf.PyngrokConfig, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the config file's data (and return it)."""
    path = Path(str(cfg.config_path))
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return dict(data)


async def in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def get_public(env: EdgeEnv, url: str) -> tuple[int, str]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    client, base, ext = httpx_for(env, parts.scheme, parts.hostname)
    async with client:
        with trio.fail_after(20):
            response = await client.get(f"{base}/hello", extensions=ext)
    return response.status_code, response.text


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def closed(port: int) -> bool:
    try:
        return await tcp_echo(port) == b""
    except OSError:
        return True


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyngrok must never fetch ngrok: tunneld-ngrok is there at ``ngrok_path``."""
    def refuse(*args: Any, **kw: Any) -> None:
        raise AssertionError("pyngrok tried to download ngrok")

    monkeypatch.setattr(installer, "install_ngrok", refuse)
    monkeypatch.setattr(installer, "_download_file", refuse)


@pytest.fixture
def pyngrok_config(request: pytest.FixtureRequest, edge_env: EdgeEnv, tmp_path: Path) -> conf.PyngrokConfig:
    version = request.param
    path = tmp_path / f"ngrok-v{version}.yml"
    write_config(edge_env, path, version)
    return conf.PyngrokConfig(ngrok_path=launcher(), config_path=str(path), auth_token=edge_env.token,
                              config_version=version, startup_timeout=30, request_timeout=20)


@pytest.mark.parametrize("pyngrok_config", ["2", "3"], indirect=True)
async def test_pyngrok_connect_list_disconnect_kill(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                    pyngrok_config: conf.PyngrokConfig) -> None:
    upstream = await Upstream("A").start(nursery)
    echo = await start_echo_server(nursery)
    cfg = pyngrok_config
    try:
        http_tunnel = await in_thread(ngrok.connect, str(upstream.port), pyngrok_config=cfg)
        assert http_tunnel.public_url.startswith("https://"), http_tunnel.public_url
        assert http_tunnel.proto == "https"
        tcp_tunnel = await in_thread(ngrok.connect, echo, "tcp", pyngrok_config=cfg)
        assert tcp_tunnel.public_url.startswith("tcp://"), tcp_tunnel.public_url
        process = ngrok.get_ngrok_process(cfg)
        assert process.api_url is not None and process.api_url.startswith("http://127.0.0.1:")

        # Both serve their upstream.
        status, text = await get_public(edge_env, http_tunnel.public_url)
        assert (status, text) == (200, "hello from A\n"), (status, text)
        assert upstream.requests, "the request did not reach the upstream"
        assert await tcp_echo(port_of(tcp_tunnel.public_url), b"through pyngrok") == b"through pyngrok"

        listed = {t.public_url: t for t in await in_thread(ngrok.get_tunnels, cfg)}
        assert http_tunnel.public_url in listed and tcp_tunnel.public_url in listed
        assert listed[tcp_tunnel.public_url].proto == "tcp"
        assert listed[http_tunnel.public_url].name == http_tunnel.name
        if cfg.config_version == "3":
            assert listed[http_tunnel.public_url].upstream == {"url": f"http://localhost:{upstream.port}",
                                                               "protocol": "http1"}
        else:
            assert listed[http_tunnel.public_url].config["addr"] == f"http://localhost:{upstream.port}"

        await in_thread(ngrok.disconnect, http_tunnel.public_url, cfg)
        await in_thread(ngrok.disconnect, tcp_tunnel.public_url, cfg)
        urls = {t.public_url for t in await in_thread(ngrok.get_tunnels, cfg)}
        assert urls.isdisjoint({http_tunnel.public_url, tcp_tunnel.public_url}), urls
        status, _ = await get_public(edge_env, http_tunnel.public_url)
        assert status == 404
        assert await closed(port_of(tcp_tunnel.public_url))

        proc = process.proc
        await in_thread(ngrok.kill, cfg)
        assert proc.poll() is not None
    finally:
        ngrok.kill(cfg)


@pytest.mark.parametrize("pyngrok_config", ["3"], indirect=True)
async def test_pyngrok_reports_a_refused_authtoken(edge_env: EdgeEnv,
                                                   pyngrok_config: conf.PyngrokConfig) -> None:
    pyngrok_config.auth_token = "tkd_not_a_real_token"
    try:
        with pytest.raises(PyngrokNgrokError) as info:
            await in_thread(ngrok.connect, "8080", pyngrok_config=pyngrok_config)
        assert "auth" in str(info.value).lower()
    finally:
        ngrok.kill(pyngrok_config)


@pytest.mark.parametrize("pyngrok_config", ["2", "3"], indirect=True)
async def test_pyngrok_named_definitions_from_the_config(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                         pyngrok_config: conf.PyngrokConfig) -> None:
    """``ngrok.connect(name=...)`` posts the config file's definition (v2 ``tunnels:``, v3 ``endpoints:``)."""
    upstream = await Upstream("B").start(nursery)

    def define(data: dict[str, Any]) -> None:
        if pyngrok_config.config_version == "3":
            data["endpoints"] = [{"name": "site", "url": "http://", "upstream": {"url": upstream.port}}]
        else:
            data["tunnels"] = {"site": {"proto": "http", "addr": upstream.port, "schemes": ["http"]}}

    edit_config(pyngrok_config, define)
    try:
        tunnel = await in_thread(ngrok.connect, name="site", pyngrok_config=pyngrok_config)
        assert tunnel.name == "site-api"
        assert tunnel.public_url.startswith("http://"), tunnel.public_url
        assert await get_public(edge_env, tunnel.public_url) == (200, "hello from B\n")
    finally:
        ngrok.kill(pyngrok_config)


@pytest.mark.parametrize("pyngrok_config", ["3"], indirect=True)
async def test_pyngrok_reports_a_config_error(pyngrok_config: conf.PyngrokConfig) -> None:
    edit_config(pyngrok_config, lambda data: data["agent"].update(proxy_url="http://proxy.example:3128"))
    try:
        with pytest.raises(PyngrokNgrokError) as info:
            await in_thread(ngrok.get_tunnels, pyngrok_config)
        assert "proxy_url" in str(info.value)
    finally:
        ngrok.kill(pyngrok_config)


@pytest.mark.parametrize("pyngrok_config", ["2", "3"], indirect=True)
async def test_pyngrok_version_authtoken_update(edge_env: EdgeEnv,
                                                pyngrok_config: conf.PyngrokConfig) -> None:
    """The other commands pyngrok runs: ``--version``, ``config add-authtoken``, ``update``."""
    from tunneld import __version__

    ngrok_version, _ = await in_thread(ngrok.get_version, pyngrok_config)
    assert ngrok_version == __version__
    await in_thread(ngrok.set_auth_token, edge_env.token, pyngrok_config)
    saved = edit_config(pyngrok_config, lambda data: None)
    where = saved["agent"] if pyngrok_config.config_version == "3" else saved
    assert where["authtoken"] == edge_env.token
    assert "no update performed" in await in_thread(ngrok.update, pyngrok_config)
    # The saved token is the one used: no auth_token override this time.
    pyngrok_config.auth_token = None
    try:
        assert await in_thread(ngrok.get_tunnels, pyngrok_config) == []
    finally:
        ngrok.kill(pyngrok_config)


@pytest.mark.parametrize("pyngrok_config", ["3"], indirect=True)
async def test_pyngrok_api_reaches_the_edge_admin_api(edge_env: EdgeEnv, monkeypatch: pytest.MonkeyPatch,
                                                      pyngrok_config: conf.PyngrokConfig) -> None:
    """``ngrok.api(...)`` runs ``tunneld-ngrok --config P api --api-key K ...``: tunneld's ``api``."""
    from tunneld.core._admin import AdminApi
    from tunneld.core._store import DEFAULT_ACCOUNT

    _record, key = edge_env.store.create_api_key(DEFAULT_ACCOUNT, "pyngrok")
    bound = await edge_env.nursery.start(AdminApi(edge_env.edge, ("127.0.0.1", 0)).run)
    monkeypatch.setenv("TUNNELD_API_URL", f"http://{bound}")
    pyngrok_config.api_key = key
    response = await in_thread(ngrok.api, "credentials", "list", pyngrok_config=pyngrok_config)
    assert response.data is not None
    assert [c["description"] for c in response.data["credentials"]] == ["test"]
