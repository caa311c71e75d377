"""Remote stop/restart through the admin API (``POST /tunnel_sessions/{id}/…``), real processes.

An edge process with ``--api-addr``, agent processes (``python -m tunneld http …``); the
edge sends Stop/Restart on the agent's session, the agent obeys or refuses.  Remote update
is in ``test_update.py`` (it needs wheels and a throwaway venv).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tunneld.core import Agent
from tunneld.core._remote import (
    Op,
    RemoteCode,
    RemoteCommandError,
    RemoteCommandReceived,
    remote_restart,
    remote_stop,
    remote_update,
)

from .test_cli import (  # noqa: F401 - fixtures are used by name
    STARTED_TUNNEL,
    TUNNELD,
    EdgeProc,
    Proc,
    base_env,
    curl,
    free_port,
    http_upstream,
    logfmt,
    procs,
    run_cli,
    spawn,
    start_edge,
    started_urls,
)


@attrs.define
class ApiEdge:
    edge: EdgeProc
    url: str
    key: str
    #: The agents' default config file.
    config: Path

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, key: str | None = None,
             timeout: float = 40) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def sessions(self) -> list[dict[str, Any]]:
        status, body = self.call("GET", "/tunnel_sessions")
        assert status == 200, body
        return list(body["tunnel_sessions"])

    def agent_flags(self, config: Path | None = None) -> list[str]:
        """Agent flags: this edge, logfmt logs on stdout, and a config file (by default one with
        ``update_check: false``: no test asks a package index)."""
        return [*self.edge.agent_flags(), "--log", "stdout", "--log-format", "logfmt", "--web-addr", "false",
                "--config", str(config or self.config)]


def make_api_edge(start: Callable[[list[str]], Proc], home: Path) -> ApiEdge:
    """An edge process with its admin API on, and an API key of the default account."""
    api_port = free_port()
    edge = start_edge(start, home / "edge", "--grace-period", "1", "--api-addr", f"127.0.0.1:{api_port}")
    res = run_cli("edge", "api-key", "create", "--data-dir", str(edge.data_dir), env=base_env(home))
    assert res.returncode == 0, res.stderr
    config = home / "agent.yml"
    config.write_text('version: "2"\nupdate_check: false\n')
    return ApiEdge(edge, f"http://127.0.0.1:{api_port}", res.stdout.strip(), config)


@pytest.fixture(scope="module")
def api_edge(procs: list[Proc], tmp_path_factory: pytest.TempPathFactory) -> ApiEdge:
    home = tmp_path_factory.mktemp("api-edge")
    env = base_env(home)

    def start(args: list[str]) -> Proc:
        p = Proc([*TUNNELD, *args], env)
        procs.append(p)
        return p

    return make_api_edge(start, home)


def wait_count(proc: Proc, pred: Callable[[str], bool], count: int, timeout: float) -> list[str]:
    """The first ``count`` lines of stdout satisfying ``pred`` (identical lines counted too)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in list(proc.lines["out"]) if pred(line)]
        if len(found) >= count:
            return found[:count]
        assert time.monotonic() < deadline, f"{count} lines not seen in {timeout}s\n{proc.describe()}"
        assert proc.popen.poll() is None, proc.describe()
        time.sleep(0.05)


def session_of(api: ApiEdge, agent: Proc) -> str:
    """The session id the agent logged (``client session established``)."""
    line = agent.wait_line(lambda line: "client session established" in line, timeout=15)
    sid = logfmt(line)["id"]
    assert sid in {s["id"] for s in api.sessions()}
    return sid


