"""``tunneld demo``: a dev-mode edge, a hello page and an agent, in one process."""

from __future__ import annotations

import signal
import sys
from functools import partial
from pathlib import Path

import trio

from ._agent_main import print_console
from ._edge_main import ensure_dev_token
from .core import Agent, AgentConfig, ConfigError, Edge, EdgeConfig, TunnelConfig
from .core._certs import ensure_dev_certs
from .core._store import Store

HELLO = b"Hello from tunneld! This page came through your tunnel.\n"


async def _hello(stream: trio.SocketStream) -> None:
    """A minimal upstream: answers any request with a short page."""
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < 65536:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(HELLO))
    await stream.send_all(head + HELLO)
    await stream.aclose()


def run_demo(addr: str | None, data_dir: Path, http_port: int, https_port: int, agent_port: int,
             web_addr: str) -> int:
    domain = "tunneld.localhost"
    certs = ensure_dev_certs(data_dir, domain, ["127.0.0.1", "localhost"])
    store = Store.open(data_dir)
    token = ensure_dev_token(store, data_dir).read_text().strip()
    config = EdgeConfig(data_dir=data_dir, domain=domain, tls_cert=certs.cert, tls_key=certs.key,
                        agent_addr=("127.0.0.1", agent_port), http_addr=("127.0.0.1", http_port),
                        https_addr=("127.0.0.1", https_port), tcp_host="127.0.0.1", tcp_ports=(20000, 20999))

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                edge = Edge(config, store)
                await nursery.start(edge.serve)
                target = addr
                if target is None:
                    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), _hello, 0)
                    target = str(listeners[0].socket.getsockname()[1])
                agent_cfg = AgentConfig(authtoken=token, server_addr=f"127.0.0.1:{agent_port}",
                                        root_cas=str(certs.ca_cert), web_addr=web_addr)
                agent = Agent(agent_cfg, [TunnelConfig(name="command_line", proto="http", addr=target)])
                from .core._web import serve_web

                web = await nursery.start(serve_web, agent, web_addr) if web_addr != "false" else None
                await nursery.start(agent.run)
                print_console(agent, web)
                url = next(t.public_url for t in agent.tunnels if t.public_url.startswith("http://"))
                print(f"\nTry it:  curl {url}/\n", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    errors: list[str] = []
    try:
        trio.run(main)
    except* ConfigError as group:
        errors = [str(e) for e in group.exceptions]
    except* KeyboardInterrupt:
        pass
    finally:
        store.close()
    for error in errors:
        print(f"tunneld: error: {error}", file=sys.stderr)
    return 1 if errors else 0
