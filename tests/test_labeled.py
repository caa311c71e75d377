"""Labeled tunnels and edges: tunnel groups balancing requests (https) and connections (tcp)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import pytest
import trio
from click.testing import CliRunner

from tunneld.core import ERROR_HEADER, Agent, TunnelConfig
from tunneld.core._errors import Code, TunnelRejected
from tunneld.core._store import DEFAULT_ACCOUNT
from tunneld.plugins.labeled import _edge as labeled_edge

from .conftest import DOMAIN, EdgeEnv
from .plugins.test_http import Upstream, httpx_for

HOST = f"web.{DOMAIN}"


@pytest.fixture(autouse=True)
def fast_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Edges are read from the store every 0.1 s instead of 2 s (set before the edge starts)."""
    monkeypatch.setattr(labeled_edge, "REFRESH_INTERVAL", 0.1)


@attrs.define(eq=False)
class Member:
    """One of our agents running a labeled tunnel, stoppable on its own."""

    agent: Agent
    scope: trio.CancelScope

    async def stop_gracefully(self) -> None:
        await self.agent.stop_tunnels()
        self.scope.cancel()


async def start_member(env: EdgeEnv, nursery: trio.Nursery, port: int, *labels: str, **kw: Any) -> Member:
    agent = Agent(env.agent_config(**kw), [TunnelConfig("web", "tunnel", str(port), labels=list(labels))])
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await agent.run(task_status=task_status)

    await nursery.start(run)
    return Member(agent, scope)


async def group_size(env: EdgeEnv, edge_id: str, n: int) -> None:
    """Wait until the edge is routed with ``n`` members."""
    router = labeled_edge.router_for(env.edge.context)
    with trio.fail_after(10):
        while (group := router.group(edge_id)) is None or len(group.members) != n:
            await trio.sleep(0.02)
    await trio.sleep(0.05)  # the route is claimed by the task the refresh started


