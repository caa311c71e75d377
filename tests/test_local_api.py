"""The agent's local REST API on a real hypercorn server (issue 16).

A real edge and agent on loopback, the web server from ``serve_web`` on port 0, and httpx as
the API client: ngrok's shapes and status codes, replay and modify-and-replay reaching the
upstream, starting and stopping tunnels, the live feed, and the guards against other origins.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import httpx
import pytest
import trio

from tunneld.core import Agent, TunnelConfig
from tunneld.core._web import serve_web

from .conftest import EdgeEnv
from .plugins.test_http import Upstream


@attrs.define
class Api:
    agent: Agent
    upstream: Upstream
    api: httpx.AsyncClient
    #: Public client of the "web" tunnel (plain HTTP through the edge).
    public: httpx.AsyncClient
    web_addr: str


@pytest.fixture
async def env(edge_env: EdgeEnv, nursery: trio.Nursery) -> AsyncIterator[Api]:
    upstream = await Upstream("A").start(nursery)
    agent = await edge_env.start_agent(TunnelConfig(name="web", proto="http",
                                                    addr=f"127.0.0.1:{upstream.port}", schemes=["http"]),
                                       web_addr="127.0.0.1:0")
    addr = await nursery.start(serve_web, agent, "127.0.0.1:0")
    host = agent.tunnels[0].public_url.split("://", 1)[1]
    async with httpx.AsyncClient(base_url=f"http://{addr}", timeout=20) as api, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge_env.http_port}", headers={"Host": host},
                              timeout=20) as public:
        yield Api(agent, upstream, api, public, addr)


async def replay(env: Api, body: dict[str, Any]) -> httpx.Response:
    return await env.api.post("/api/requests/http", json=body)


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Run ``test`` under a 30 s Trio deadline (fixtures' own setup is outside it)."""
    @functools.wraps(test)
    async def run(*args: Any, **kw: Any) -> None:
        with trio.fail_after(30):
            await test(*args, **kw)

    return run


def assert_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error_code", "status_code", "msg", "details"} and body["status_code"] == status
    assert isinstance(body["error_code"], int) and body["msg"]
    return body


@bounded
async def test_root_status_and_reason_phrases(env: Api) -> None:
    r = await env.api.get("/api")
    assert r.status_code == 200 and r.reason_phrase == "OK"
    assert r.json()["tunnels"] == "/api/tunnels" and r.json()["requests"] == "/api/requests/http"
    r = await env.api.get("/api/status")
    assert r.json()["status"] == "online"
    r = await env.api.delete("/api/requests/http")
    assert r.status_code == 204 and r.reason_phrase == "No Content"
    r = await env.api.get("/api/nope")
    assert r.reason_phrase == "Not Found"
    assert_error(r, 404)
    assert_error(await env.api.put("/api/tunnels", json={}), 405)


@bounded
async def test_tunnels_list_and_get(env: Api) -> None:
    r = await env.api.get("/api/tunnels")
    assert r.status_code == 200 and r.json()["uri"] == "/api/tunnels"
    (t,) = r.json()["tunnels"]
    assert t["name"] == "web" and t["ID"] and t["public_url"].startswith("http://") and t["proto"] == "http"
    assert t["config"] == {"addr": f"http://127.0.0.1:{env.upstream.port}", "inspect": True}
    assert set(t["metrics"]["conns"]) == {"count", "gauge", "rate1", "rate5", "rate15",
                                          "p50", "p90", "p95", "p99"}
    assert (await env.api.get("/api/tunnels/web")).json()["ID"] == t["ID"]
    body = assert_error(await env.api.get("/api/tunnels/nope"), 404)
    assert "nope" in body["msg"]


@bounded
async def test_captured_requests(env: Api) -> None:
    assert (await env.public.post("/echo?a=1", content=b"\x00\xffbinary")).status_code == 200
    assert (await env.public.get("/hello")).status_code == 200
    r = await env.api.get("/api/requests/http")
    assert r.status_code == 200 and r.json()["uri"] == "/api/requests/http"
    hello, echo = r.json()["requests"]  # newest first
    assert hello["request"]["uri"] == "/hello" and echo["request"]["uri"] == "/echo?a=1"
    assert base64.b64decode(echo["request"]["raw"]).endswith(b"\r\n\r\n\x00\xffbinary")
    assert echo["response"]["status"] == "200 OK" and echo["tunnel_name"] == "web"
    assert echo["replay_of"] is None and echo["request"]["truncated"] is False
    one = (await env.api.get(f"/api/requests/http/{echo['id']}")).json()
    assert one == echo
    limited = (await env.api.get("/api/requests/http?limit=1")).json()["requests"]
    assert [e["id"] for e in limited] == [hello["id"]]
    assert (await env.api.get("/api/requests/http?tunnel_name=other")).json()["requests"] == []
    assert len((await env.api.get("/api/requests/http?tunnel_name=web")).json()["requests"]) == 2
    assert_error(await env.api.get("/api/requests/http?limit=-1"), 400)
    assert_error(await env.api.get("/api/requests/http/ffffffffffffffff"), 404)
    assert (await env.api.delete("/api/requests/http")).status_code == 204
    assert (await env.api.get("/api/requests/http")).json()["requests"] == []


