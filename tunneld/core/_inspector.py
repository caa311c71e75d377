"""The web inspector and status pages of the agent's local web server (127.0.0.1:4040).

``/`` and ``/inspect/http`` serve one static page (``inspector/index.html`` with ``app.js``):
it reads everything from the agent's JSON API (``/api/requests/http`` and its SSE feed,
``/api/tunnels``), so the page and the API can only disagree in one place.  ``/status`` is
rendered here, from the agent's parsed configuration and the tunnels' metrics (``status.js``
refreshes the metrics).  Every asset ships in the package, so the pages work offline.

Captured requests are attacker-controlled, so the pages never build HTML from them: the
script only creates DOM nodes with text, this module escapes everything it renders, and a
Content-Security-Policy (``script-src 'self'``, no inline script) backs both up.
"""

from __future__ import annotations

import hashlib
import html
import json
import mimetypes
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs

from .. import __version__
from ._api_json import tunnel_json
from ._tunnel import _any_declared, declared_option

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from ._agent import Agent, AgentTunnel
    from ._tunnel import TunnelConfig

#: Sent with every page and asset.  No inline script or style, no other origin, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The pages show captured traffic: never keep them in a shared cache.
    "Cache-Control": "no-store",
}
#: Global configuration keys whose values are credentials: shown masked.
_SECRET_KEYS = ("authtoken", "api_key", "password", "secret", "token")


@attrs.frozen
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _load_assets() -> dict[str, _Asset]:
    """The files of ``tunneld/core/inspector``, read once: only these names are ever served."""
    assets: dict[str, _Asset] = {}
    folder = resources.files("tunneld.core").joinpath("inspector")
    for entry in folder.iterdir():
        if not entry.is_file() or entry.name.startswith("."):
            continue
        body = entry.read_bytes()
        ctype = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "image/svg+xml"):
            ctype += "; charset=utf-8"
        assets[entry.name] = _Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return assets


def mask_secret(value: str) -> str:
    """A credential shown without giving it away: its first 4 characters and its length."""
    if not value:
        return ""
    if len(value) <= 8:
        return "*" * len(value)
    return f"{value[:4]}… ({len(value)} characters)"


def _is_secret_key(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_KEYS)


def global_config(agent: Agent) -> list[tuple[str, str, bool]]:
    """The parsed agent configuration as ``(key, shown value, masked)`` rows (tunnels aside)."""
    rows = []
    for field in attrs.fields(type(agent.config)):
        if field.name == "tunnels":
            continue
        value = getattr(agent.config, field.name)
        if _is_secret_key(field.name) and value:
            rows.append((field.name, mask_secret(str(value)), True))
        else:
            rows.append((field.name, _show(value), False))
    return rows


def tunnel_options(config: TunnelConfig) -> list[tuple[str, str, bool]]:
    """A tunnel definition as ``(key, shown value, masked)`` rows; secret options masked."""
    rows = [("proto", config.proto, False), ("addr", config.addr, False),
            ("inspect", _show(config.inspect), False)]
    if config.metadata:
        rows.append(("metadata", config.metadata, False))
    for key, value in sorted(config.options.items()):
        declared = declared_option(config.proto, key) or _any_declared(key)
        # As TunnelConfig.__repr__ does: an option nobody declares may be anything, so mask it.
        if declared is None or declared.secret:
            rows.append((key, "***" if value else "", True))
        else:
            rows.append((key, _show(value), False))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _duration_ms(ns: Any) -> str:
    try:
        return f"{float(ns) / 1e6:.2f} ms"
    except (TypeError, ValueError):
        return ""


_METRIC_COLUMNS = ("count", "gauge", "rate1", "rate5", "rate15", "p50", "p90", "p95", "p99")


def _metric_cell(group: str, key: str, data: dict[str, Any], tunnel: str) -> str:
    value = data.get(key)
    if value is None:
        text = ""
    elif key.startswith("p"):
        text = _duration_ms(value)
    elif key.startswith("rate"):
        text = f"{float(value):.4f}"
    else:
        text = str(value)
    return (f'<td data-tunnel="{html.escape(tunnel)}" data-metric="{group}.{key}">'
            f"{html.escape(text)}</td>")


