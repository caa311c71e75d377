"""The edge's admin REST API and Prometheus ``/metrics`` (hypercorn + starlette on Trio).

ngrok's API shapes (``https://api.ngrok.com``): ``Authorization: Bearer <api key>`` (an
``Ngrok-Version: 2`` header is accepted and ignored), JSON resources with ``id``, ``uri``,
``created_at`` (RFC 3339), ``description`` and ``metadata``; lists paginated with ``limit``,
``before_id`` and ``next_page_uri``; errors as ``{"error_code", "status_code", "msg",
"details"}``, always 4xx for a bad request.  An API key sees its own account only: another
account's resource is "not found".

Resources: ``/credentials`` (authtokens; create returns the ``token`` once), ``/api_keys``,
``/reserved_domains``, ``/reserved_addrs``, ``/ssh_credentials``, ``/edges/{https,tcp,tls}``
(with their tunnel-group backend's ``labels``), and, read from the live edge,
``/tunnel_sessions`` and ``/tunnels``.  ``/openapi.json`` describes them (built from the
same table as the routes); ``/metrics`` serves Prometheus text, read from live state at
scrape time, to API keys of the ``default`` (operator's) account.

Failed API-key checks are slowed like failed agent logins: the edge's FailureLimiter counts
each attempt before the check, and only a failure's answer waits.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import attrs
import trio

from ._acl import AclError, normalize_addr, normalize_hostname, normalize_rules
from ._errors import Code
from ._store import (
    DEFAULT_ACCOUNT,
    ApiKeyRecord,
    EdgeRecord,
    ReservedAddr,
    ReservedDomain,
    SshCredential,
    Store,
    StoreConflict,
    TokenRecord,
)
from ._util import split_host_port

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from ._edge import AgentSession, Edge
    from ._tunnel import ListedSession

log = logging.getLogger("tunneld.admin")

#: Largest request body accepted.
MAX_BODY = 64 * 1024
#: Page size when ``limit`` is not given, and the largest allowed (ngrok's).
DEFAULT_LIMIT = 100
MAX_LIMIT = 100
#: Longest wait the limiter may put on a failed API-key check's answer.
MAX_AUTH_DELAY = 5.0

_ID = re.compile(r"[A-Za-z0-9_]{1,64}")


class ApiError(Exception):
    """An error answer: HTTP ``status`` with a tunneld error ``code``."""

    def __init__(self, status: int, code: Code, msg: str, **details: Any) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg
        self.details = details


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    text = datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


# ---- request bodies -------------------------------------------------------------------------

# Field kinds: "str", "rules" (list of strings), "labels" (object of strings).
def _check_field(name: str, kind: str, value: Any) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ApiError(400, Code.API_BAD_REQUEST, f"{name} must be a string", field=name)
        return value
    if kind == "rules":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ApiError(400, Code.API_BAD_REQUEST, f"{name} must be a list of strings", field=name)
        try:
            return list(normalize_rules(value))
        except AclError as exc:
            raise ApiError(400, Code.ACL_MALFORMED, str(exc), field=name) from None
    if kind == "labels":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ApiError(400, Code.API_BAD_REQUEST, f"{name} must be an object of strings", field=name)
        return value
    raise AssertionError(kind)


def _encodable(value: Any) -> bool:
    """Whether every string in a decoded JSON value is valid Unicode (no lone surrogates)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _parse_body(raw: bytes, fields: dict[str, str], required: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object of a request, every field of a known name and type; ApiError if not."""
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, Code.API_BAD_REQUEST, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, Code.API_BAD_REQUEST, "the body must be a JSON object")
    if not _encodable(body):
        # JSON escapes can spell lone surrogates ("\\ud800"), which no UTF-8 store or answer can hold.
        raise ApiError(400, Code.API_BAD_REQUEST, "the body holds text that is not valid Unicode")
    out: dict[str, Any] = {}
    for name, value in body.items():
        kind = fields.get(name)
        if kind is None:
            allowed = ", ".join(sorted(fields)) or "none"
            raise ApiError(400, Code.API_BAD_REQUEST, f"unknown field {name[:64]!r} (allowed: {allowed})",
                           field=name[:64])
        out[name] = _check_field(name, kind, value)
    for name in required:
        if name not in out:
            raise ApiError(400, Code.API_BAD_REQUEST, f"{name} is required", field=name)
    return out


# ---- resources ------------------------------------------------------------------------------


@attrs.frozen
class Resource:
    """One REST collection backed by the store: its path, JSON fields and store calls."""

    #: URL path without the leading slash (``credentials``, ``edges/https``).
    path: str
    #: Key of the list in list responses.
    list_key: str
    create_fields: dict[str, str]
    required: tuple[str, ...]
    update_fields: dict[str, str]
    #: (store, account, body) → record, or (record, secret) for resources with a secret.
    create: Callable[[Store, str, dict[str, Any]], Any]
    get: Callable[[Store, str, str], Any]
    list: Callable[[Store, str, int, str | None], list[Any]]
    update: Callable[[Store, str, str, dict[str, Any]], Any]
    delete: Callable[[Store, str, str], bool]
    #: (record, uri, secret or None, api) → JSON object.
    to_json: Callable[[Any, str, str | None, AdminApi], dict[str, Any]]
    #: The record's id as the API shows it.
    api_id: Callable[[Any], str] = attrs.field(default=lambda r: r.id)
    #: (store, account, body, edge domain) → None, or ValueError: run before ``create``.
    check_create: Callable[[Store, str, dict[str, Any], str], None] | None = None


def _base(record: Any, uri: str) -> dict[str, Any]:
    return {"id": record.id, "uri": uri, "created_at": rfc3339(record.created_at),
            "description": record.description, "metadata": record.metadata}


def _credential_json(r: TokenRecord, uri: str, secret: str | None, api: AdminApi) -> dict[str, Any]:
    out = _base(r, uri)
    out.update(id=r.credential_id, token=secret, acl=list(r.acl), owner_id=r.account_id,
               revoked_at=rfc3339(r.revoked_at), last_used_at=rfc3339(r.last_used_at))
    return out


def _api_key_json(r: ApiKeyRecord, uri: str, secret: str | None, api: AdminApi) -> dict[str, Any]:
    out = _base(r, uri)
    out.update(token=secret, owner_id=r.account_id, last_used_at=rfc3339(r.last_used_at))
    return out


def _reserved_domain_json(r: ReservedDomain, uri: str, secret: str | None, api: AdminApi) -> dict[str, Any]:
    out = _base(r, uri)
    out.update(domain=r.domain, region="", cname_target=api.cname_target)
    return out


def _reserved_addr_json(r: ReservedAddr, uri: str, secret: str | None, api: AdminApi) -> dict[str, Any]:
    out = _base(r, uri)
    out.update(addr=r.addr, region="")
    return out


def _ssh_credential_json(r: SshCredential, uri: str, secret: str | None, api: AdminApi) -> dict[str, Any]:
    out = _base(r, uri)
    out.update(public_key=r.public_key, acl=list(r.acl), owner_id=r.account_id)
    return out


def _edge_json(r: EdgeRecord, uri: str, secret: str | None, api: AdminApi) -> dict[str, Any]:
    out = _base(r, uri)
    if r.proto == "tcp":
        hostports = [r.addr]
    else:
        port = api.edge.ports.get("https", 443)
        hostports = [f"{r.hostname}:{port}"]
    out.update(proto=r.proto, hostname=r.hostname or None, addr=r.addr or None, hostports=hostports,
               backend={"type": "tunnel_group", "labels": dict(r.labels)})
    return out


_META = {"description": "str", "metadata": "str"}


def _check_edge_name(store: Store, account: str, body: dict[str, Any], domain: str) -> None:
    """An edge serves only names its account may have: its reserved domains and addresses, or a
    one-label name under the edge's domain that no other account reserved."""
    if body.get("hostname"):
        host = normalize_hostname(str(body["hostname"]))
        reserved = store.domain_reservation(host)
        if reserved is not None:
            if reserved.account_id != account:
                raise StoreConflict(f"the domain {host} is reserved by another account")
            return
        label, _, parent = host.partition(".")
        if parent != domain or not label:
            raise ValueError(f"hostname {host} is neither a reserved domain of your account nor a "
                             f"name under {domain} (reserve it first: POST /reserved_domains)")
    elif body.get("addr"):
        addr = normalize_addr(str(body["addr"]))
        reservation = store.addr_reservation(addr)
        if reservation is None or reservation.account_id != account:
            raise ValueError(f"the address {addr} is not reserved by your account (POST /reserved_addrs)")


def _edge_resource(proto: str) -> Resource:
    where = "addr" if proto == "tcp" else "hostname"
    return Resource(
        path=f"edges/{proto}", list_key=f"{proto}_edges",
        create_fields={**_META, where: "str", "labels": "labels"}, required=(where,),
        update_fields={**_META, "labels": "labels"},
        create=lambda s, a, b: s.create_edge(a, proto, **b),
        check_create=_check_edge_name,
        get=lambda s, a, i: s.get_edge(a, i, proto),
        list=lambda s, a, n, before: s.list_edges(a, proto, limit=n, before_id=before),
        update=lambda s, a, i, b: s.update_edge(a, i, **b) if s.get_edge(a, i, proto) else None,
        delete=lambda s, a, i: s.get_edge(a, i, proto) is not None and s.delete_edge(a, i),
        to_json=_edge_json,
    )


RESOURCES: tuple[Resource, ...] = (
    Resource(
        path="credentials", list_key="credentials",
        create_fields={**_META, "acl": "rules"}, required=(), update_fields={**_META, "acl": "rules"},
        create=lambda s, a, b: s.create_token(b.get("description", ""), account_id=a,
                                              metadata=b.get("metadata", ""), acl=b.get("acl", ())),
        get=Store.get_credential,
        list=lambda s, a, n, before: s.list_credentials(a, limit=n, before_id=before),
        update=lambda s, a, i, b: s.update_credential(a, i, **b),
        delete=Store.delete_credential,
        to_json=_credential_json, api_id=lambda r: r.credential_id,
    ),
    Resource(
        path="api_keys", list_key="keys",
        create_fields=dict(_META), required=(), update_fields=dict(_META),
        create=lambda s, a, b: s.create_api_key(a, **b),
        get=Store.get_api_key,
        list=lambda s, a, n, before: s.list_api_keys(a, limit=n, before_id=before),
        update=lambda s, a, i, b: s.update_api_key(a, i, **b),
        delete=Store.delete_api_key,
        to_json=_api_key_json,
    ),
    Resource(
        path="reserved_domains", list_key="reserved_domains",
        create_fields={**_META, "domain": "str"}, required=("domain",), update_fields=dict(_META),
        create=lambda s, a, b: s.create_reserved_domain(a, **b),
        get=Store.get_reserved_domain,
        list=lambda s, a, n, before: s.list_reserved_domains(a, limit=n, before_id=before),
        update=lambda s, a, i, b: s.update_reserved_domain(a, i, **b),
        delete=Store.delete_reserved_domain,
        to_json=_reserved_domain_json,
    ),
    Resource(
        path="reserved_addrs", list_key="reserved_addrs",
        create_fields={**_META, "addr": "str"}, required=("addr",), update_fields=dict(_META),
        create=lambda s, a, b: s.create_reserved_addr(a, **b),
        get=Store.get_reserved_addr,
        list=lambda s, a, n, before: s.list_reserved_addrs(a, limit=n, before_id=before),
        update=lambda s, a, i, b: s.update_reserved_addr(a, i, **b),
        delete=Store.delete_reserved_addr,
        to_json=_reserved_addr_json,
    ),
    Resource(
        path="ssh_credentials", list_key="ssh_credentials",
        create_fields={**_META, "public_key": "str", "acl": "rules"}, required=("public_key",),
        update_fields={**_META, "acl": "rules"},
        create=lambda s, a, b: s.create_ssh_credential(a, **b),
        get=Store.get_ssh_credential,
        list=lambda s, a, n, before: s.list_ssh_credentials(a, limit=n, before_id=before),
        update=lambda s, a, i, b: s.update_ssh_credential(a, i, **b),
        delete=Store.delete_ssh_credential,
        to_json=_ssh_credential_json,
    ),
    _edge_resource("https"),
    _edge_resource("tcp"),
    _edge_resource("tls"),
)


# ---- the live edge: sessions and tunnels ---------------------------------------------------------

# When a session was first seen by the API: AgentSession has no start time of its own yet.
_first_seen: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _started_at(session: AgentSession) -> float:
    started = getattr(session, "started_at", None)
    if isinstance(started, (int, float)):
        return float(started)
    return _first_seen.setdefault(session, time.time())


def _tunnel_urls(edge: Edge) -> dict[str, list[tuple[str, str]]]:
    """tunnel id → [(proto, public url)], from the route table's holders."""
    out: dict[str, list[tuple[str, str]]] = {}
    routes = edge.routes
    for (route, host), holder in list(routes.hosts.items()):
        tunnel_id = getattr(holder, "tunnel_id", None)
        if not tunnel_id:
            continue
        if route == "tls":
            url = edge.public_url("https", host).replace("https://", "tls://", 1)
        else:
            url = edge.public_url(route, host)
        out.setdefault(tunnel_id, []).append((route, url))
    for transport, ports in list(getattr(routes, "addresses", {"tcp": routes.ports}).items()):
        for port, holder in list(ports.items()):
            tunnel_id = getattr(holder, "tunnel_id", None)
            if tunnel_id:
                out.setdefault(tunnel_id, []).append((transport, f"{transport}://{edge.config.domain}:{port}"))
    return out


def _page_of(items: list[dict[str, Any]], limit: int,
             before_id: str | None) -> tuple[list[dict[str, Any]], bool]:
    items.sort(key=lambda item: item["id"], reverse=True)
    if before_id is not None:
        items = [item for item in items if item["id"] < before_id]
    return items[:limit], len(items) > limit


# ---- metrics --------------------------------------------------------------------------------------


def _metric_name(name: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return name if name.startswith("tunneld_") else "tunneld_" + name


def _core_series(edge: Edge) -> Iterator[Any]:
    """The edge's own traffic, login and bind counters (``core/_metrics.py``)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    metrics = edge.metrics
    metrics.prune(edge.live_tunnel_ids())
    c = CounterMetricFamily("tunneld_http_requests", "HTTP requests proxied by the edge, by status class.",
                            labels=["code"])
    h = HistogramMetricFamily("tunneld_http_request_duration_seconds",
                              "Time from a request's first byte to the end of its response.", labels=["code"])
    for cls, hist in sorted(metrics.http.items()):
        c.add_metric([cls], hist.count)
        h.add_metric([cls], hist.cumulative(), hist.total)
    yield c
    yield h
    c = CounterMetricFamily("tunneld_tunnel_http_requests", "HTTP requests per tunnel.", labels=["tunnel"])
    for tid, n in sorted(metrics.tunnel_requests.items()):
        c.add_metric([tid], n)
    yield c
    c = CounterMetricFamily("tunneld_tunnel_connections", "Public TCP/TLS connections per tunnel.",
                            labels=["tunnel", "proto"])
    for (tid, proto), n in sorted(metrics.tunnel_connections.items()):
        c.add_metric([tid, proto], n)
    yield c
    c = CounterMetricFamily("tunneld_tunnel_bytes", "Bytes per tunnel: in from public clients, out to them.",
                            labels=["tunnel", "direction"])
    for (tid, direction), n in sorted(metrics.tunnel_bytes.items()):
        c.add_metric([tid, direction], n)
    yield c
    c = CounterMetricFamily("tunneld_auth_failures", "Failed logins: agents' authtokens, ssh keys, API keys.",
                            labels=["kind"])
    for kind in sorted({"agent", "ssh", "api", *metrics.auth_failures}):
        c.add_metric([kind], metrics.auth_failures.get(kind, 0))
    yield c
    c = CounterMetricFamily("tunneld_refused_binds", "Binds refused, by error code.", labels=["code"])
    for code, n in sorted(metrics.refused_binds.items()):
        c.add_metric([code], n)
    yield c


class EdgeCollector:
    """Prometheus collector reading the live edge at scrape time (nothing in the hot path)."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        edge = self.edge
        sessions = list(edge.sessions)
        g = GaugeMetricFamily("tunneld_agent_sessions", "Agent sessions connected to the edge.",
                              labels=["state"])
        authed = sum(1 for s in sessions if s.authed)
        g.add_metric(["authenticated"], authed)
        g.add_metric(["unauthenticated"], len(sessions) - authed)
        yield g
        per_proto: dict[str, set[str]] = {}
        for tunnel_id, urls in _tunnel_urls(edge).items():
            for proto, _ in urls:
                per_proto.setdefault(proto, set()).add(tunnel_id)
        g = GaugeMetricFamily("tunneld_tunnels", "Public endpoints bound, by protocol.", labels=["proto"])
        for proto in sorted(set(per_proto) | {"http", "https", "tcp", "tls"}):
            g.add_metric([proto], len(per_proto.get(proto, ())))
        yield g
        yield GaugeMetricFamily("tunneld_agent_tunnels", "Tunnels held by agent sessions (labeled ones too).",
                                value=sum(len(s.tunnels) for s in sessions))
        g = GaugeMetricFamily("tunneld_open_connections", "Accepted connections open now, by pool.",
                              labels=["pool"])
        for pool, n in sorted(edge.open_connections.items()):
            g.add_metric([pool], n)
        yield g
        watcher = edge.idle_watcher
        yield GaugeMetricFamily("tunneld_idle_sessions_parked",
                                "Agent sessions idle now, their heartbeats answered by the idle watcher.",
                                value=watcher.parked)
        yield CounterMetricFamily("tunneld_idle_heartbeats_answered",
                                  "Heartbeats the idle watcher answered without waking a session.",
                                  value=watcher.answered)
        yield GaugeMetricFamily("tunneld_auth_limited_addresses",
                                "Client addresses with recent failed logins (agents, ssh, API keys).",
                                value=len(edge.limiter))
        yield from _core_series(edge)
        # Counters plugins keep through EdgeContext.count(metric, value, **labels).
        counters: dict[Any, float] = dict(getattr(edge.context, "_counters", {}) or {})
        families: dict[str, tuple[list[str], list[tuple[list[str], float]]]] = {}
        for (metric, labels), value in counters.items():
            keys = [k for k, _ in labels]
            fam = families.setdefault(_metric_name(str(metric)), (keys, []))
            if fam[0] == keys:
                fam[1].append(([str(v) for _, v in labels], value))
        for name, (keys, samples) in sorted(families.items()):
            c = CounterMetricFamily(name, f"Counted by edge plugins ({name}).", labels=keys)
            for values, value in samples:
                c.add_metric(values, value)
            yield c


# ---- the app --------------------------------------------------------------------------------------


class AdminApi:
    """The admin API of one edge: ``build_app()`` for the ASGI app, ``run()`` to serve it."""

    def __init__(self, edge: Edge, addr: tuple[str, int] | str | None = None) -> None:
        self.edge = edge
        self.store: Store = edge.store
        if addr is None:
            addr = getattr(edge.config, "api_addr", None)
        if isinstance(addr, str):
            host, port = split_host_port(addr)
            addr = (host.strip("[]"), port)
        #: Listener address (None: the API is off).
        self.addr: tuple[str, int] | None = addr
        self._registry: Any = None

    @property
    def cname_target(self) -> str:
        return str(self.edge.config.cname)

    # -- auth ----------------------------------------------------------------------------------

    async def authenticate(self, request: Request) -> ApiKeyRecord:
        """The API key of a request; ApiError 401 (after the limiter's delay) if there is none."""
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        client = request.client.host if request.client else "-"
        if ":" in client:  # IPv6: one host usually owns the whole /64
            client = ":".join(client.split(":")[:4])
        limiter = self.edge.limiter
        delay = min(limiter.attempt(client, time.monotonic()), MAX_AUTH_DELAY)
        record = None
        if scheme.lower() == "bearer" and secret.strip():
            record = await trio.to_thread.run_sync(self.store.verify_api_key, secret.strip())
        if record is None:
            self.edge.metrics.auth_failure("api")
            if delay:
                log.warning("admin API: failed API key from %s (answer delayed %gs)", client, delay)
                await trio.sleep(delay)
            raise ApiError(401, Code.API_UNAUTHORIZED,
                           "missing or invalid API key: send 'Authorization: Bearer <api key>'")
        limiter.refund(client)
        return record

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _page_params(request: Request) -> tuple[int, str | None]:
        params = request.query_params
        unknown = set(params) - {"limit", "before_id"}
        if unknown:
            raise ApiError(400, Code.API_BAD_REQUEST, f"unknown query parameter {sorted(unknown)[0][:64]!r}")
        limit_text = params.get("limit", str(DEFAULT_LIMIT))
        if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            raise ApiError(400, Code.API_BAD_REQUEST, f"limit must be a number from 1 to {MAX_LIMIT}")
        before = params.get("before_id")
        if before is not None and not _ID.fullmatch(before):
            raise ApiError(400, Code.API_BAD_REQUEST, "before_id is not an id")
        return int(limit_text), before

    @staticmethod
    def _check_id(value: str) -> str:
        if not _ID.fullmatch(value):
            raise ApiError(404, Code.API_NOT_FOUND, "no such resource")
        return value

    @staticmethod
    def _base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def _list_json(self, request: Request, key: str, items: list[dict[str, Any]], more: bool,
                   limit: int) -> dict[str, Any]:
        base = self._base_url(request)
        path = request.url.path
        next_uri = None
        if more and items:
            next_uri = f"{base}{path}?{urlencode({'limit': limit, 'before_id': items[-1]['id']})}"
        return {key: items, "uri": f"{base}{path}", "next_page_uri": next_uri}

    @staticmethod
    async def _body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, Code.API_BODY_TOO_LARGE, f"the body is larger than {MAX_BODY} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, Code.API_BODY_TOO_LARGE, f"the body is larger than {MAX_BODY} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _store_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, self.store, *args)
        except StoreConflict as exc:
            raise ApiError(409, Code.API_CONFLICT, str(exc)) from None
        except AclError as exc:
            raise ApiError(400, Code.API_BAD_REQUEST, str(exc)) from None
        except (ValueError, KeyError) as exc:
            raise ApiError(400, Code.API_BAD_REQUEST, str(exc).strip("'\"")) from None

    # -- handlers -----------------------------------------------------------------------------------

    def _collection(self, res: Resource) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Any:
            key = await self.authenticate(request)
            account = key.account_id
            base = f"{self._base_url(request)}/{res.path}"
            if request.method == "GET":
                limit, before = self._page_params(request)
                rows = await self._store_call(res.list, account, limit + 1, before)
                items = [res.to_json(r, f"{base}/{res.api_id(r)}", None, self) for r in rows[:limit]]
                return 200, self._list_json(request, res.list_key, items, len(rows) > limit, limit)
            if request.query_params:
                raise ApiError(400, Code.API_BAD_REQUEST, "no query parameters on create")
            body = _parse_body(await self._body(request), res.create_fields, res.required)
            if res.check_create is not None:
                await self._store_call(res.check_create, account, body, self.edge.config.domain)
            created = await self._store_call(res.create, account, body)
            record, secret = created if isinstance(created, tuple) else (created, None)
            log.info("admin API: %s created %s %s", key.id, res.path, res.api_id(record))
            return 201, res.to_json(record, f"{base}/{res.api_id(record)}", secret, self)

        return handler

    def _item(self, res: Resource) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Any:
            key = await self.authenticate(request)
            account = key.account_id
            item_id = self._check_id(request.path_params["id"])
            base = f"{self._base_url(request)}/{res.path}"
            if request.query_params:
                raise ApiError(400, Code.API_BAD_REQUEST, "no query parameters here")
            if request.method == "DELETE":
                if not await self._store_call(res.delete, account, item_id):
                    raise ApiError(404, Code.API_NOT_FOUND, f"no {res.path} {item_id}")
                log.info("admin API: %s deleted %s %s", key.id, res.path, item_id)
                return 204, None
            if request.method == "PATCH":
                body = _parse_body(await self._body(request), res.update_fields)
                record = await self._store_call(res.update, account, item_id, body)
            else:
                record = await self._store_call(res.get, account, item_id)
            if record is None:
                raise ApiError(404, Code.API_NOT_FOUND, f"no {res.path} {item_id}")
            return 200, res.to_json(record, f"{base}/{res.api_id(record)}", None, self)

        return handler

    async def _account_sessions(self, account: str) -> list[AgentSession]:
        ids = await trio.to_thread.run_sync(self.store.credential_ids, account)
        return [s for s in list(self.edge.sessions) if s.authed and s.token_id in ids and s.client_id]

    def _session_json(self, request: Request, s: AgentSession) -> dict[str, Any]:
        base = self._base_url(request)
        extra = s.auth.extra if s.auth is not None else None
        return {
            "id": s.client_id, "uri": f"{base}/tunnel_sessions/{s.client_id}",
            "agent_version": (extra.version if extra else "") or "",
            "credential": {"id": "cr_" + s.token_id, "uri": f"{base}/credentials/cr_{s.token_id}"},
            "ip": s.remote_host, "metadata": (extra.metadata if extra else "") or "",
            "os": (extra.os if extra else "") or "", "region": "local",
            "started_at": rfc3339(_started_at(s)), "transport": "ngrok/2",
            "client_type": (extra.client_type if extra else "") or "",
            "tunnels": sorted(s.tunnels),
        }

    def _account_plugin_sessions(self, account: str) -> list[ListedSession]:
        """The account's sessions that plugins run (the ssh gateway's)."""
        return [s for s in list(self.edge.plugin_sessions) if s.account_id == account]

    def _plugin_session_json(self, request: Request, s: ListedSession) -> dict[str, Any]:
        base = self._base_url(request)
        cred = s.credential_id
        return {
            "id": s.session_id, "uri": f"{base}/tunnel_sessions/{s.session_id}",
            "agent_version": s.agent_version,
            "credential": {"id": cred, "uri": f"{base}/ssh_credentials/{cred}"} if cred else None,
            "ip": s.remote_addr.rsplit(":", 1)[0].strip("[]"), "metadata": "", "os": "", "region": "local",
            "started_at": rfc3339(s.started_at), "transport": s.client_type, "client_type": s.client_type,
            "tunnels": sorted(s.tunnel_ids),
        }

    async def _tunnel_sessions(self, request: Request) -> Any:
        key = await self.authenticate(request)
        limit, before = self._page_params(request)
        items = [self._session_json(request, s) for s in await self._account_sessions(key.account_id)]
        items += [self._plugin_session_json(request, p)
                  for p in self._account_plugin_sessions(key.account_id)]
        page, more = _page_of(items, limit, before)
        return 200, self._list_json(request, "tunnel_sessions", page, more, limit)

    async def _tunnel_session(self, request: Request) -> Any:
        key = await self.authenticate(request)
        wanted = self._check_id(request.path_params["id"])
        for s in await self._account_sessions(key.account_id):
            if s.client_id == wanted:
                return 200, self._session_json(request, s)
        for p in self._account_plugin_sessions(key.account_id):
            if p.session_id == wanted:
                return 200, self._plugin_session_json(request, p)
        raise ApiError(404, Code.API_NOT_FOUND, f"no tunnel session {wanted}")

    def _session_command(self, op_name: str) -> Callable[[Request], Any]:
        """``POST /tunnel_sessions/{id}/stop|restart|update``: 204 once the agent accepted.

        The agent's refusal (``remote_management: false``: ERR_TUNNELD_804-806) answers 400, its
        failure (807-809, e.g. no newer release) 409, no answer in time 504.
        """
        from starlette.responses import JSONResponse

        from ._remote import Op, RemoteCommandError, remote_restart, remote_stop, remote_update

        op = Op(op_name)

        async def handler(request: Request) -> Any:
            key = await self.authenticate(request)
            wanted = self._check_id(request.path_params["id"])
            if request.query_params:
                raise ApiError(400, Code.API_BAD_REQUEST, "no query parameters here")
            body = _parse_remote_body(await self._body(request), op is Op.UPDATE)
            session = next((s for s in await self._account_sessions(key.account_id) if s.client_id == wanted),
                           None)
            if session is None:
                listed = next((p for p in self._account_plugin_sessions(key.account_id)
                               if p.session_id == wanted), None)
                if listed is None:
                    raise ApiError(404, Code.API_NOT_FOUND, f"no tunnel session {wanted}")
                # A plugin's session (ssh): stop ends it; there is no agent to restart or update.
                if op is not Op.STOP:
                    raise ApiError(400, Code.API_BAD_REQUEST,
                                   f"a {listed.client_type} session cannot {op.value}: only stop it")
                log.info("admin API: %s stops tunnel session %s", key.id, wanted)
                listed.stop(f"stopped by API key {key.id}")
                return 204, None
            log.info("admin API: %s asks tunnel session %s to %s", key.id, wanted, op.value)
            try:
                if op is Op.STOP:
                    await remote_stop(session)
                elif op is Op.RESTART:
                    await remote_restart(session)
                else:
                    await remote_update(session, body.get("version", ""),
                                        permit_major_version=body.get("permit_major_version", False))
            except RemoteCommandError as exc:
                status = 400 if exc.unsupported else 409 if exc.answered else 504
                return JSONResponse({"error_code": exc.code.label, "status_code": status, "msg": exc.message,
                                     "details": {"operation": op.value, "tunnel_session": wanted}}, status)
            return 204, None

        return handler

    async def _tunnels(self, request: Request) -> Any:
        key = await self.authenticate(request)
        limit, before = self._page_params(request)
        base = self._base_url(request)
        urls = _tunnel_urls(self.edge)
        items = []
        for s in await self._account_sessions(key.account_id):
            for tunnel_id in list(s.tunnels):
                for proto, url in urls.get(tunnel_id, [("", "")]):
                    items.append({
                        "id": tunnel_id if len(urls.get(tunnel_id, ())) <= 1 else f"{tunnel_id}_{proto}",
                        "public_url": url or None, "proto": proto or None, "region": "local",
                        "started_at": rfc3339(_started_at(s)),
                        "tunnel_session": {"id": s.client_id, "uri": f"{base}/tunnel_sessions/{s.client_id}"},
                        "credential": {"id": "cr_" + s.token_id},
                    })
        for p in self._account_plugin_sessions(key.account_id):
            for tunnel_id in p.tunnel_ids:
                for proto, url in urls.get(tunnel_id, [("", "")]):
                    items.append({
                        "id": tunnel_id if len(urls.get(tunnel_id, ())) <= 1 else f"{tunnel_id}_{proto}",
                        "public_url": url or None, "proto": proto or None, "region": "local",
                        "started_at": rfc3339(p.started_at),
                        "tunnel_session": {"id": p.session_id,
                                           "uri": f"{base}/tunnel_sessions/{p.session_id}"},
                        "credential": {"id": p.credential_id} if p.credential_id else None,
                    })
        page, more = _page_of(items, limit, before)
        return 200, self._list_json(request, "tunnels", page, more, limit)

    async def _metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from starlette.responses import Response

        key = await self.authenticate(request)
        if key.account_id != DEFAULT_ACCOUNT:
            raise ApiError(403, Code.API_FORBIDDEN, "/metrics is for API keys of the default account")
        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(EdgeCollector(self.edge))
        text = generate_latest(self._registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def _openapi(self, request: Request) -> Any:
        return 200, openapi_document()

    async def _root(self, request: Request) -> Any:
        base = self._base_url(request)
        paths = [r.path for r in RESOURCES] + ["tunnel_sessions", "tunnels"]
        return 200, {"uri": base + "/", "resources": {p: f"{base}/{p}" for p in paths},
                     "openapi": f"{base}/openapi.json"}

    # -- assembly -------------------------------------------------------------------------------

    def routes(self) -> list[tuple[str, tuple[str, ...], Callable[[Request], Any]]]:
        """(path, methods, handler) of every route (``/openapi.json`` lists the same)."""
        out: list[tuple[str, tuple[str, ...], Callable[[Request], Any]]] = [
            ("/", ("GET",), self._root),
            ("/openapi.json", ("GET",), self._openapi),
            ("/metrics", ("GET",), self._metrics),
            ("/tunnel_sessions", ("GET",), self._tunnel_sessions),
            ("/tunnel_sessions/{id}", ("GET",), self._tunnel_session),
            # Remote management (tunneld/core/_remote.py): ngrok's stop/restart/update calls.
            ("/tunnel_sessions/{id}/stop", ("POST",), self._session_command("stop")),
            ("/tunnel_sessions/{id}/restart", ("POST",), self._session_command("restart")),
            ("/tunnel_sessions/{id}/update", ("POST",), self._session_command("update")),
            ("/tunnels", ("GET",), self._tunnels),
        ]
        for res in RESOURCES:
            out.append((f"/{res.path}", ("GET", "POST"), self._collection(res)))
            out.append((f"/{res.path}/{{id}}", ("GET", "PATCH", "DELETE"), self._item(res)))
        return out

    def build_app(self) -> Any:
        """The ASGI app."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def error_response(exc: ApiError) -> Response:
            headers = {"WWW-Authenticate": 'Bearer realm="tunneld"'} if exc.status == 401 else None
            return JSONResponse({"error_code": exc.code.label, "status_code": exc.status, "msg": exc.msg,
                                 "details": exc.details}, exc.status, headers=headers)

        def wrap(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
            async def endpoint(request: Request) -> Response:
                try:
                    result = await fn(request)
                except ApiError as exc:
                    return error_response(exc)
                if isinstance(result, Response):
                    return result
                status, body = result
                if body is None:
                    return Response(status_code=status)
                return JSONResponse(body, status)
            return endpoint

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if exc.status_code == 405:
                return error_response(ApiError(405, Code.API_METHOD_NOT_ALLOWED,
                                               f"{request.method} is not allowed on {request.url.path}"))
            if exc.status_code == 404:
                return error_response(ApiError(404, Code.API_NOT_FOUND, f"no route {request.url.path}"))
            return error_response(ApiError(exc.status_code if 400 <= exc.status_code < 500 else 400,
                                           Code.API_BAD_REQUEST, str(exc.detail)))

        routes = [Route(path, wrap(fn), methods=list(methods)) for path, methods, fn in self.routes()]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def run(self, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the edge stops (or cancelled); ``started()`` reports the bound ``host:port``
        (None if the API is off)."""
        if self.addr is None:
            task_status.started(None)
            return
        from hypercorn.config import Config
        from hypercorn.trio import serve

        host, port = self.addr
        config = Config()
        bind_host = f"[{host}]" if ":" in host else host
        config.bind = [f"{bind_host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("tunneld.admin.hypercorn")
        config.graceful_timeout = 1.0
        app = self.build_app()

        async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                                ) -> None:
            # Ends with the edge's shutdown: the edge's root nursery waits for its services.
            await serve(app, config, shutdown_trigger=self.edge.stopping.wait, task_status=task_status)

        async with trio.open_nursery() as nursery:
            bound = await nursery.start(run_hypercorn)
            text = bound[0].split("://", 1)[-1] if bound else f"{bind_host}:{port}"
            if "api" not in self.edge.ports:
                self.edge.ports["api"] = int(text.rsplit(":", 1)[1])
            log.info("admin API on http://%s (openapi: /openapi.json, metrics: /metrics)", text)
            task_status.started(text)


# ---- OpenAPI ------------------------------------------------------------------------------------

_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "rules": {"type": "array", "items": {"type": "string"}},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _parse_remote_body(raw: bytes, update: bool) -> dict[str, Any]:
    """The body of a stop/restart (``{}`` or none) or update (``version``, ``permit_major_version``)."""
    if not update:
        return _parse_body(raw, {})
    try:
        obj: Any = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        raise ApiError(400, Code.API_BAD_REQUEST, "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(400, Code.API_BAD_REQUEST, "the body must be a JSON object")
    permit = obj.pop("permit_major_version", False)
    if not isinstance(permit, bool):
        raise ApiError(400, Code.API_BAD_REQUEST, "permit_major_version must be true or false",
                       field="permit_major_version")
    out = _parse_body(json.dumps(obj).encode(), {"version": "str"})
    version = out.get("version", "")
    if len(version) > 64 or (version and not re.fullmatch(r"[0-9A-Za-z.+!_-]+", version)):
        raise ApiError(400, Code.API_BAD_REQUEST, "version must be a version number such as 1.2.3",
                       field="version")
    out["permit_major_version"] = permit
    return out


def _schema(fields: dict[str, str], required: Iterable[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": {k: dict(_TYPES[v]) for k, v in fields.items()}}
    if required:
        out["required"] = list(required)
    return out


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin API (the routes are built from the same table)."""
    error = {"description": "error",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    page = [{"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}},
            {"name": "before_id", "in": "query", "schema": {"type": "string"}}]
    ident = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    obj = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
    errors = {"400": error, "401": error, "404": error}
    paths: dict[str, Any] = {
        "/": {"get": {"operationId": "root", "responses": {"200": obj}}},
        "/openapi.json": {"get": {"operationId": "openapi", "security": [], "responses": {"200": obj}}},
        "/metrics": {"get": {"operationId": "metrics", "responses": {
            "200": {"description": "Prometheus text", "content": {"text/plain": {}}}, "403": error}}},
        "/tunnel_sessions": {"get": {"operationId": "tunnel_sessions_list", "parameters": page,
                                     "responses": {"200": obj, **errors}}},
        "/tunnel_sessions/{id}": {"get": {"operationId": "tunnel_sessions_get", "parameters": ident,
                                          "responses": {"200": obj, **errors}}},
        "/tunnels": {"get": {"operationId": "tunnels_list", "parameters": page,
                             "responses": {"200": obj, **errors}}},
    }
    for command, fields in (("stop", {}), ("restart", {}), ("update", {
            "version": {"type": "string"}, "permit_major_version": {"type": "boolean"}})):
        paths[f"/tunnel_sessions/{{id}}/{command}"] = {"post": {
            "operationId": f"tunnel_sessions_{command}", "parameters": ident,
            "description": f"Ask the agent to {command}; 400 when it refuses (remote_management: "
                           "false), 409 when it fails, 504 when it does not answer.",
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": fields}}}},
            "responses": {"204": {"description": "the agent accepted"}, "409": error, "504": error,
                          **errors}}}
    for res in RESOURCES:
        op = res.path.replace("/", "_")
        paths[f"/{res.path}"] = {
            "get": {"operationId": f"{op}_list", "parameters": page, "responses": {"200": obj, **errors}},
            "post": {"operationId": f"{op}_create", "responses": {"201": obj, "409": error, **errors},
                     "requestBody": {"content": {"application/json": {
                         "schema": _schema(res.create_fields, res.required)}}}},
        }
        paths[f"/{res.path}/{{id}}"] = {
            "get": {"operationId": f"{op}_get", "parameters": ident, "responses": {"200": obj, **errors}},
            "patch": {"operationId": f"{op}_update", "parameters": ident, "responses": {"200": obj, **errors},
                      "requestBody": {"content": {"application/json": {
                          "schema": _schema(res.update_fields)}}}},
            "delete": {"operationId": f"{op}_delete", "parameters": ident,
                       "responses": {"204": {"description": "deleted"}, **errors}},
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tunneld admin API", "version": "2",
                 "description": "ngrok-style API of a tunneld edge.  "
                                "Send 'Authorization: Bearer <api key>'."},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {
                "error_code": {"type": "string"}, "status_code": {"type": "integer"},
                "msg": {"type": "string"}, "details": {"type": "object"}}}},
        },
        "paths": paths,
    }


def admin_services(edge: Edge) -> list[AdminApi]:
    """The admin API as an edge service when ``edge.config.api_addr`` is set, else nothing."""
    return [AdminApi(edge)] if getattr(edge.config, "api_addr", None) else []
