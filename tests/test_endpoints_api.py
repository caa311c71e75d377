"""The local API's ``/api/endpoints`` family (ngrok agent 3.30 shapes) on a live agent and edge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from starlette.applications import Starlette

from tunneld.core import Agent, TunnelConfig
from tunneld.core._endpoints_api import endpoint_routes

from .conftest import EdgeEnv, start_echo_server, start_hello_upstream
from .core.test_resume import host_of, http_get, port_of, tcp_echo


@pytest.fixture
async def agent(edge_env: EdgeEnv) -> Agent:
    return await edge_env.start_agent()


@pytest.fixture
async def api(agent: Agent) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=endpoint_routes(agent))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:4040",
                                 timeout=20) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error_code", "status_code", "msg", "details"}
    assert body["status_code"] == response.status_code
    return body


async def test_http_and_tcp_endpoints(edge_env: EdgeEnv, nursery: trio.Nursery, agent: Agent,
                                      api: httpx.AsyncClient) -> None:
    web = await start_hello_upstream(nursery)
    echo = await start_echo_server(nursery)
    with trio.fail_after(20):
        r = await api.post("/api/endpoints", json={"name": "web", "url": "http://",
                                                   "upstream": {"url": str(web)}})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["name"] == "web" and created["uri"] == "/api/endpoints/web"
        assert created["url"].startswith("http://") and created["upstream"]["url"] == f"http://localhost:{web}"
        assert created["id"] and created["inspect"] is True and "metrics" in created
        r = await api.post("/api/endpoints", json={"name": "db", "url": "tcp://", "inspect": False,
                                                   "upstream": {"url": f"localhost:{echo}"}})
        assert r.status_code == 201, r.text
        tcp = r.json()
        assert tcp["url"].startswith("tcp://") and tcp["proto"] == "tcp"

        assert b"\r\n\r\nhello " in await http_get(edge_env.http_port, host_of(created["url"]))
        assert await tcp_echo(port_of(tcp["url"])) == b"ping"

        listing = (await api.get("/api/endpoints")).json()
        assert listing["uri"] == "/api/endpoints"
        assert [e["name"] for e in listing["endpoints"]] == ["web", "db"]
        assert (await api.get("/api/endpoints/db")).json()["url"] == tcp["url"]

        assert (await api.delete("/api/endpoints/web")).status_code == 204
        assert [t.name for t in agent.tunnels] == ["db"]
        assert error_of(await api.get("/api/endpoints/web"))["error_code"] == 104
        assert (await api.delete("/api/endpoints/web")).status_code == 404


async def test_default_url_is_one_https_endpoint(api: httpx.AsyncClient, agent: Agent) -> None:
    with trio.fail_after(20):
        r = await api.post("/api/endpoints", json={"name": "s", "upstream": {"url": "8080"}})
    assert r.status_code == 201, r.text
    assert r.json()["url"].startswith("https://")
    assert [(t.name, t.proto) for t in agent.tunnels] == [("s", "https")]


@pytest.mark.parametrize(("body", "says"), [
    ({"name": "x", "url": "https://"}, "upstream"),
    ({"name": "x", "url": "gopher://", "upstream": {"url": "80"}}, "url"),
    ({"name": "x", "upstream": {"url": "80", "protocol": "http2"}}, "protocol"),
    ({"name": "x", "upstream": {"url": "80"}, "traffic_policy": "on_http_request: []"}, "traffic_policy"),
    ({"name": "x", "upstream": {"url": "80"}, "pooling_enabled": True}, "pooling"),
    ({"name": "x", "upstream": {"url": "80"}, "basic_auth": ["a:b"]}, "basic_auth"),
    ({"name": "x", "url": "tcp://", "upstream": {"url": "not a port"}}, "addr"),
    ({"name": 7, "upstream": {"url": "80"}}, "name"),
    (["not", "an", "object"], "object"),
])
async def test_bad_definitions(api: httpx.AsyncClient, agent: Agent, body: Any, says: str) -> None:
    r = await api.post("/api/endpoints", json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["error_code"] == 102
    assert says in err["details"]["err"], err
    assert agent.tunnels == []


async def test_duplicates_json_only_and_put(api: httpx.AsyncClient, agent: Agent) -> None:
    with trio.fail_after(20):
        first = await api.post("/api/endpoints", json={"name": "a", "upstream": {"url": "8080"}})
        assert first.status_code == 201
        dup = await api.post("/api/endpoints", json={"name": "a", "upstream": {"url": "8081"}})
        assert dup.status_code == 400 and "already exists" in error_of(dup)["details"]["err"]

        form = await api.post("/api/endpoints", content=b"name=b", headers={"Content-Type": "text/plain"})
        assert form.status_code == 415
        bad = await api.post("/api/endpoints", content=b"{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400

        # PUT replaces (200) or creates (201); an invalid replacement leaves the old one running.
        r = await api.put("/api/endpoints/a", json={"upstream": {"url": "9090"}})
        assert r.status_code == 200, r.text
        assert r.json()["upstream"]["url"] == "http://localhost:9090"
        assert (await api.put("/api/endpoints/a", json={"url": "bogus://"})).status_code == 400
        assert [t.upstream for t in agent.tunnels] == ["http://localhost:9090"]
        assert (await api.put("/api/endpoints/c", json={"upstream": {"url": "9091"}})).status_code == 201
        renamed = await api.put("/api/endpoints/c", json={"name": "d", "upstream": {"url": "1"}})
        assert renamed.status_code == 400
    assert sorted(t.name for t in agent.tunnels) == ["a", "c"]


async def test_both_schemes_tunnel_lists_as_two_endpoints(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    web = await start_hello_upstream(nursery)
    agent = await edge_env.start_agent(TunnelConfig("w", "http", str(web)))
    app = Starlette(routes=endpoint_routes(agent))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as api:
        names = [e["name"] for e in (await api.get("/api/endpoints")).json()["endpoints"]]
        assert names == ["w", "w (http)"]
        assert (await api.get("/api/endpoints/w%20%28http%29")).status_code == 200
        with trio.fail_after(20):
            assert (await api.delete("/api/endpoints/w (http)")).status_code == 204
        assert [t.name for t in agent.tunnels] == ["w"]
