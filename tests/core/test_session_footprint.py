"""What an idle agent session keeps on the edge (issue 17: ≤ 50 KB per idle session).

The figure itself is measured by ``bench/many_agents.py``; these tests pin the structure behind
it, which a refactoring could silently undo: which tasks and nurseries a session holds, and that
nothing keeps finished tasks alive.
"""

from __future__ import annotations

import gc

import trio
import trio.testing

from tunneld.core import TunnelConfig
from tunneld.core._edge import AgentSession

from ..conftest import EdgeEnv


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


async def test_an_idle_session_is_one_reader_one_writer_and_its_tunnel(edge_env: EdgeEnv) -> None:
    session = await _idle_session(edge_env)
    nursery = session._nursery
    assert nursery is not None
    # The reader is the session's own task (no accept loop, no separate mux task) and the
    # session nursery is its only nursery (no carrier nursery for a TLS carrier).
    reader = nursery.parent_task
    assert reader.child_nurseries == [nursery]
    assert sorted(map(_short, nursery.child_tasks)) == ["_run_tunnel", "_writer_task"]
    # Nothing queued or waited on besides: no accept queue, no parking lots.
    mux = session.mux
    assert mux._accept_send is None
    assert (mux._outbox_space, mux._flushed, mux._stream_gone) == (None, None, None)
    assert session._heartbeat is not None and session._heartbeat._chunks is None


async def test_an_idle_session_keeps_no_finished_task_alive(edge_env: EdgeEnv) -> None:
    """The Auth and Bind handlers, and Nursery.start's nursery around the tunnel's start, are
    garbage once they are done (trio's task status, kept by a tunnel's run, held them)."""
    await _idle_session(edge_env)
    gc.collect()
    finished = [o for o in gc.get_objects()
                if type(o) is trio.lowlevel.Task and o.coro.cr_frame is None
                and o.name.startswith("tunneld.core._edge.")]
    assert finished == []
