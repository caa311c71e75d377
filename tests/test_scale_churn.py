"""Flat under churn, heartbeats without a task, admission control (issue 17).

Smaller counts than ``bench/many_agents.py --churn`` and ``bench/many_conns.py --churn``: agents
that come and go and short public connections must leave the edge's descriptors where they were
and its memory close to where it was.  No timing assertions.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import pytest
import trio

from tunneld.core import Agent, MuxSession, TunnelConfig, proto
from tunneld.core import _edge as edge_mod
from tunneld.core._plugins import build_registry, get_plugin_manager
from tunneld.core._rpc import call
from tunneld.core._tls import client_context, open_tls_client

from .conftest import EdgeEnv, rss_kib, sqlite_memory_used, start_hello_upstream


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(env: EdgeEnv, fds: int | None = None) -> int:
    """Wait until the edge has no agent session and (if given) the descriptors are back to ``fds``."""
    with trio.fail_after(10):
        while env.edge.sessions or (fds is not None and fd_count() > fds):
            await trio.sleep(0.02)
    return fd_count()


pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")


async def test_agent_churn_leaves_descriptors_and_memory_flat(edge_env: EdgeEnv) -> None:
    """200 agent connect/disconnect cycles, 20 at a time (the edge, the agents and the upstream
    share this process: its descriptors must come back exactly)."""
    registry = build_registry(get_plugin_manager())
    upstream_config = TunnelConfig("t", "http", "127.0.0.1:9", inspect=False, schemes=["http"])

    async def round_(n: int) -> None:
        agents = [Agent(edge_env.agent_config(), [upstream_config], registry=registry) for _ in range(n)]
        async with trio.open_nursery() as nursery:
            for agent in agents:
                await nursery.start(agent.run)
            assert len([s for s in edge_env.edge.sessions if s.authed]) == n
            nursery.cancel_scope.cancel()

    with trio.fail_after(60):
        await round_(20)  # warm-up: caches, heap
        gc.collect()  # sockets an earlier test dropped unclosed go now, not during the count
        base_fds = await settle(edge_env)
        base_rss = rss_kib()
        for _ in range(10):
            await round_(20)
        # Growth is what counts: an earlier test's leftovers may still close meanwhile.
        assert await settle(edge_env, base_fds) <= base_fds
    grown = rss_kib() - base_rss
    # ~100 KB a live session: 200 kept would be ~20 MB; a few MB is allocator slack.
    assert grown < 12 * 1024, f"RSS grew {grown} KiB over 200 sessions"
    assert not edge_env.edge.preauth_by_host and not edge_env.edge.sessions_by_token


@pytest.fixture
def fast_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge's periodic trim every 50 ms (before the edge starts: its first wait reads it)."""
    monkeypatch.setattr(edge_mod, "TRIM_INTERVAL", 0.05)


@pytest.mark.skipif(sqlite_memory_used() is None, reason="sqlite3 is not a shared libsqlite3 here")
async def test_the_trim_after_agents_leave_gives_back_the_store_cache(fast_trim: None,
                                                                      edge_env: EdgeEnv) -> None:
    """A crowd's name holds fill SQLite's page cache; once they are gone and an agent session
    ends, the edge's trim gives the cache back (``PRAGMA shrink_memory``)."""
    memory_used = sqlite_memory_used()
    assert memory_used is not None
    store = edge_env.store
    # What 6,000 departed agents' holds do to the store: written, then deleted at the sweep.
    names = [("host", f"{i:06d}.churn.tunneld.test") for i in range(6000)]
    await trio.to_thread.run_sync(store.save_names, [(*key, "owner", 1e12) for key in names], [])
    await trio.to_thread.run_sync(store.save_names, [], names)
    grown = memory_used()
    agent = Agent(edge_env.agent_config(), [TunnelConfig("t", "http", "127.0.0.1:9", inspect=False,
                                                         schemes=["http"])])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            nursery.cancel_scope.cancel()
        await settle(edge_env)
        while memory_used() > grown - 300_000:
            await trio.sleep(0.02)


