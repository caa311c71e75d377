"""Edge limits from the security review (issue 11): descriptors, accept errors, expired name holds."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tunneld.core import Agent, AgentConfig, MuxSession, TunnelConfig, proto
from tunneld.core._names import NameClaims
from tunneld.core._rpc import call
from tunneld.core._store import Store
from tunneld.core._tls import client_context, open_tls_client
from tunneld.core._util import ThrottledLog, accept_loop

from ..conftest import EdgeEnv, start_hello_upstream
from ..test_cli import TUNNELD, EdgeProc, Proc, base_env, start_edge

# ---- descriptors ---------------------------------------------------------------------------------

#: The edge's RLIMIT_NOFILE (soft and hard, so raising it to the hard limit changes nothing).
NOFILE = 256
_LIMITED = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n})); "
            "sys.argv[0] = 'tunneld'; runpy.run_module('tunneld', run_name='__main__', alter_sys=True)")


@pytest.fixture
def small_edge(tmp_path: Path) -> Iterator[EdgeProc]:
    env = base_env(tmp_path)
    started: list[Proc] = []

    def start(args: list[str]) -> Proc:
        p = Proc([sys.executable, "-c", _LIMITED.format(n=NOFILE), *args], env)
        started.append(p)
        return p

    try:
        yield start_edge(start, tmp_path / "edge-data", "--grace-period", "1")
    finally:
        for p in started:
            p.stop()


async def _http_get(port: int, host: str) -> bytes:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            got = b""
            while data := await stream.receive_some():
                got += data
            return got


async def _hold_agent_session(edge: EdgeProc, nursery: trio.Nursery, outcome: dict[str, int],
                              done: trio.Event) -> None:
    """One protocol-level agent session, held open until ``done``; its fate counted in ``outcome``."""
    try:
        with trio.fail_after(20):
            tls = await open_tls_client("127.0.0.1", edge.agent, client_context(edge.ca))
            mux = MuxSession(tls, client=True)
            await nursery.start(mux.run)
            auth = proto.Auth(version=["2"], extra=proto.AuthExtra(authtoken=edge.token))
            resp = await call(mux, proto.StreamType.AUTH, auth, proto.AuthResp)
        assert not resp.error
        outcome["authenticated"] += 1
    except trio.BrokenResourceError as exc:
        # Refused politely (a GOAWAY saying why), or reset at accept (no TLS at all).
        outcome["refused with reason" if "agent sessions" in str(exc) else "reset"] += 1
        return
    except (OSError, trio.TooSlowError):
        outcome["reset"] += 1
        return
    await done.wait()
    await mux.aclose()


async def test_agent_crowd_cannot_take_public_descriptors(small_edge: EdgeProc,
                                                          nursery: trio.Nursery) -> None:
    """Before: at a limit of 1,024, 1,008 agent sessions came up and then 0 of 20 public requests
    to working tunnels succeeded, with thousands of EMFILE tracebacks in the log."""
    edge = small_edge
    edge.proc.wait_line(lambda line: "file descriptor limit" in line, timeout=5)
    assert f"file descriptor limit {NOFILE}:" in edge.proc.out
    web = await start_hello_upstream(nursery)
    config = AgentConfig(authtoken=edge.token, server_addr=f"127.0.0.1:{edge.agent}", root_cas=str(edge.ca),
                         web_addr=None)
    agent = Agent(config, [TunnelConfig("w", "http", str(web), schemes=["http"])])
    with trio.fail_after(15):
        await nursery.start(agent.run)
    host = agent.tunnels[0].public_url.split("://", 1)[1]

    outcome = {"authenticated": 0, "refused with reason": 0, "reset": 0}
    done = trio.Event()
    crowd = NOFILE + 100
    async with trio.open_nursery() as sessions:
        for i in range(crowd):
            sessions.start_soon(_hold_agent_session, edge, nursery, outcome, done)
            if i % 20 == 19:
                await trio.sleep(0.05)
        with trio.fail_after(30):
            while sum(outcome.values()) < crowd:
                await trio.sleep(0.05)
        # Every descriptor the agent port may have is in use: public traffic still flows.
        answers = [await _http_get(edge.http, host) for _ in range(20)]
        done.set()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers[0][:200]
    max_sessions = NOFILE // 3
    assert 0 < outcome["authenticated"] <= max_sessions, outcome
    # The rest were told why (GOAWAY) or, beyond what the agent port may hold, reset at once.
    assert outcome["refused with reason"] + outcome["reset"] >= crowd - max_sessions, outcome
    assert "Traceback" not in edge.proc.err, edge.proc.err[-3000:]
    assert "EMFILE" not in edge.proc.err and "Too many open files" not in edge.proc.err, edge.proc.err[-3000:]
    # The crowd's refusals are summed up, not logged one by one.
    assert edge.proc.err.count("refusing new ones") <= 4, edge.proc.err[-3000:]


def test_edge_help_lists_the_limit_flags(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([*TUNNELD, "edge", "--help"], capture_output=True, text=True, env=base_env(tmp_path),
                         timeout=30).stdout
    for flag in ("--max-sessions", "--max-sessions-per-token", "--max-tunnels-per-token", "--hold-period",
                 "--grace-period", "--reserved-names", "--allow-hostname", "--cname-target"):
        assert flag in out


# ---- accept errors -------------------------------------------------------------------------------


class _FailingListener(trio.abc.Listener[trio.SocketStream]):
    """accept() fails with EMFILE ``failures`` times, then hangs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.closed = False

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        self.closed = True


