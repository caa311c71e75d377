"""The agent's local web server (127.0.0.1:4040): ngrok's REST API, the inspector and status pages.

Served by hypercorn's Trio worker with a Starlette app: a well-kept HTTP stack rather than a
hand-rolled one.  Like ngrok, it answers only localhost-like Host headers (a DNS-rebinding
defence) and takes the next port when 4040 is in use.

A page on another origin must not be able to make the API do anything: writes take only
``application/json`` bodies (a cross-origin ``fetch`` with that type needs a CORS preflight,
which is never granted, and an HTML form cannot send it), writes carrying a foreign
``Origin`` are refused, and no response carries CORS headers.

Routes: ``/api`` (this module), ``/api/tunnels[/NAME]``, ``/api/requests/http[/ID|/events]``,
``/api/status``; the ``/api/endpoints`` family (:mod:`._endpoints_api`); the inspector and
status pages with their assets (:mod:`._inspector`).
"""

from __future__ import annotations

import http
import json
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import trio

from .. import __version__
from ._agent import Agent, AgentTunnel
from ._api_json import listed_tunnels as listed_tunnels
from ._api_json import tunnel_json as tunnel_json
from ._capture import CaptureEvent
from ._config import parse_tunnel_definition
from ._errors import ConfigError, TunnelRejected
from ._replay import Modification, ReplayError, replay
from ._tunnel import TunnelConfig
from ._util import split_host_port

log = logging.getLogger("tunneld.web")

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}
#: Methods that change something: JSON bodies only, and no foreign Origin.
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Largest JSON body the API reads (a modified replay carries a base64 body).
MAX_JSON_BODY = 16 * 1024 * 1024
#: Seconds between comment lines on an idle event stream (lets proxies and dead peers show).
SSE_KEEPALIVE = 15.0

# ngrok's local API error codes (error_code in the error body).
ERR_GENERIC = 100
ERR_BAD_REQUEST = 101
ERR_INVALID_TUNNEL = 102
ERR_START_FAILED = 103
ERR_NOT_FOUND = 104


class ApiError(Exception):
    """An error answered with ngrok's body ``{error_code, status_code, msg, details}``."""

    def __init__(self, status: int, msg: str, code: int = ERR_GENERIC, details: dict[str, Any] | None = None):
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.code = code
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        return {"error_code": self.code, "status_code": self.status, "msg": self.msg, "details": self.details}


def parse_tunnel(name: str, data: Mapping[str, Any], agent: Agent) -> TunnelConfig:
    """A ``POST /api/tunnels`` definition as a TunnelConfig; ConfigError naming the bad key."""
    return parse_tunnel_definition(name, data, agent.registry)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _local_host(host: str) -> bool:
    host = host.lower()
    hostname = host if host.endswith("]") else host.rsplit(":", 1)[0]
    return hostname in _LOCAL_HOSTS or hostname.endswith(".localhost")