def _kv_table(rows: list[tuple[str, str, bool]], *, raw: dict[str, str] | None = None) -> str:
    """Rows as an HTML table, escaped; ``raw`` gives ready-made cell HTML (and ids) by key."""
    out = ['<table class="kv">']
    for key, value, masked in rows:
        if raw and key in raw:
            cell = raw[key]
        elif masked:
            cell = f'<td><span class="secret">{html.escape(value)}</span></td>'
        else:
            cell = f"<td>{html.escape(value)}</td>"
        out.append(f"<tr><th>{html.escape(key)}</th>{cell}</tr>")
    out.append("</table>")
    return "".join(out)


def _tunnel_section(t: AgentTunnel, info: dict[str, Any]) -> str:
    name = html.escape(t.name)
    url = t.public_url
    link = (f'<td><a href="{html.escape(url)}" rel="noreferrer">{html.escape(url)}</a></td>'
            if url.startswith(("http://", "https://")) else f"<td>{html.escape(url or '(not bound)')}</td>")
    api_config = info.get("config") or {}
    metrics = info.get("metrics") or {}
    head = "".join(f"<th>{c}</th>" for c in _METRIC_COLUMNS)
    rows = []
    for group in ("conns", "http"):
        data = metrics.get(group) or {}
        cells = "".join(_metric_cell(group, c, data, t.name) if c in data else "<td></td>"
                        for c in _METRIC_COLUMNS)
        rows.append(f"<tr><td>{group}</td>{cells}</tr>")
    summary = [("public URL", url, False), ("forwards to", t.upstream, False), ("protocol", t.proto, False),
               ("tunnel id", t.tunnel_id or "—", False),
               ("inspect", _show(api_config.get("inspect", t.config.inspect)), False)]
    return (
        f'<section class="tunnel" data-tunnel="{name}"><h3>{name}</h3><div class="tunnel-grid"><div>'
        + _kv_table(summary, raw={"public URL": link})
        + "<h4>Configuration</h4>" + _kv_table(tunnel_options(t.config))
        + f'</div><div><h4>Metrics</h4><table class="metrics"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
        + '<p class="note">Rates are events per second over 1, 5 and 15 minutes;'
          " percentiles are HTTP request durations.</p></div></div></section>"
    )


def render_status(agent: Agent) -> str:
    """The ``/status`` page: session, global configuration, and each tunnel with its metrics."""
    latency = f"{agent.latency * 1000:.0f} ms" if agent.latency is not None else "—"
    session = [("status", agent.status, False), ("server", agent.config.server_addr, False),
               ("session id", agent.client_id or "—", False), ("latency", latency, False),
               ("version", __version__, False)]
    status_cell = f'<td id="session-status">{html.escape(agent.status)}</td>'
    tunnels = "".join(_tunnel_section(t, tunnel_json(t)) for t in agent.tunnels) or \
        '<p class="hint">No tunnels.</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>tunneld status</title>"
        '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/static/app.css">'
        '<script src="/static/status.js" defer></script></head><body>'
        '<header class="top"><h1>tunneld</h1><nav><a href="/inspect/http">Inspect</a>'
        '<a href="/status" class="current">Status</a></nav>'
        '<span id="live" class="live"></span><span class="spacer"></span></header>'
        '<div class="status-page"><h2>Session</h2>' + _kv_table(session, raw={"status": status_cell})
        + "<h2>Tunnels</h2>" + tunnels
        + "<h2>Configuration</h2>" + _kv_table(global_config(agent))
        + "</div></body></html>"
    )


def page_routes(agent: Agent) -> list[BaseRoute]:
    """Routes for ``/``, ``/inspect/http``, ``/status`` and ``/static/{name}`` (mounted by ``build_app``)."""
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    assets = _load_assets()
    index = assets["index.html"].body.replace(
        b'<html lang="en">', b'<html lang="en" data-version="' + html.escape(__version__).encode() + b'">', 1)

    async def inspector(request: Request) -> Response:
        return HTMLResponse(index, headers=SECURITY_HEADERS)

    async def status(request: Request) -> Response:
        return HTMLResponse(render_status(agent), headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None:
            return Response("not found\n", 404, media_type="text/plain", headers=SECURITY_HEADERS)
        headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.content_type, headers=headers)

    return [
        Route("/", inspector, methods=["GET", "HEAD"]),
        Route("/inspect/http", inspector, methods=["GET", "HEAD"]),
        Route("/status", status, methods=["GET", "HEAD"]),
        Route("/static/{name:path}", static, methods=["GET", "HEAD"]),
    ]