async def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture,
                                                          autojump_clock: trio.abc.Clock) -> None:
    logger = logging.getLogger("tunneld.test.accept")
    errors = ThrottledLog(logger, interval=10.0, clock=trio.current_time)
    listener = _FailingListener(failures=250)  # 25 s of EMFILE at one retry per 0.1 s
    with caplog.at_level(logging.WARNING, logger="tunneld.test.accept"):
        with trio.move_on_after(60):
            await accept_loop(listener, lambda stream: None, errors)  # type: ignore[arg-type]
    assert listener.calls == 251 and listener.closed
    lines = [r for r in caplog.records if r.name == "tunneld.test.accept"]
    assert 2 <= len(lines) <= 4, [r.getMessage() for r in lines]
    assert all(r.exc_info is None for r in lines)
    assert "Too many open files" in lines[0].getMessage()
    assert "times in the last 10s" in lines[-1].getMessage()


# ---- expired name holds ----------------------------------------------------------------------------


async def test_expired_holds_are_swept_from_memory_and_store(tmp_path: Path) -> None:
    """Before: 20,000 one-off names left 20,200 expired rows and +17 MB; a hold went only when
    its very name was looked up again."""
    now = [1000.0]
    store = Store.open(tmp_path, clock=lambda: now[0])
    swept: list[int] = []
    claims = NameClaims(store, hold_period=5, clock=lambda: now[0], sweep_interval=0.05,
                        on_swept=swept.append)
    holders = [object() for _ in range(200)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claims.run)
        for i, holder in enumerate(holders):
            claims.acquire("host", f"n{i}.example", f"owner{i % 7}", holder)
        claims.acquire("port", "20001", "keeper", "live-holder")
        await trio.sleep(0.1)
        for i, holder in enumerate(holders):
            claims.release("host", f"n{i}.example", holder)
        # A row left behind by someone else (another process, an older release).
        store.save_names([("host", "stray.example", "x", now[0] - 1)], [])
        await trio.sleep(0.2)
        names = {n for _, n, _, _ in store.all_names()}
        assert len(names) == 201 and "stray.example" not in names  # 200 held, 1 live; the stray swept
        now[0] += 6  # the holds end
        with trio.fail_after(5):
            while len(store.all_names()) > 1:
                await trio.sleep(0.02)
        assert len(claims._claims) == 1
        assert store.all_names() == [("port", "20001", "keeper", -1.0)]
        assert sum(swept) == 200  # the edge is told (it reclaims their memory as for ended sessions)
        nursery.cancel_scope.cancel()
    store.close()


