"""The ngrok v3 agent's ``/api/endpoints`` family on the local web API (agent 3.30+ shapes).

An *endpoint* is one public URL with its upstream: ``{"name", "url", "upstream": {"url"}}``.
tunneld keeps tunnels: a posted endpoint is read exactly as an entry of a version 3 config
file's ``endpoints:`` list (:func:`._config_v3.endpoint`: ``url`` picks the type and name,
``upstream.url`` the address; what tunneld cannot honour is refused, never ignored) and started
with :meth:`Agent.start_tunnel`.  Every :class:`AgentTunnel` is listed as one endpoint, so an
http tunnel serving both schemes shows as two (``web`` and ``web (http)``).
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import _config_yaml as Y
from ._config_v3 import endpoint
from ._errors import ConfigError, TunnelRejected

if TYPE_CHECKING:
    from ._agent import Agent, AgentTunnel
    from ._tunnel import TunnelConfig, TunnelTypeRegistry

#: Largest request body accepted (an endpoint definition is a few hundred bytes).
MAX_BODY = 64 * 1024


def endpoint_config(name: str, data: dict[str, Any], registry: TunnelTypeRegistry) -> TunnelConfig:
    """The tunnel a posted endpoint describes; ConfigError naming the key at fault."""
    return endpoint(Y.from_data({**data, "name": name}, "endpoint"), registry, "endpoint")


# ---- the endpoint object ----------------------------------------------------------------------


def endpoint_json(tunnel: AgentTunnel) -> dict[str, Any]:
    """One endpoint in the agent 3.30 shape, plus ``id`` (read by pyngrok) and ``proto``."""
    config = tunnel.type.api_config(tunnel.config, tunnel.upstream)
    return {
        "id": tunnel.tunnel_id,
        "name": tunnel.name,
        "uri": f"/api/endpoints/{quote(tunnel.name, safe='')}",
        "url": tunnel.public_url,
        "proto": tunnel.proto,
        "upstream": {"url": tunnel.upstream, "protocol": "http1"},
        "inspect": bool(config.get("inspect", False)),
        "traffic_policy": "",
        "pooling_enabled": False,
        "metadata": tunnel.config.metadata,
        "metrics": tunnel.metrics.as_json(),
    }


# ---- routes ----------------------------------------------------------------------------------


def _error(status: int, msg: str, code: int, err: str = "") -> JSONResponse:
    details = {"err": err} if err else {}
    return JSONResponse({"error_code": code, "status_code": status, "msg": msg, "details": details}, status)


def _invalid(err: str) -> JSONResponse:
    return _error(400, "invalid endpoint configuration", 102, err)


async def _json_body(request: Request) -> Any:
    """The request's JSON value, or an error response (JSON only: no form posts from web pages)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
        return _error(415, "the agent API takes JSON bodies only (Content-Type: application/json)", 100)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return _error(413, f"request body over {MAX_BODY} bytes", 100)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, "invalid JSON body", 100, str(exc))


def listed(agent: Agent) -> list[AgentTunnel]:
    """The endpoints the API shows: those the edge has bound (as ``/api/tunnels`` lists tunnels).

    One started while the agent is offline shows once bound; a bound one stays listed, with
    its URL, while the agent reconnects.
    """
    return [t for t in agent.tunnels if t.tunnel_id]


def _find(agent: Agent, name: str) -> AgentTunnel | None:
    return next((t for t in agent.tunnels if t.name == name), None)


async def _start(agent: Agent, data: Any, name: str | None = None) -> Response:
    if isinstance(data, Response):
        return data
    if not isinstance(data, dict):
        return _invalid("expected a JSON object")
    given = data.get("name", name)
    if name is not None and given != name:
        return _invalid("the body's name differs from the URL's")
    if given in (None, ""):
        given = f"endpoint-{secrets.token_hex(4)}"
    if not isinstance(given, str):
        return _invalid("name: expected a string")
    try:
        config = endpoint_config(given, data, agent.registry)
        started = await agent.start_tunnel(config)
    except (ConfigError, ValueError) as exc:  # a bad key or value, a duplicate name
        return _invalid(str(exc))
    except TunnelRejected as exc:
        return _error(502, "failed to start endpoint", 103, str(exc))
    return JSONResponse(endpoint_json(started[0]), 201)


def endpoint_routes(agent: Agent) -> list[BaseRoute]:
    """Routes for ``GET|POST /api/endpoints`` and ``GET|PUT|DELETE /api/endpoints/NAME``."""

    async def collection(request: Request) -> Response:
        if request.method == "POST":
            return await _start(agent, await _json_body(request))
        return JSONResponse({"endpoints": [endpoint_json(t) for t in listed(agent)],
                             "uri": "/api/endpoints"})

    async def one(request: Request) -> Response:
        name = request.path_params["name"]
        tunnel = _find(agent, name)
        if request.method == "PUT":
            data = await _json_body(request)
            if isinstance(data, Response):
                return data
            if tunnel is None:
                return await _start(agent, data, name)
            # Replace: the old one goes only once the new definition is known to be valid (an
            # edge refusing the new one still leaves the name unused, as after a DELETE).
            if not isinstance(data, dict):
                return _invalid("expected a JSON object")
            if data.get("name", name) != name:
                return _invalid("the body's name differs from the URL's")
            try:
                endpoint_config(name, data, agent.registry)
            except ConfigError as exc:
                return _invalid(str(exc))
            await agent.stop_tunnel(name)
            response = await _start(agent, data, name)
            return Response(response.body, 200, media_type="application/json") \
                if response.status_code == 201 else response
        if tunnel is None or (request.method == "GET" and not tunnel.tunnel_id):
            return _error(404, f"endpoint {name!r} not found", 104)
        if request.method == "DELETE":
            try:
                await agent.stop_tunnel(name)
            except KeyError:  # stopped meanwhile by another request
                return _error(404, f"endpoint {name!r} not found", 104)
            return Response(status_code=204)
        return JSONResponse(endpoint_json(tunnel))

    return [
        Route("/api/endpoints", collection, methods=["GET", "POST"]),
        Route("/api/endpoints/{name:path}", one, methods=["GET", "PUT", "DELETE"]),
    ]
