"""What an idle agent session keeps on the edge (issue 17: ≤ 50 KB per idle session).

The figure itself is measured by ``bench/many_agents.py``; these tests pin the structure behind
it, which a refactoring could silently undo: which tasks and nurseries a session holds, and that
nothing keeps finished tasks alive.
"""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from tunneld.core import TunnelConfig, TunnelInfo, proto
from tunneld.core._edge import AgentSession
from tunneld.core._rpc import call
from tunneld.plugins.http._edge import HttpEdgeTunnel

from ..conftest import EdgeEnv
from .test_agent_port_hardening import _bind, auth, raw_session


def _short(task: trio.lowlevel.Task) -> str:
    return task.name.rsplit(".", 1)[-1]


async def _idle_session(edge_env: EdgeEnv) -> AgentSession:
    await edge_env.start_agent(TunnelConfig("web", "http", "127.0.0.1:9", schemes=["http"]))
    with trio.fail_after(10):
        while True:
            sessions = list(edge_env.edge.sessions)
            if sessions and sessions[0]._heartbeat is not None:
                break
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked(0.05)
    return sessions[0]


async def test_an_idle_session_is_one_reader_and_one_writer(edge_env: EdgeEnv) -> None:
    session = await _idle_session(edge_env)
    nursery = session._nursery
    assert nursery is not None
    # The reader is the session's own task (no accept loop, no separate mux task) and the
    # session nursery is its only nursery (no carrier nursery for a TLS carrier).
    reader = nursery.parent_task
    assert reader.child_nurseries == [nursery]
    # Its HTTP tunnel is a claim the session holds (ClaimTunnel), not a task.
    assert [_short(t) for t in nursery.child_tasks] == ["_writer_task"]
    assert [type(t).__name__ for t in session.tunnels.values()] == ["HttpEdgeTunnel"]
    # Nothing queued or waited on besides: no accept queue, no parking lots.
    mux = session.mux
    assert mux._accept_send is None
    assert (mux._outbox_space, mux._flushed, mux._stream_gone) == (None, None, None)
    assert session._heartbeat is not None and session._heartbeat._chunks is None


async def test_an_idle_sessions_reader_sleeps_through_its_heartbeats(edge_env: EdgeEnv) -> None:
    """The edge's idle watcher answers an idle agent's heartbeats (``_idlewatch``): the
    session's reader stays parked, and a proxied request still wakes it."""
    agent = await edge_env.start_agent(TunnelConfig("web", "http", "127.0.0.1:9", schemes=["http"]),
                                       heartbeat_interval=0.05)
    watcher = edge_env.edge.idle_watcher
    with trio.fail_after(10):
        while not (watcher.parked and watcher.answered >= 3):
            await trio.sleep(0.01)
    (session,) = edge_env.edge.sessions
    assert session.mux.parked_fd is not None
    handed_back = watcher.handed_back
    answered = watcher.answered
    with trio.fail_after(10):
        while watcher.answered < answered + 5:
            await trio.sleep(0.01)
    assert watcher.handed_back == handed_back
    assert not session.silent(trio.current_time())
    # A public request opens a stream: the agent's answer (a 502, nothing listens on port 9)
    # comes back through the reader, which parks again once the stream is gone.
    stream = await trio.open_tcp_stream("127.0.0.1", edge_env.http_port)
    host = agent.tunnels[0].public_url.split("://", 1)[1]
    await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    with trio.fail_after(10):
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert watcher.handed_back > handed_back
    with trio.fail_after(10):
        while session.mux.parked_fd is None:
            await trio.sleep(0.01)


async def test_an_idle_session_keeps_no_finished_task_alive(edge_env: EdgeEnv) -> None:
    """The Auth and Bind handlers, and Nursery.start's nursery around the tunnel's start, are
    garbage once they are done (trio's task status, kept by a tunnel's run, held them)."""
    await _idle_session(edge_env)
    gc.collect()
    finished = [o for o in gc.get_objects()
                if type(o) is trio.lowlevel.Task and o.coro.cr_frame is None
                and o.name.startswith("tunneld.core._edge.")]
    assert finished == []


async def test_a_claim_finishing_after_its_session_ended_is_released(
        edge_env: EdgeEnv, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim may outlive the session's cancellation (the HTTPS certificate is made in a
    thread, which trio does not abandon): the session lets go of it once its handlers ended."""
    finish = trio.Event()
    claiming = trio.Event()
    original = HttpEdgeTunnel.claim

    async def slow_claim(self: HttpEdgeTunnel) -> TunnelInfo:
        claiming.set()
        with trio.CancelScope(shield=True):
            await finish.wait()
        return await original(self)

    monkeypatch.setattr(HttpEdgeTunnel, "claim", slow_claim)
    mux = await raw_session(edge_env, nursery)
    assert not (await call(mux, proto.StreamType.AUTH, auth(edge_env.token), proto.AuthResp)).error

    async def bind() -> None:
        with pytest.raises(trio.BrokenResourceError):  # the session ends before the answer
            await _bind(mux, [], [])

    nursery.start_soon(bind)
    try:
        with trio.fail_after(5):
            await claiming.wait()
            (session,) = edge_env.edge.sessions
            await mux.aclose()
            await trio.sleep(0.1)  # the session is ending, its Bind handler still claiming
            assert not session.ended.is_set()
            finish.set()
            await session.ended.wait()
    finally:
        finish.set()  # never leave the handler waiting: the edge could not stop
    assert session.tunnels == {}
    assert edge_env.edge.tunnels_by_token == {}
    assert not [h for h in edge_env.edge.routes.hosts.values() if isinstance(h, HttpEdgeTunnel)]