@bounded
async def test_replay_reaches_the_upstream(env: Api) -> None:
    assert (await env.public.post("/echo", content=b"payload", headers={"X-Orig": "1"})).status_code == 200
    (orig,) = (await env.api.get("/api/requests/http")).json()["requests"]
    seen = len(env.upstream.requests)
    r = await env.api.post("/api/requests/http", json={"id": orig["id"]})
    assert r.status_code == 204
    assert len(env.upstream.requests) == seen + 1
    replayed = env.upstream.requests[-1]
    assert replayed["method"] == "POST" and replayed["target"] == "/echo" and replayed["length"] == 7
    assert ("x-orig", "1") in replayed["headers"]
    new = (await env.api.get("/api/requests/http")).json()["requests"][0]
    assert new["replay_of"] == orig["id"] and new["id"] != orig["id"]
    assert new["request"]["raw"] == orig["request"]["raw"] and new["response"]["status_code"] == 200
    # A replay of the replay is marked with its own original.
    assert (await replay(env, {"id": new["id"], "tunnel_name": "web"})).status_code == 204
    assert (await env.api.get("/api/requests/http")).json()["requests"][0]["replay_of"] == new["id"]
    assert env.agent.tunnels[0].metrics.http_count == 3


@bounded
async def test_modify_and_replay(env: Api) -> None:
    assert (await env.public.post("/echo?x=1", content=b"old body", headers={"X-A": "a"})).status_code == 200
    (orig,) = (await env.api.get("/api/requests/http")).json()["requests"]
    modify = {"method": "PUT", "path": "/echo?x=2", "headers": [["X-B", "b"], ["Content-Length", "999"]],
              "body": base64.b64encode(b"new!").decode()}
    assert (await replay(env, {"id": orig["id"], "modify": modify})).status_code == 204
    got = env.upstream.requests[-1]
    assert (got["method"], got["target"], got["length"]) == ("PUT", "/echo?x=2", 4)
    names = [k for k, _ in got["headers"]]
    assert "x-b" in names and "x-a" not in names and "host" in names  # Host kept, framing rebuilt
    # Trailers: sent chunked.
    modify = {"trailers": [["X-Checksum", "abc"]]}
    assert (await replay(env, {"id": orig["id"], "modify": modify})).status_code == 204
    got = env.upstream.requests[-1]
    assert got["method"] == "POST" and got["length"] == len(b"old body")
    assert ("transfer-encoding", "chunked") in got["headers"]
    entry = (await env.api.get("/api/requests/http")).json()["requests"][0]
    assert entry["replay_of"] == orig["id"]
    raw = base64.b64decode(entry["request"]["raw"])
    assert raw.endswith(b"8\r\nold body\r\n0\r\nX-Checksum: abc\r\n\r\n")
    # Bad modifications are refused, naming the field.
    for bad, field in [({"method": "G T"}, "method"), ({"path": "no-slash"}, "path"),
                       ({"headers": [["X", "a\r\nInjected: 1"]]}, "headers[0]"), ({"body": "!!"}, "body"),
                       ({"headers": "x"}, "headers"), ({"colour": 1}, "colour")]:
        body = assert_error(await replay(env, {"id": orig["id"], "modify": bad}), 400)
        assert field in body["msg"]


@bounded
async def test_replay_errors(env: Api, edge_env: EdgeEnv) -> None:
    assert_error(await env.api.post("/api/requests/http", json={"id": "0000"}), 404)
    assert_error(await env.api.post("/api/requests/http", json={}), 400)
    assert_error(await env.api.post("/api/requests/http", json={"id": 5}), 400)
    assert_error(await env.api.post("/api/requests/http", json=["x"]), 400)
    assert_error(await env.api.post("/api/requests/http", content=b"{nope",
                                    headers={"Content-Type": "application/json"}), 400)
    # A request whose body was captured truncated replays only with a new body.
    env.agent.captures.body_cap = 10
    assert (await env.public.post("/echo", content=b"x" * 100)).status_code == 200
    (entry,) = (await env.api.get("/api/requests/http")).json()["requests"]
    assert entry["request"]["truncated"]
    body = assert_error(await env.api.post("/api/requests/http", json={"id": entry["id"]}), 400)
    assert "truncated" in body["msg"]
    r = await env.api.post("/api/requests/http", json={"id": entry["id"], "modify": {"body": ""}})
    assert r.status_code == 204 and env.upstream.requests[-1]["length"] == 0
    assert_error(await replay(env, {"id": entry["id"], "tunnel_name": "nope"}), 404)


