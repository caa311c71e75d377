"""The edge's admin REST API and /metrics, on loopback against an in-process edge."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.conftest import DOMAIN, EdgeEnv, start_hello_upstream
from tunneld.core import TunnelConfig
from tunneld.core._admin import RESOURCES, AdminApi
from tunneld.core._store import DEFAULT_ACCOUNT

ED25519_BLOB = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20"


def ssh_key(n: int) -> str:
    return "ssh-ed25519 " + base64.b64encode(ED25519_BLOB + bytes([n]) * 32).decode() + " test"


@attrs.define
class Api:
    env: EdgeEnv
    url: str
    key: str
    client: httpx.AsyncClient
    api: AdminApi

    def with_key(self, key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


@pytest.fixture
async def api(edge_env: EdgeEnv) -> AsyncIterator[Api]:
    admin = AdminApi(edge_env.edge, ("127.0.0.1", 0))
    bound = await edge_env.nursery.start(admin.run)
    url = f"http://{bound}"
    _, key = edge_env.store.create_api_key(DEFAULT_ACCOUNT, "test")
    # TCP edges serve only addresses their account reserved.
    for addr in ("tcp.example.com:20002", "1.2.3.4:5"):
        edge_env.store.create_reserved_addr(DEFAULT_ACCOUNT, addr)
    async with httpx.AsyncClient(base_url=url, timeout=10,
                                 headers={"Authorization": f"Bearer {key}", "Ngrok-Version": "2"}) as client:
        yield Api(edge_env, url, key, client, admin)


CREATE_BODIES: dict[str, dict[str, Any]] = {
    "credentials": {"description": "laptop", "acl": ["bind:*.Example.com"]},
    "api_keys": {"description": "ci"},
    "reserved_domains": {"domain": "app.example.com", "description": "app"},
    "reserved_addrs": {"addr": "tcp.example.com:20001"},
    "ssh_credentials": {"public_key": ssh_key(1), "acl": ["bind:a=b"]},
    "edges/https": {"hostname": f"web.{DOMAIN}", "labels": {"app": "web"}},
    "edges/tcp": {"addr": "tcp.example.com:20002"},
    "edges/tls": {"hostname": f"tls.{DOMAIN}"},
}


def check_error(resp: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error_code"].startswith(("ERR_TUNNELD_", "ERR_NGROK_"))
    assert body["status_code"] == resp.status_code and isinstance(body["msg"], str)
    assert isinstance(body["details"], dict)
    return body


@pytest.mark.parametrize("path", list(CREATE_BODIES))
async def test_crud(api: Api, path: str) -> None:
    c = api.client
    resp = await c.post(f"/{path}", json=CREATE_BODIES[path])
    assert resp.status_code == 201, resp.text
    created = resp.json()
    rid = created["id"]
    assert created["uri"] == f"{api.url}/{path}/{rid}"
    assert created["created_at"].endswith("Z") and created["description"] == CREATE_BODIES[path].get(
        "description", "")
    if path in ("credentials", "api_keys"):
        assert created["token"]  # shown once ...
    got = await c.get(f"/{path}/{rid}")
    assert got.status_code == 200
    if path in ("credentials", "api_keys"):
        assert got.json()["token"] is None  # ... and never again
    listed = (await c.get(f"/{path}")).json()
    assert rid in {item["id"] for item in next(v for k, v in listed.items() if isinstance(v, list))}
    assert listed["uri"] == f"{api.url}/{path}" and listed["next_page_uri"] is None
    patched = await c.patch(f"/{path}/{rid}", json={"description": "new", "metadata": "m"})
    assert patched.status_code == 200 and patched.json()["description"] == "new"
    assert patched.json()["metadata"] == "m"
    assert (await c.delete(f"/{path}/{rid}")).status_code == 204
    check_error(await c.get(f"/{path}/{rid}"), 404)
    check_error(await c.delete(f"/{path}/{rid}"), 404)


async def test_resource_shapes(api: Api) -> None:
    c = api.client
    cred = (await c.post("/credentials", json=CREATE_BODIES["credentials"])).json()
    assert cred["id"].startswith("cr_") and cred["acl"] == ["bind:*.example.com"]
    assert cred["token"].startswith("tkd_" + cred["id"][3:] + "_")
    assert api.env.store.verify_token(cred["token"]) is not None
    rd = (await c.post("/reserved_domains", json={"domain": "Bücher.Example."})).json()
    assert rd["domain"] == "xn--bcher-kva.example" and rd["cname_target"] == api.env.edge.config.cname
    edge = (await c.post("/edges/https", json={"hostname": f"w.{DOMAIN}"})).json()
    assert edge["id"].startswith("edghts_") and edge["backend"]["labels"] == {"edge": edge["id"]}
    assert edge["hostports"] == [f"w.{DOMAIN}:{api.env.https_port}"]
    # An edge on a reserved domain of the account; names it may not serve are refused.
    rd_edge = (await c.post("/edges/https", json={"hostname": "xn--bcher-kva.example"})).json()
    assert rd_edge["hostname"] == "xn--bcher-kva.example"
    check_error(await c.post("/edges/https", json={"hostname": "elsewhere.example"}), 400)
    check_error(await c.post("/edges/https", json={"hostname": f"a.b.{DOMAIN}"}), 400)
    check_error(await c.post("/edges/tcp", json={"addr": "1.2.3.4:6"}), 400)
    other = api.env.store.ensure_account("other").id
    api.env.store.create_reserved_domain(other, f"theirs.{DOMAIN}")
    check_error(await c.post("/edges/tls", json={"hostname": f"theirs.{DOMAIN}"}), 409)
    tcp = (await c.post("/edges/tcp", json={"addr": "1.2.3.4:5"})).json()
    assert tcp["id"].startswith("edgtcp_") and tcp["hostports"] == ["1.2.3.4:5"]
    # An edge of one proto is not found under another.
    check_error(await c.get(f"/edges/tls/{edge['id']}"), 404)
    check_error(await c.delete(f"/edges/tls/{edge['id']}"), 404)
    check_error(await c.post("/reserved_domains", json={"domain": "bücher.example"}), 409)
    patched = (await c.patch(f"/credentials/{cred['id']}", json={"acl": []})).json()
    assert patched["acl"] == [] and patched["description"] == "laptop"


async def test_pagination(api: Api) -> None:
    c = api.client
    before = [r.id for r in reversed(api.env.store.list_reserved_addrs(DEFAULT_ACCOUNT))]  # the fixture's
    ids = before + [(await c.post("/reserved_addrs", json={"addr": f"10.0.0.1:{p}"})).json()["id"]
                    for p in range(1, 6)]
    seen: list[str] = []
    url: str | None = "/reserved_addrs?limit=2"
    while url:
        page = (await c.get(url)).json()
        assert len(page["reserved_addrs"]) <= 2
        seen += [item["id"] for item in page["reserved_addrs"]]
        url = page["next_page_uri"]
    assert seen == ids[::-1]
    for bad in ("limit=0", "limit=101", "limit=x", "limit=-1", "before_id=../x", "bogus=1"):
        check_error(await c.get(f"/reserved_addrs?{bad}"), 400)


async def test_accounts_never_see_each_other(api: Api) -> None:
    store = api.env.store
    other = store.ensure_account("other").id
    _, other_key = store.create_api_key(other, "theirs")
    mine: dict[str, str] = {}
    for i, (path, body) in enumerate(CREATE_BODIES.items()):
        if path == "ssh_credentials":
            body = {**body, "public_key": ssh_key(50 + i)}
        resp = await api.client.post(f"/{path}", json=body)
        assert resp.status_code == 201, resp.text
        mine[path] = resp.json()["id"]
    async with api.with_key(other_key) as theirs:
        for path, rid in mine.items():
            check_error(await theirs.get(f"/{path}/{rid}"), 404)
            check_error(await theirs.patch(f"/{path}/{rid}", json={"description": "x"}), 404)
            check_error(await theirs.delete(f"/{path}/{rid}"), 404)
            listed = (await theirs.get(f"/{path}")).json()
            items = next(v for k, v in listed.items() if isinstance(v, list))
            ids = {item["id"] for item in items}
            assert rid not in ids
            assert (await theirs.get(f"/{path}?before_id={rid}")).status_code == 200
        check_error(await theirs.get("/metrics"), 403)
        # Their own default-token session list: none of ours.
        assert (await theirs.get("/tunnel_sessions")).json()["tunnel_sessions"] == []
    for path, rid in mine.items():  # still there
        assert (await api.client.get(f"/{path}/{rid}")).status_code == 200


async def test_auth_failures_are_refused_and_slowed(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as anon:
        body = check_error(await anon.get("/credentials"), 401)
        assert body["error_code"] == "ERR_TUNNELD_4401"
        # Three failures are free (the first above); the fourth's answer waits 0.5 s.
        for header in ("Bearer tka_000000000000_" + "A" * 40, "Basic abc"):
            check_error(await anon.get("/credentials", headers={"Authorization": header}), 401)
        # Past the limiter's free failures the answer waits; a good key still gets in at once.
        start = time.monotonic()
        check_error(await anon.get("/credentials", headers={"Authorization": "Bearer nope"}), 401)
        assert time.monotonic() - start >= 0.4
        start = time.monotonic()
        assert (await api.client.get("/credentials")).status_code == 200
        assert time.monotonic() - start < 0.4
        assert (await anon.get("/openapi.json")).status_code == 200  # public


async def test_errors_are_json_4xx(api: Api) -> None:
    c = api.client
    check_error(await c.get("/nope"), 404)
    check_error(await c.put("/credentials"), 405)
    check_error(await c.post("/tunnels"), 405)
    check_error(await c.get("/credentials/" + "x" * 200), 404)
    check_error(await c.post("/credentials", content=b"x" * 70_000), 413)
    check_error(await c.post("/credentials?x=1", json={}), 400)


def _bad_bodies(path: str, rng: random.Random) -> tuple[list[Any], list[Any]]:
    """(bodies every verb must refuse, random bodies that must get no 5xx)."""
    junk: list[Any] = [None, 1, 1.5, True, "s", [], [1], {"a": {"b": []}}, "x" * 5000, {"k": "v"}]
    good = CREATE_BODIES[path]
    bad: list[Any] = ["[", "{", "nul", "\ud800", "1e999999", "[" * 5000 + "]" * 5000, [], "1", '"s"',
                      '{"description": "\\ud800"}', '{"\\udfff": 1}', '{"description": "a\\u0000"}']
    bad += [{"unknown_field": 1}, {**good, "id": "cr_x"}, {**good, "token": "t"}, {**good, "": 1}]
    bad += [{**good, "description": "x" * 256}, {**good, "metadata": "x" * 4097}]
    kinds = {"acl": list, "labels": dict}
    for key in good:
        for value in junk:
            if not isinstance(value, kinds.get(key, str)) or (key == "acl" and value):
                bad.append({**good, key: value})
    if "acl" in good:
        bad += [{**good, "acl": acl} for acl in (["bind:*.*.a.com"], ["nope"], ["bind:a b"], "bind:a.com",
                                                  ["bind:k=v,w"], [""], [None],
                                                  [f"bind:h{i}.com" for i in range(101)])]
    if "domain" in good:
        bad += [{**good, "domain": d}
                for d in ("a..b", "-a.com", "a_b.com", "*.*.a", " a.com", "x" * 300, "")]
    if "hostname" in good:
        bad += [{**good, "hostname": d} for d in ("a..b", "*.a.com", "a:1", "", "x" * 64 + ".com")]
    if "addr" in good:
        bad += [{**good, "addr": a} for a in ("a.com", "a.com:0", "a.com:99999", ":1", "[zz]:1", "a b:1", "")]
    if "labels" in good:
        bad += [{**good, "labels": lab} for lab in ({"a=b": "c"}, {"a": "b,c"}, {"": "x"}, {"a": ""},
                                                     {"a": 1}, ["a=b"], {"a": " b"}, {"a": "*"})]
    if "public_key" in good:
        bad += [{**good, "public_key": k} for k in ("", "ssh-ed25519", "ssh-ed25519 !!!", "ssh-dss AAAA",
                                                     "ssh-rsa " + ssh_key(3).split()[1])]
    rand = [{rng.choice([*good, "x", "ID", ""]): rng.choice(junk) for _ in range(rng.randint(1, 3))}
            for _ in range(20)]
    return bad, rand


@pytest.mark.parametrize("path", list(CREATE_BODIES))
async def test_fuzzed_bodies_get_4xx(api: Api, path: str) -> None:
    rng = random.Random(path)
    c = api.client
    made = (await c.post(f"/{path}", json=CREATE_BODIES[path])).json()["id"]
    bad, rand = _bad_bodies(path, rng)
    for body in bad + rand:
        content = body if isinstance(body, str) else json.dumps(body)
        for method, url in (("POST", f"/{path}"), ("PATCH", f"/{path}/{made}")):
            resp = await c.request(method, url, content=content.encode("utf-8", "surrogatepass"),
                                   headers={"Content-Type": "application/json"})
            if resp.status_code < 400:
                assert body in rand, (method, body, resp.text)  # only random bodies may be valid
                assert resp.status_code in (200, 201)
                if method == "POST":
                    await c.delete(f"/{path}/{resp.json()['id']}")
                continue
            check_error(resp)


async def test_openapi_lists_every_route(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    routes = api.api.routes()
    for path, methods, _ in routes:
        assert path in doc["paths"], path
        for method in methods:
            assert method.lower() in doc["paths"][path], (path, method)
    assert len(doc["paths"]) == len(routes)
    assert {f"/{r.path}" for r in RESOURCES} <= set(doc["paths"])


async def test_sessions_tunnels_metrics_and_deletion_disconnects(api: Api, nursery: trio.Nursery) -> None:
    env = api.env
    c = api.client
    cred = (await c.post("/credentials", json={"description": "agent"})).json()
    upstream = await start_hello_upstream(nursery)
    agent_done = trio.Event()

    async def run_agent(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        from tunneld.core import Agent

        agent = Agent(env.agent_config(authtoken=cred["token"], metadata="laptop 7"),
                      [TunnelConfig("web", "http", str(upstream), metadata="web meta")])
        try:
            await agent.run(task_status=task_status)
        except* Exception:  # noqa: BLE001 - the agent stops once its credential is gone
            pass
        finally:
            agent_done.set()

    with trio.fail_after(15):
        await nursery.start(run_agent)
        sessions = (await c.get("/tunnel_sessions")).json()["tunnel_sessions"]
        mine = [s for s in sessions if s["credential"]["id"] == cred["id"]]
        assert len(mine) == 1 and mine[0]["ip"] == "127.0.0.1" and mine[0]["started_at"].endswith("Z")
        assert mine[0]["metadata"] == "laptop 7"  # the agent's ``metadata`` key reaches the edge
        one = await c.get(f"/tunnel_sessions/{mine[0]['id']}")
        assert one.status_code == 200 and one.json()["id"] == mine[0]["id"]
        check_error(await c.get("/tunnel_sessions/nope"), 404)
        tunnels = (await c.get("/tunnels")).json()["tunnels"]
        ours = [t for t in tunnels if t["tunnel_session"]["id"] == mine[0]["id"]]
        assert ours and all(t["public_url"] for t in ours)
        assert {t["proto"] for t in ours} <= {"http", "https"}
        env.edge.context.count("refused_binds", code="ERR_TUNNELD_316")  # what plugins and the edge count
        env.edge.context.count("widgets", kind="x")  # a plugin's own counter
        # Real traffic moves the request counters and the duration histogram.
        http_url = next(t["public_url"] for t in ours if t["proto"] == "http")
        host = http_url.split("://")[1].rsplit(":", 1)[0]
        stream = await trio.open_tcp_stream("127.0.0.1", env.http_port)
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        async for chunk in stream:
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
        assert 'tunneld_agent_sessions{state="authenticated"} 1.0' in text
        assert 'tunneld_tunnels{proto="http"}' in text and "tunneld_open_connections" in text
        assert 'tunneld_refused_binds_total{code="ERR_TUNNELD_316"} 1.0' in text
        assert 'tunneld_widgets_total{kind="x"} 1.0' in text
        assert 'tunneld_http_requests_total{code="2xx"} 1.0' in text
        assert 'tunneld_http_request_duration_seconds_bucket{code="2xx",le="+Inf"} 1.0' in text
        assert 'tunneld_auth_failures_total{kind="agent"} 0.0' in text
        assert "tunneld_idle_sessions_parked " in text and "tunneld_idle_heartbeats_answered_total " in text
        assert any(line.startswith('tunneld_tunnels{proto="http') and not line.endswith(" 0.0")
                   for line in text.splitlines())
        # Deleting the credential ends its session within 5 s.
        start = time.monotonic()
        assert (await c.delete(f"/credentials/{cred['id']}")).status_code == 204
        token_id = cred["id"][3:]
        while any(s.token_id == token_id for s in env.edge.sessions):
            await trio.sleep(0.05)
        assert time.monotonic() - start < 5
        assert (await c.get("/tunnel_sessions")).json()["tunnel_sessions"] == []
        await agent_done.wait()