def test_remote_stop(api_edge: ApiEdge, spawn: Callable[..., Proc], http_upstream: int) -> None:
    agent = spawn("http", str(http_upstream), "--scheme", "http", *api_edge.agent_flags())
    url = next(iter(started_urls(agent, 1).values()))
    sid = session_of(api_edge, agent)
    # Not found: an unknown id, a malformed one, another account's key.
    assert api_edge.call("POST", "/tunnel_sessions/0123abcd/stop")[0] == 404
    assert api_edge.call("POST", "/tunnel_sessions/..%2Fx/stop")[0] == 404
    other = run_cli("edge", "api-key", "create", "--data-dir", str(api_edge.edge.data_dir), "--account",
                    "other", env=base_env(api_edge.edge.data_dir.parent))
    assert other.returncode == 0, other.stderr
    status, body = api_edge.call("POST", f"/tunnel_sessions/{sid}/stop", key=other.stdout.strip())
    assert status == 404 and body["error_code"] == "ERR_TUNNELD_4404", body
    # Bad bodies: unknown fields, a version for stop.
    assert api_edge.call("POST", f"/tunnel_sessions/{sid}/stop", {"version": "1"})[0] == 400
    assert api_edge.call("POST", f"/tunnel_sessions/{sid}/update", {"version": 1})[0] == 400
    assert api_edge.call("POST", f"/tunnel_sessions/{sid}/update", {"permit_major_version": "y"})[0] == 400
    assert agent.popen.poll() is None

    status, body = api_edge.call("POST", f"/tunnel_sessions/{sid}/stop", {})
    assert status == 204, body
    assert agent.wait_exit(15) == 0, agent.describe()
    assert any("remote stop" in line for line in agent.lines["out"]), agent.describe()
    assert "stopped by the edge (remote stop)" in agent.err
    assert sid not in {s["id"] for s in api_edge.sessions()}
    # A remote stop is a clean exit: the name is released at once, another agent may take it.
    sub = url.split("//", 1)[1].split(".", 1)[0]
    again = spawn("http", str(http_upstream), "--scheme", "http", "--subdomain", sub, *api_edge.agent_flags())
    assert next(iter(started_urls(again, 1).values())) == url


def test_remote_restart_same_url(api_edge: ApiEdge, spawn: Callable[..., Proc], http_upstream: int) -> None:
    agent = spawn("http", str(http_upstream), "--scheme", "http", *api_edge.agent_flags())
    url = next(iter(started_urls(agent, 1).values()))
    sid = session_of(api_edge, agent)
    pid = agent.popen.pid
    status, body = api_edge.call("POST", f"/tunnel_sessions/{sid}/restart")
    assert status == 204, body
    # The same process (execve keeps the pid) announces the same URL again, and serves it.
    lines = wait_count(agent, lambda line: STARTED_TUNNEL in line and "url=" in line, 2, timeout=20)
    assert [logfmt(line)["url"] for line in lines] == [url, url], agent.describe()
    assert agent.popen.poll() is None and agent.popen.pid == pid
    assert "restarting (remote restart)" in agent.err
    assert any("resuming session" in line for line in agent.lines["out"]), agent.describe()
    assert "hello from upstream /after" in curl(url + "/after")
    # The restarted process resumed the old session (the edge lists it under the same id).
    assert sid in {s["id"] for s in api_edge.sessions()}


def test_remote_management_false_refuses(api_edge: ApiEdge, spawn: Callable[..., Proc], http_upstream: int,
                                         tmp_path: Path) -> None:
    config = tmp_path / "agent.yml"
    config.write_text('version: "2"\nremote_management: false\nupdate_check: false\n')
    agent = spawn("http", str(http_upstream), "--scheme", "http", *api_edge.agent_flags(config))
    url = next(iter(started_urls(agent, 1).values()))
    sid = session_of(api_edge, agent)
    for op, code in (("stop", 805), ("restart", 804), ("update", 806)):
        status, body = api_edge.call("POST", f"/tunnel_sessions/{sid}/{op}")
        assert status == 400, body
        assert body["error_code"] == f"ERR_TUNNELD_{code}" and "remote_management: false" in body["msg"], body
        assert body["details"]["operation"] == op
    # ... and the CLI says the same, with a non-zero exit.
    env = {**base_env(tmp_path), "TUNNELD_API_URL": api_edge.url, "TUNNELD_API_KEY": api_edge.key}
    res = run_cli("api", "tunnel-sessions", "stop", sid, env=env)
    assert res.returncode == 1, res.stderr
    assert "remote_management: false" in res.stderr and "ERR_TUNNELD_805" in res.stderr
    assert agent.popen.poll() is None
    assert "hello from upstream /still" in curl(url + "/still")
    assert any("remote stop refused" in line for line in agent.lines["out"]), agent.describe()