async def load(env: EdgeEnv, total: int, *, concurrency: int = 16, scheme: str = "https",
               after: Callable[[int], Any] | None = None) -> tuple[collections.Counter[str], list[str]]:
    """``total`` GETs through the edge's hostname; (responses by upstream, failures)."""
    shares: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    done = 0
    send, receive = trio.open_memory_channel[int](total)
    for i in range(total):
        send.send_nowait(i)
    send.close()
    client, base, ext = httpx_for(env, scheme, HOST)

    async def worker() -> None:
        nonlocal done
        async for _ in receive:
            try:
                resp = await client.get(base + "/hello", extensions=ext)
                if resp.status_code == 200:
                    shares[resp.headers["X-Upstream"]] += 1
                else:
                    failures.append(f"{resp.status_code} {resp.headers.get(ERROR_HEADER)}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            done += 1
            if after is not None:
                await after(done)

    async with client, trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return shares, failures


async def three_members(env: EdgeEnv, nursery: trio.Nursery) -> tuple[str, list[Member]]:
    upstreams = [await Upstream(name).start(nursery) for name in "ABC"]
    members = [await start_member(env, nursery, u.port, "app=web", f"name={u.name}") for u in upstreams]
    edge = env.store.create_edge(DEFAULT_ACCOUNT, "https", hostname=HOST, labels={"app": "web"})
    await group_size(env, edge.id, 3)
    return edge.id, members


async def test_https_edge_balances_requests_evenly(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    await three_members(edge_env, nursery)
    shares, failures = await load(edge_env, 3000)
    assert not failures, failures[:5]
    print(f"shares of 3000 requests: {dict(sorted(shares.items()))}")
    assert sorted(shares) == ["A", "B", "C"]
    for name, count in shares.items():
        assert 800 <= count <= 1200, (name, shares)


async def test_member_stopped_mid_load_fails_no_request(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    edge_id, members = await three_members(edge_env, nursery)
    stopped_at: list[int] = []

    async def after(done: int) -> None:
        if done == 300:
            nursery.start_soon(members[2].stop_gracefully)
            stopped_at.append(done)

    shares, failures = await load(edge_env, 1200, after=after)
    assert stopped_at and not failures, failures[:5]
    group = labeled_edge.router_for(edge_env.edge.context).group(edge_id)
    assert group is not None and len(group.members) == 2
    # C served until it left; the others took over.
    assert 0 < shares["C"] < 500 and shares["A"] > 400 and shares["B"] > 400, shares
    # Also over plain HTTP, and with C gone, only A and B answer.
    shares, failures = await load(edge_env, 60, scheme="http")
    assert not failures and set(shares) == {"A", "B"}, (shares, failures)


async def test_empty_group_answers_offline(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    edge_id, members = await three_members(edge_env, nursery)
    for member in members:
        await member.stop_gracefully()
    await group_size(edge_env, edge_id, 0)
    client, base, ext = httpx_for(edge_env, "https", HOST)
    async with client:
        resp = await client.get(base + "/hello", extensions=ext)
    assert resp.status_code == 502
    assert resp.headers[ERROR_HEADER] == Code.AGENT_UNREACHABLE.label
    # A member coming back is routed at once.
    upstream = await Upstream("D").start(nursery)
    await start_member(edge_env, nursery, upstream.port, "app=web")
    await group_size(edge_env, edge_id, 1)
    shares, failures = await load(edge_env, 5, concurrency=1)
    assert shares == {"D": 5} and not failures


async def test_edge_selects_by_all_labels_and_follows_updates(edge_env: EdgeEnv,
                                                              nursery: trio.Nursery) -> None:
    edge_id, members = await three_members(edge_env, nursery)
    edge_env.store.update_edge(DEFAULT_ACCOUNT, edge_id, labels={"app": "web", "name": "B"})
    await group_size(edge_env, edge_id, 1)
    shares, failures = await load(edge_env, 10, concurrency=2)
    assert shares == {"B": 10} and not failures
    edge_env.store.delete_edge(DEFAULT_ACCOUNT, edge_id)
    router = labeled_edge.router_for(edge_env.edge.context)
    with trio.fail_after(5):
        while router.group(edge_id) is not None or edge_env.edge.context.lookup_host("https", HOST):
            await trio.sleep(0.02)


async def _named_server(nursery: trio.Nursery, name: bytes) -> int:
    async def handle(stream: trio.SocketStream) -> None:
        await stream.send_all(name)

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return int(listeners[0].socket.getsockname()[1])


async def test_tcp_edge_balances_connections(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    for name in (b"A", b"B", b"C"):
        await start_member(edge_env, nursery, await _named_server(nursery, name), "svc=db")
    low, _high = edge_env.edge.config.tcp_ports
    edge = edge_env.store.create_edge(DEFAULT_ACCOUNT, "tcp", addr=f"{DOMAIN}:{low + 7}",
                                      labels={"svc": "db"})
    await group_size(edge_env, edge.id, 3)
    seen: collections.Counter[bytes] = collections.Counter()
    for _ in range(30):
        stream = await trio.open_tcp_stream("127.0.0.1", low + 7)
        async with stream:
            with trio.fail_after(5):
                seen[await stream.receive_some()] += 1
    assert seen == {b"A": 10, b"B": 10, b"C": 10}


async def test_labels_outside_the_acl_are_refused(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    _rec, token = edge_env.store.create_token("api only", acl=["bind:app=api"])
    upstream = await Upstream("A").start(nursery)
    with pytest.raises(BaseException) as info:  # noqa: B017,PT011 - an exception group around it
        await start_member(edge_env, nursery, upstream.port, "app=web", authtoken=token)
    rejected = info.value.exceptions[0] if isinstance(info.value, BaseExceptionGroup) else info.value
    assert isinstance(rejected, TunnelRejected) and rejected.code == Code.BIND_NAME_FORBIDDEN, info.value
    # The labels it allows start.
    await start_member(edge_env, nursery, upstream.port, "app=api", authtoken=token)


def test_tunnel_command_has_repeatable_label() -> None:
    from tunneld.cli import cli

    result = CliRunner().invoke(cli, ["tunnel", "--help"])
    assert result.exit_code == 0 and "--label KEY=VALUE" in result.output
    result = CliRunner().invoke(cli, ["tunnel", "--label", "novalue", "8080"])
    assert result.exit_code == 2 and "key=value" in result.output