@bounded
async def test_start_and_stop_tunnels(env: Api) -> None:
    r = await env.api.post("/api/tunnels", json={"name": "more", "proto": "http",
                                                 "addr": str(env.upstream.port), "schemes": ["http"]})
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["name"] == "more" and t["uri"] == "/api/tunnels/more" and t["public_url"].startswith("http://")
    host = t["public_url"].split("://", 1)[1]
    public = env.public.build_request("GET", "/hello", headers={"Host": host})
    assert (await env.public.send(public)).text == "hello from A\n"
    names = [x["name"] for x in (await env.api.get("/api/tunnels")).json()["tunnels"]]
    assert names == ["web", "more"]
    body = assert_error(await env.api.post("/api/tunnels", json={"name": "more", "proto": "http",
                                                                 "addr": "80"}), 400)
    assert body["error_code"] == 102 and "already exists" in body["details"]["err"]
    body = assert_error(await env.api.post("/api/tunnels", json={"name": "x", "proto": "gopher",
                                                                 "addr": "80"}), 400)
    assert body["msg"] == "invalid tunnel configuration" and body["details"]["err"]
    assert_error(await env.api.post("/api/tunnels", json={"name": "x", "proto": "http", "bogus": 1}), 400)
    assert (await env.api.delete("/api/tunnels/more")).status_code == 204
    assert_error(await env.api.get("/api/tunnels/more"), 404)
    assert_error(await env.api.delete("/api/tunnels/more"), 404)
    gone = await env.public.send(env.public.build_request("GET", "/hello", headers={"Host": host}))
    assert gone.status_code == 404


@bounded
async def test_unbound_tunnels_are_not_listed(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """An agent that never reached its edge shows no tunnels with empty URL and ID."""
    agent = Agent(edge_env.agent_config(), [TunnelConfig(name="web", proto="http", addr="8080")])
    addr = await nursery.start(serve_web, agent, "127.0.0.1:0")
    async with httpx.AsyncClient(base_url=f"http://{addr}", timeout=10) as api:
        with trio.fail_after(10):
            assert (await api.get("/api/tunnels")).json()["tunnels"] == []
            assert_error(await api.get("/api/tunnels/web"), 404)


@bounded
async def test_guards_against_other_origins(env: Api) -> None:
    # DNS rebinding: a foreign Host is refused; localhost-like ones are fine.
    assert_error(await env.api.get("/api/tunnels", headers={"Host": "evil.example"}), 403)
    for host in ("localhost:4040", "127.0.0.1", "[::1]:4040", "app.localhost"):
        assert (await env.api.get("/api/tunnels", headers={"Host": host})).status_code == 200
    # Writes take JSON only: an HTML form (or a "simple" text/plain fetch) cannot start anything.
    form = {"name": "evil", "proto": "http", "addr": "80"}
    assert_error(await env.api.post("/api/tunnels", data=form), 415)
    assert_error(await env.api.post("/api/tunnels", content=json.dumps(form),
                                    headers={"Content-Type": "text/plain"}), 415)
    assert_error(await env.api.post("/api/requests/http", content=b"{}"), 415)
    # A foreign Origin is refused even with a JSON body; no CORS headers are ever sent.
    r = await env.api.post("/api/tunnels", json=form, headers={"Origin": "https://evil.example"})
    assert_error(r, 403)
    assert not any(k.lower().startswith("access-control") for k in r.headers)
    r = await env.api.options("/api/tunnels", headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert not any(k.lower().startswith("access-control") for k in r.headers)
    assert_error(await env.api.delete("/api/tunnels/web", headers={"Origin": "null"}), 403)
    assert [t["name"] for t in (await env.api.get("/api/tunnels")).json()["tunnels"]] == ["web"]
    # The page's own origin may write.
    r = await env.api.delete("/api/requests/http", headers={"Origin": f"http://{env.web_addr}"})
    assert r.status_code == 204


@bounded
async def test_live_feed_delivers_requests(env: Api) -> None:
    async with env.api.stream("GET", "/api/requests/http/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        assert (await lines.__anext__()).startswith(":")  # the stream is open

        async def public_request() -> None:
            assert (await env.public.get("/hello?live=1")).status_code == 200
            assert (await env.api.delete("/api/requests/http")).status_code == 204

        async with trio.open_nursery() as nursery:
            nursery.start_soon(public_request)
            events: list[tuple[str, str]] = []
            event = ""
            async for line in lines:
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, line[6:]))
                    if event == "clear":
                        break
    (kind, data), (kind2, _) = events
    assert kind == "request" and kind2 == "clear"
    entry = json.loads(data)
    assert entry["request"]["uri"] == "/hello?live=1" and entry["response"]["status_code"] == 200