def test_api_cli_stop(api_edge: ApiEdge, spawn: Callable[..., Proc], http_upstream: int,
                      tmp_path: Path) -> None:
    agent = spawn("http", str(http_upstream), "--scheme", "http", *api_edge.agent_flags())
    started_urls(agent, 1)
    sid = session_of(api_edge, agent)
    env = {**base_env(tmp_path), "TUNNELD_API_URL": api_edge.url, "TUNNELD_API_KEY": api_edge.key}
    res = run_cli("api", "tunnel-sessions", "stop", "nosuchsession", env=env)
    assert res.returncode == 1 and "ERR_TUNNELD_4404" in res.stderr
    res = run_cli("api", "tunnel-sessions", "stop", sid, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and "accepted the stop" in res.stderr
    assert agent.wait_exit(15) == 0


def test_openapi_lists_the_commands(api_edge: ApiEdge) -> None:
    status, doc = api_edge.call("GET", "/openapi.json")
    assert status == 200
    for op in ("stop", "restart", "update"):
        post = doc["paths"][f"/tunnel_sessions/{{id}}/{op}"]["post"]
        assert "204" in post["responses"] and post["operationId"] == f"tunnel_sessions_{op}"


# ---- in process: the protocol exchange itself ------------------------------------------------------


async def test_remote_commands_in_process(edge_env: Any) -> None:
    """An embedded Agent obeys only the commands its program implements; the edge's functions
    report refusals with ngrok's codes and hand an accepted command to the program."""
    def session_of_agent(agent: Agent) -> Any:
        return next(s for s in edge_env.edge.sessions if s.client_id == agent.client_id)

    with trio.fail_after(20):
        # A library user's agent implements nothing: each command is refused, it keeps running.
        plain = await edge_env.start_agent()
        session = session_of_agent(plain)
        assert session.auth.extra.stop_unsupported_error  # declared in Auth
        for call, code in ((remote_stop, RemoteCode.STOP_UNSUPPORTED),
                           (remote_restart, RemoteCode.RESTART_UNSUPPORTED),
                           (remote_update, RemoteCode.UPDATE_UNSUPPORTED)):
            with pytest.raises(RemoteCommandError) as info:
                await call(session)
            assert info.value.code == code and info.value.unsupported
            assert "does not implement" in str(info.value)
        assert plain.online.is_set()

        # One that implements stop: run() ends with RemoteCommandReceived(STOP) for its program.
        agent = Agent(edge_env.agent_config(), [])
        agent.remote_ops = frozenset({Op.STOP})
        outcome: list[BaseException] = []

        async def run_agent(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await agent.run(task_status=task_status)
            except BaseExceptionGroup as group:
                outcome.extend(group.exceptions)

        await edge_env.nursery.start(run_agent)
        assert session_of_agent(agent).auth.extra.stop_unsupported_error == ""
        await remote_stop(session_of_agent(agent))
        while not outcome:
            await trio.sleep(0.01)
        leaf: BaseException = outcome[0]
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, RemoteCommandReceived) and leaf.op is Op.STOP

        # A client too old to know the commands (null fields) is never sent one.
        session.auth.extra.restart_unsupported_error = None
        with pytest.raises(RemoteCommandError, match="predates") as old:
            await remote_restart(session)
        assert not old.value.answered


async def test_accepted_command_survives_the_session_ending_at_once(nursery: trio.Nursery,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The link may end the moment the agent accepts a command (the edge closes it on the
    agent's GOAWAY): the command must still reach the program, not turn into a reconnect."""
    from tunneld.core import AgentConfig, proto

    from .core.test_mux import session_pair

    agent_side, edge_side = await session_pair(nursery)
    agent = Agent(AgentConfig(), [])
    session: trio.CancelScope | None = None

    async def accepted_as_the_link_ends(self: Agent, stream: Any, op: Op) -> None:
        # What the accept loop does when the session ends: cancel the session's nursery.
        assert session is not None
        session.cancel()
        raise RemoteCommandReceived(op)

    monkeypatch.setattr(Agent, "_remote_command", accepted_as_the_link_ends)
    await edge_side.open_stream(proto.encode_stream_type(Op.RESTART.stream_type))
    stream = await agent_side.accept_stream()
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as handlers:
            session = handlers.cancel_scope
            handlers.start_soon(agent._handle_stream, stream)
    [received] = info.value.exceptions
    assert isinstance(received, RemoteCommandReceived) and received.op is Op.RESTART