async def _get(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: churn.tunneld.test\r\nConnection: close\r\n\r\n")
        got = b""
        while data := await stream.receive_some():
            got += data
        return got


async def test_short_public_connections_leave_descriptors_and_memory_flat(edge_env: EdgeEnv,
                                                                           nursery: trio.Nursery) -> None:
    """2,000 short HTTP connections through one tunnel, 50 at a time."""
    upstream = await start_hello_upstream(nursery)
    await edge_env.start_agent(TunnelConfig("t", "http", str(upstream), inspect=False, schemes=["http"],
                                            subdomain="churn"))
    port = edge_env.http_port
    answers: dict[bool, int] = {True: 0, False: 0}

    async def round_(n: int) -> None:
        limit = trio.CapacityLimiter(50)

        async def one() -> None:
            async with limit:
                answers[(await _get(port)).endswith(b"hello churn.tunneld.test")] += 1

        async with trio.open_nursery() as clients:
            for _ in range(n):
                clients.start_soon(one)

    async def quiet() -> int:
        # Connections end on both sides a moment after the client has its answer.
        before = -1
        while (now := fd_count()) != before:
            before = now
            await trio.sleep(0.2)
        return now

    with trio.fail_after(60):
        await round_(200)
        base_fds = await quiet()
        base_rss = rss_kib()
        await round_(2000)
        with trio.fail_after(10):
            while fd_count() > base_fds:
                await trio.sleep(0.05)
    assert answers == {True: 2200, False: 0}
    grown = rss_kib() - base_rss
    assert grown < 12 * 1024, f"RSS grew {grown} KiB over 2,000 connections"


# ---- heartbeats ---------------------------------------------------------------------------------


async def _raw_session(env: EdgeEnv, nursery: trio.Nursery) -> MuxSession:
    tls = await open_tls_client("127.0.0.1", env.info.ports["agent"], client_context(env.ca))
    mux = MuxSession(tls, client=True)
    await nursery.start(mux.run)
    return mux


async def test_heartbeats_are_echoed_and_silence_ends_the_session(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge echoes heartbeats with no task per session; an agent that goes quiet for longer
    than its declared interval + tolerance (+ slack) loses its session."""
    monkeypatch.setattr(edge_mod, "HEARTBEAT_SLACK", 0.2)
    monkeypatch.setattr(edge_mod, "HEARTBEAT_SWEEP", 0.1)
    # The watcher started with the edge: restart it with the short sweep.
    nursery.start_soon(edge_env.edge._watch_heartbeats)
    mux = await _raw_session(edge_env, nursery)
    extra = proto.AuthExtra(authtoken=edge_env.token, heartbeat_interval=int(0.3e9),
                            heartbeat_tolerance=int(0.3e9))
    resp = await call(mux, proto.StreamType.AUTH, proto.Auth(version=["2"], extra=extra), proto.AuthResp)
    assert not resp.error
    session = next(s for s in edge_env.edge.sessions if s.authed)
    assert session.auth is not None and session.auth.extra.authtoken == ""  # not kept
    hb = await mux.open_stream(proto.encode_stream_type(proto.StreamType.HEARTBEAT))
    with trio.fail_after(10):
        for nonce in (b"\1\2\3\4", b"abcd", b"wxyz"):
            await hb.send_all(nonce)
            assert await hb.receive_exactly(4) == nonce
            await trio.sleep(0.2)
        assert not mux.is_closed
        await mux.closed.wait()  # silent from now on: 0.3 + 0.3 + 0.2 s, then a sweep
    assert session not in edge_env.edge.sessions or session.mux.is_closed


# ---- admission control --------------------------------------------------------------------------


async def test_stalled_handshakes_cannot_hold_the_queue(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With one handshake slot: a connection that sends nothing takes no slot, and one that
    stalls mid-handshake keeps it at most HANDSHAKE_SLOT_TIME; a real agent then gets in, and
    the stalled one is dropped after HANDSHAKE_FINISH_TIME."""
    monkeypatch.setattr(edge_mod, "HANDSHAKE_SLOT_TIME", 0.3)
    monkeypatch.setattr(edge_mod, "HANDSHAKE_FINISH_TIME", 2.0)
    edge_env.edge.admission = trio.Semaphore(1)
    port = edge_env.info.ports["agent"]
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    stalled = await trio.open_tcp_stream("127.0.0.1", port)
    # The start of a ClientHello record, never finished.
    await stalled.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    await trio.sleep(0.1)
    with trio.fail_after(10):
        agent = await edge_env.start_agent(TunnelConfig("t", "http", "127.0.0.1:9", inspect=False,
                                                        schemes=["http"]))
    assert agent.online.is_set()
    with trio.fail_after(10):
        with contextlib.suppress(trio.BrokenResourceError):  # closed with unread data: a reset
            assert await stalled.receive_some() == b""
    await silent.aclose()
    await stalled.aclose()


async def test_a_crowd_of_agents_queues_instead_of_timing_out(edge_env: EdgeEnv,
                                                              nursery: trio.Nursery) -> None:
    """30 agents at once through 2 handshake slots: all online, none had to retry."""
    edge_env.edge.admission = trio.Semaphore(2)
    registry = build_registry(get_plugin_manager())
    agents = [Agent(edge_env.agent_config(), [TunnelConfig("t", "http", "127.0.0.1:9", inspect=False,
                                                           schemes=["http"])], registry=registry)
              for _ in range(30)]
    with trio.fail_after(30):
        async with trio.open_nursery() as crowd:
            for agent in agents:
                crowd.start_soon(agent.run)
            for agent in agents:
                await agent.online.wait()
            crowd.cancel_scope.cancel()
    assert sum(a.failed_attempts for a in agents) == 0
