"""ngrok's Python SDK (1.7.0) starts labeled listeners that join our agents' tunnel groups."""

from __future__ import annotations

import collections

import trio

from tunneld.core._store import DEFAULT_ACCOUNT

from ..conftest import DOMAIN, EdgeEnv
from ..plugins.test_http import Upstream, httpx_for
from ..test_labeled import group_size, start_member
from .test_ngrok_clients import py_sdk, run_sdk  # noqa: F401 - fixture

HOST = f"web.{DOMAIN}"


async def test_py_sdk_labeled_listener_joins_the_group(py_sdk: list[str], edge_env: EdgeEnv,  # noqa: F811
                                                       nursery: trio.Nursery) -> None:
    ours, theirs = await Upstream("ours").start(nursery), await Upstream("sdk").start(nursery)
    await start_member(edge_env, nursery, ours.port, "app=web")
    edge = edge_env.store.create_edge(DEFAULT_ACCOUNT, "https", hostname=HOST, labels={"app": "web"})
    await group_size(edge_env, edge.id, 1)
    async with run_sdk(py_sdk, edge_env, theirs.port, proto="labeled", labels="app:web") as client:
        msg = await client.message()
        # A labeled listener has no URL: the edge owns it.
        assert "error" not in msg and msg["url"] is None and msg["id"].startswith("tn_"), msg
        await group_size(edge_env, edge.id, 2)
        shares: collections.Counter[str] = collections.Counter()
        for scheme in ("https", "http"):
            http, base, ext = httpx_for(edge_env, scheme, HOST)
            async with http:
                for _ in range(10):
                    resp = await http.get(base + "/hello", extensions=ext)
                    assert resp.status_code == 200, resp.text
                    shares[resp.headers["X-Upstream"]] += 1
        assert shares == {"ours": 10, "sdk": 10}, shares
