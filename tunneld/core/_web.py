"""The agent's local web server (127.0.0.1:4040): ngrok's REST API and a status page.

Served by hypercorn's Trio worker with a Starlette app: a well-kept HTTP stack rather than a
hand-rolled one.  Like ngrok, it answers only localhost-like Host headers (a DNS-rebinding
defence) and takes the next port when 4040 is in use.
"""

from __future__ import annotations

import html
import logging
import socket
from typing import Any
from urllib.parse import quote

import trio

from .. import __version__
from ._agent import Agent, AgentTunnel
from ._util import split_host_port

log = logging.getLogger("tunneld.web")

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


def tunnel_json(t: AgentTunnel) -> dict[str, Any]:
    """One tunnel in ngrok's ``/api/tunnels`` shape."""
    return {
        "ID": t.tunnel_id,
        "name": t.name,
        "uri": f"/api/tunnels/{quote(t.name)}",
        "public_url": t.public_url,
        "proto": t.proto,
        # Each type says what its config looks like (ngrok's shapes: addr, inspect, ...).
        "config": t.type.api_config(t.config, t.upstream),
        "metrics": t.metrics.as_json(),
        # tunneld's addition: who is connected (public client addresses), newest last.
        "connections": [c.as_json() for c in t.metrics.recent],
    }


def build_app(agent: Agent) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, msg: str, code: int = 100) -> JSONResponse:
        return JSONResponse({"error_code": code, "status_code": status, "msg": msg, "details": {}}, status)

    async def tunnels(request: Request) -> Response:
        return JSONResponse({"tunnels": [tunnel_json(t) for t in agent.tunnels], "uri": "/api/tunnels"})

    async def tunnel(request: Request) -> Response:
        name = request.path_params["name"]
        for t in agent.tunnels:
            if t.name == name:
                return JSONResponse(tunnel_json(t))
        return error(404, f"tunnel {name!r} not found", 104)

    async def status(request: Request) -> Response:
        latency = f"{agent.latency * 1000:.0f}ms" if agent.latency is not None else ""
        return JSONResponse({
            "status": agent.status,
            "agent_version": __version__,
            "session": {"id": agent.client_id, "server_addr": agent.config.server_addr,
                        "legs": [{"region": "local", "latency": latency}]},
            "uri": "/api/status",
        })

    async def root(request: Request) -> Response:
        return JSONResponse({"uri": "/api", "tunnels": "/api/tunnels", "status": "/api/status"})

    async def page(request: Request) -> Response:
        rows = "".join(
            f"<tr><td>{html.escape(t.name)}</td><td><a href=\"{html.escape(t.public_url)}\">"
            f"{html.escape(t.public_url)}</a></td><td>{html.escape(t.upstream)}</td>"
            f"<td>{t.metrics.conns_count}</td><td>{t.metrics.http_count}</td></tr>"
            for t in agent.tunnels
        )
        body = (
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>tunneld agent</title></head>"
            "<body><h1>tunneld agent</h1>"
            f"<p>Session status: <b id=\"status\">{html.escape(agent.status)}</b> &middot; "
            f"server {html.escape(agent.config.server_addr)} &middot; version {__version__}</p>"
            "<table border=\"1\" cellpadding=\"4\"><tr><th>Name</th><th>Public URL</th><th>Forwards to</th>"
            f"<th>Connections</th><th>HTTP requests</th></tr>{rows}</table></body></html>"
        )
        return HTMLResponse(body)

    app = Starlette(routes=[
        Route("/", page),
        Route("/status", page),
        Route("/api", root),
        Route("/api/", root),
        Route("/api/tunnels", tunnels),
        Route("/api/tunnels/{name:path}", tunnel),
        Route("/api/status", status),
    ])

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = ""
            for name, value in scope.get("headers", []):
                if name == b"host":
                    host = value.decode("latin-1").lower()
            hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and hostname not in _LOCAL_HOSTS and not hostname.endswith(".localhost"):
                await error(403, "the agent API only answers localhost Host headers", 403)(
                    scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def _free_port(host: str, start: int) -> int:
    """The first bindable port from ``start`` (ngrok moves to 4041, 4042 ... when 4040 is taken)."""
    if start == 0:
        return 0
    for port in range(start, start + 20):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                if port == start:
                    log.warning("can't bind default web address %s:%d", host, port,
                                extra={"event": "can't bind default web address",
                                       "fields": {"addr": f"{host}:{port}"}})
    raise OSError(f"no free port for the web interface from {start}")


async def serve_web(agent: Agent, addr: str, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the local API until cancelled; ``started()`` reports the bound ``host:port``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    host, port = split_host_port(addr)
    host = host.strip("[]") or "127.0.0.1"
    port = _free_port(host, port)
    config = Config()
    bind_host = f"[{host}]" if ":" in host else host
    config.bind = [f"{bind_host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tunneld.web.hypercorn")
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(_run_hypercorn, serve, build_app(agent), config)
        text = bound[0].split("://", 1)[-1] if bound else f"{bind_host}:{port}"
        log.info("starting web service on %s", text,
                 extra={"event": "starting web service", "fields": {"obj": "web", "addr": text}})
        task_status.started(text)


async def _run_hypercorn(serve: Any, app: Any, config: Any, *,
                         task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status)