async def test_written_names_are_not_kept_by_the_writer(tmp_path: Path) -> None:
    """Once the swept names are in the store, nothing keeps them: the writer's last batch held
    every name of a crowd of agents that left, scattered over the memory of their sessions."""
    now = [1000.0]
    store = Store.open(tmp_path, clock=lambda: now[0])
    claims = NameClaims(store, hold_period=5, clock=lambda: now[0], sweep_interval=0.05)
    names = ["".join(("gone", str(i), ".example")) for i in range(50)]  # made here: not interned
    baseline = [sys.getrefcount(name) for name in names]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claims.run)
        for name in names:
            claims.acquire("host", name, "owner", name)
            claims.release("host", name, name)
        del name
        now[0] += 6  # the holds end; the sweeper drops them, the writer deletes their rows
        with trio.fail_after(5):
            while store.all_names() or claims._claims:
                await trio.sleep(0.02)
        await trio.sleep(0.1)  # the writer is waiting for the next change
        assert [sys.getrefcount(name) for name in names] == baseline
        nursery.cancel_scope.cancel()
    store.close()


def test_sweep_keeps_live_and_unexpired_holds() -> None:
    now = [0.0]
    claims = NameClaims(None, hold_period=10, clock=lambda: now[0])
    claims.acquire("host", "a", "o", "h1")
    claims.acquire("host", "b", "o", "h2")
    claims.acquire("host", "c", "o", "h3")
    claims.release("host", "b", "h2")
    now[0] = 5
    claims.release("host", "c", "h3")
    now[0] = 12
    assert claims.sweep() == 1  # b ended at 10; c holds until 15; a is live
    assert claims.owner_of("host", "a") == "o" and claims.owner_of("host", "c") == "o"
    assert claims.owner_of("host", "b") is None
    now[0] = 16
    assert claims.sweep() == 1
    assert claims.sweep() == 0


# ---- --max-sessions ---------------------------------------------------------------------------------


async def test_sessions_beyond_max_sessions_are_told_why(edge_env: EdgeEnv, nursery: trio.Nursery,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    edge_env.edge.config.max_sessions = 2
    auth = proto.Auth(version=["2"], extra=proto.AuthExtra(authtoken=edge_env.token))
    held = []
    for _ in range(2):
        tls = await open_tls_client("127.0.0.1", edge_env.info.ports["agent"], client_context(edge_env.ca))
        mux = MuxSession(tls, client=True)
        await nursery.start(mux.run)
        assert not (await call(mux, proto.StreamType.AUTH, auth, proto.AuthResp)).error
        held.append(mux)
    # A real agent is refused with a reason it prints, and keeps retrying.
    agent = Agent(edge_env.agent_config(), [TunnelConfig("t", "tcp", "1")])
    with caplog.at_level(logging.WARNING, logger="tunneld.agent"):
        async with trio.open_nursery() as inner:
            inner.start_soon(agent.run)
            with trio.fail_after(10):
                while not any("at its limit of 2 agent sessions" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.05)
            # A place frees up: the agent gets in on a later attempt.
            await held.pop().aclose()
            with trio.fail_after(10):
                await agent.online.wait()
            inner.cancel_scope.cancel()
    for mux in held:
        await mux.aclose()


async def test_descriptor_budgets(edge_env: EdgeEnv) -> None:
    edge = edge_env.edge
    edge.fd_limit = 1024
    assert edge.max_sessions == 1024 // 3
    agents = edge.pool_limit("agent")
    public = edge.pool_limit("public")
    assert agents == 341 + 16 and public == 1024 - 64 - agents
    # Public pools share one budget; the agent port's share is its own.
    edge.open_connections["ssh"] = 100
    assert edge.pool_limit("public") == public - 100 and edge.pool_limit("ssh") == public
    edge.open_connections["agent"] += 50
    assert edge.pool_limit("public") == public - 100
    edge.listener_fds += 10  # TCP tunnels' listeners
    assert edge.pool_limit("public") == public - 110
    edge.config.max_sessions = 10
    assert edge.pool_limit("agent") == 26
    del edge.open_connections["ssh"]
    edge.open_connections["agent"] -= 50
    edge.listener_fds -= 10
