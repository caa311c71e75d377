"""The WebSocket carrier: URL parsing, the edge telling carriers apart, and the CLI end to end."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from tunneld.core._tls import client_context, open_tls_client
from tunneld.core._websocket import looks_like_websocket, parse_websocket_url

from ..conftest import EdgeEnv
from ..test_cli import (  # noqa: F401 - fixtures are used by name
    EdgeProc,
    Proc,
    curl,
    edge,
    http_upstream,
    procs,
    spawn,
    started_urls,
)


@pytest.mark.parametrize(("url", "want"), [
    ("wss://edge.example.com", ("edge.example.com", 443, "/tunneld")),
    ("wss://edge.example.com:8443/x/y?z=1", ("edge.example.com", 8443, "/x/y?z=1")),
    ("WSS://[::1]:4443/t", ("::1", 4443, "/t")),
])
def test_parse_websocket_url(url: str, want: tuple[str, int, str]) -> None:
    assert parse_websocket_url(url) == want


@pytest.mark.parametrize("url", ["ws://edge:80/", "wss://", "wss://edge:99999/", "https://edge/"])
def test_parse_websocket_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_websocket_url(url)


def test_sniffing_rule() -> None:
    # A muxado peer opens with a DATA+SYN frame: byte 3 is 0x12, never an ASCII letter.
    assert looks_like_websocket(b"GET /tunneld HTTP/1.1\r\n")
    assert not looks_like_websocket(b"\x00\x00\x04\x12\x00\x00\x00\x03")


async def test_plain_http_get_on_agent_port_is_refused(edge_env: EdgeEnv) -> None:
    """A GET without an Upgrade gets an HTTP error and the connection ends; no session is made."""
    tls = await open_tls_client("127.0.0.1", edge_env.info.ports["agent"], client_context(edge_env.ca))
    await tls.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    with trio.fail_after(5):
        try:
            while data := await tls.receive_some():
                got += data
        except trio.BrokenResourceError:
            pass
    assert got.startswith(b"HTTP/1.1 4"), got[:100]
    assert not edge_env.edge.sessions
    await trio.aclose_forcefully(tls)


def test_cli_agent_over_websocket(edge: EdgeProc, http_upstream: int, spawn: Callable[..., Proc]) -> None:
    flags = ["--authtoken", edge.token, "--server-addr", f"wss://127.0.0.1:{edge.agent}/tunneld",
             "--root-cas", str(edge.ca), "--log", "stdout", "--log-format", "logfmt", "--web-addr", "false"]
    agent = spawn("http", str(http_upstream), *flags)
    urls = started_urls(agent, 2)
    for url in urls.values():
        assert "hello from upstream /ws" in curl(url + "/ws", "--cacert", str(edge.ca))


def test_cli_refuses_bad_server_url(spawn: Callable[..., Proc]) -> None:
    agent = spawn("http", "8080", "--server-addr", "wss://edge:99999/x", "--authtoken", "x")
    assert agent.popen.wait(15) == 1
    assert "--server-addr" in agent.err and "port" in agent.err