def build_app(agent: Agent) -> Any:
    """The ASGI app of the local web server for ``agent``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import BaseRoute, Route

    from ._endpoints_api import endpoint_routes
    from ._inspector import page_routes

    store = agent.captures

    def error(status: int, msg: str, code: int = ERR_GENERIC,
              details: dict[str, Any] | None = None) -> Response:
        return JSONResponse(ApiError(status, msg, code, details).body(), status)

    async def read_json(request: Request) -> dict[str, Any]:
        body = await request.body()
        if len(body) > MAX_JSON_BODY:
            raise ApiError(413, f"request body larger than {MAX_JSON_BODY} bytes", ERR_BAD_REQUEST)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "request body is not valid JSON", ERR_BAD_REQUEST,
                           {"err": str(exc)}) from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", ERR_BAD_REQUEST)
        return data

    def find_tunnel(name: str) -> AgentTunnel:
        for t in listed_tunnels(agent):
            if t.name == name:
                return t
        raise ApiError(404, f"tunnel {name!r} not found", ERR_NOT_FOUND)

    # ---- /api/tunnels ----

    async def tunnels(request: Request) -> Response:
        if request.method == "POST":
            return await start_tunnel(request)
        return JSONResponse({"tunnels": [tunnel_json(t) for t in listed_tunnels(agent)],
                             "uri": "/api/tunnels"})

    async def start_tunnel(request: Request) -> Response:
        data = await read_json(request)
        name = data.pop("name", None)
        if name is None or name == "":
            # ngrok names an unnamed tunnel itself; so do we, uniquely.
            base = f"{data.get('proto', 'http')}-{data.get('addr', '')}"
            taken = {t.name for t in agent.tunnels} | {t.config.name for t in agent.tunnels}
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
        if not isinstance(name, str):
            raise ApiError(400, "invalid tunnel configuration", ERR_INVALID_TUNNEL,
                           {"err": "name: expected a string"})
        try:
            config = parse_tunnel(name, data, agent)
            started = await agent.start_tunnel(config)
        except (ConfigError, ValueError) as exc:
            raise ApiError(400, "invalid tunnel configuration", ERR_INVALID_TUNNEL,
                           {"err": str(exc)}) from None
        except TunnelRejected as exc:
            details: dict[str, Any] = {"err": str(exc)}
            if exc.code is not None:
                details["error_code"] = str(exc.code)
            raise ApiError(502, "failed to start tunnel", ERR_START_FAILED, details) from None
        return JSONResponse(tunnel_json(started[0]), 201)

    async def tunnel(request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "DELETE":
            try:
                await agent.stop_tunnel(name)
            except KeyError:
                raise ApiError(404, f"tunnel {name!r} not found", ERR_NOT_FOUND) from None
            return Response(status_code=204)
        return JSONResponse(tunnel_json(find_tunnel(name)))

    # ---- /api/requests/http ----

    async def requests(request: Request) -> Response:
        if request.method == "DELETE":
            store.clear()
            return Response(status_code=204)
        if request.method == "POST":
            return await replay_request(request)
        limit_text = request.query_params.get("limit")
        limit = None
        if limit_text is not None and limit_text != "":
            if not limit_text.isdigit():
                raise ApiError(400, "limit must be a non-negative integer", ERR_BAD_REQUEST)
            limit = int(limit_text)
        tunnel_name = request.query_params.get("tunnel_name") or None
        entries = list(store.newest(limit, tunnel_name))
        return JSONResponse({"uri": "/api/requests/http", "requests": [e.as_json() for e in entries]})

    async def replay_request(request: Request) -> Response:
        data = await read_json(request)
        unknown = set(data) - {"id", "tunnel_name", "modify"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}", ERR_BAD_REQUEST)
        entry_id = data.get("id")
        if not isinstance(entry_id, str) or not entry_id:
            raise ApiError(400, "id: expected the id of a captured request", ERR_BAD_REQUEST)
        entry = store.get(entry_id)
        if entry is None:
            raise ApiError(404, f"request {entry_id!r} not found (cleared or evicted)", ERR_NOT_FOUND)
        name = data.get("tunnel_name") or entry.tunnel_name
        if not isinstance(name, str):
            raise ApiError(400, "tunnel_name: expected a string", ERR_BAD_REQUEST)
        target = next((t for t in agent.tunnels if t.name == name), None)
        if target is None:
            raise ApiError(404, f"tunnel {name!r} not found", ERR_NOT_FOUND)
        if not target.type.inspects:
            raise ApiError(400, f"tunnel {name!r} is not an HTTP tunnel", ERR_BAD_REQUEST)
        try:
            modify = Modification.from_json(data["modify"]) if data.get("modify") is not None else None
            await replay(target, entry, modify)
        except ReplayError as exc:
            raise ApiError(400, str(exc), ERR_BAD_REQUEST) from None
        return Response(status_code=204)

    async def captured(request: Request) -> Response:
        entry = store.get(request.path_params["id"])
        if entry is None:
            raise ApiError(404, f"request {request.path_params['id']!r} not found", ERR_NOT_FOUND)
        return JSONResponse(entry.as_json())

    async def events(request: Request) -> Response:
        feed = store.subscribe()

        async def stream() -> AsyncIterator[str]:
            with feed:
                # A first line at once: the client sees the stream open before any request.
                yield ": tunneld live requests\n\n"
                while True:
                    event: CaptureEvent | None = None
                    with trio.move_on_after(SSE_KEEPALIVE):
                        try:
                            event = await feed.receive()
                        except trio.EndOfChannel:  # dropped as too slow: the browser reconnects
                            return
                    if event is None:
                        yield ": keepalive\n\n"
                    elif event.kind == "request" and event.entry is not None:
                        yield f"event: request\ndata: {json.dumps(event.entry.as_json())}\n\n"
                    else:
                        yield f"event: {event.kind}\ndata: {{}}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- status and root ----

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
        return JSONResponse({"uri": "/api", "tunnels": "/api/tunnels", "endpoints": "/api/endpoints",
                             "requests": "/api/requests/http", "status": "/api/status"})

    api: list[BaseRoute] = [
        Route("/api", root),
        Route("/api/", root),
        Route("/api/tunnels", tunnels, methods=["GET", "POST"]),
        Route("/api/tunnels/{name:path}", tunnel, methods=["GET", "DELETE"]),
        Route("/api/requests/http", requests, methods=["GET", "POST", "DELETE"]),
        Route("/api/requests/http/events", events, methods=["GET"]),
        Route("/api/requests/http/{id}", captured, methods=["GET"]),
        Route("/api/status", status),
    ]
    routes = [*api, *endpoint_routes(agent), *page_routes(agent)]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error(exc.status, exc.msg, exc.code, exc.details)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404/405 in ngrok's error shape.
        code = getattr(exc, "status_code", 500)
        return error(code, getattr(exc, "detail", "") or http.HTTPStatus(code).phrase,
                     ERR_NOT_FOUND if code == 404 else ERR_GENERIC)

    from starlette.exceptions import HTTPException

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {name: value.decode("latin-1") for name, value in scope.get("headers", [])}
            host = headers.get(b"host", "")
            if host and not _local_host(host):
                await error(403, "the agent API only answers localhost Host headers", 403)(
                    scope, receive, send)
                return
            if scope["method"] in _WRITES:
                origin = headers.get(b"origin")
                if origin is not None and (origin == "null" or not _local_host(urlsplit(origin).netloc)):
                    await error(403, f"cross-origin requests are refused (Origin: {origin[:100]})", 403)(
                        scope, receive, send)
                    return
                has_body = headers.get(b"content-length", "0") != "0" or b"transfer-encoding" in headers
                if scope["method"] != "DELETE" or has_body:
                    if not _is_json(headers.get(b"content-type", "")):
                        await error(415, "the agent API takes only application/json request bodies",
                                    ERR_BAD_REQUEST)(scope, receive, send)
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


def _give_reason_phrases() -> None:
    """Make hypercorn's HTTP/1 responses carry reason phrases (``200 OK``, not ``200 ``).

    hypercorn builds h11 responses without a reason and h11 then sends an empty one: valid
    HTTP, but clients and people reading a trace expect the phrase.  Its single send path is
    wrapped once per process to fill it in.
    """
    import h11
    from hypercorn.protocol.h11 import H11Protocol

    original = getattr(H11Protocol, "_send_h11_event", None)
    if original is None or getattr(original, "_tunneld_reasons", False):
        return  # another hypercorn: leave it as it is (an empty reason is still valid HTTP)

    async def send_with_reason(self: Any, event: Any) -> None:
        if isinstance(event, (h11.Response, h11.InformationalResponse)) and not event.reason:
            try:
                phrase = http.HTTPStatus(event.status_code).phrase
            except ValueError:
                phrase = ""
            if phrase:
                event = type(event)(status_code=event.status_code, headers=event.headers,
                                    http_version=event.http_version, reason=phrase)
        await original(self, event)

    send_with_reason._tunneld_reasons = True  # type: ignore[attr-defined]
    H11Protocol._send_h11_event = send_with_reason  # type: ignore[method-assign]


async def serve_web(agent: Agent, addr: str, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the local API until cancelled; ``started()`` reports the bound ``host:port``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    _give_reason_phrases()
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
