"""The example outside plugin, ``examples/tunneld-udp``: installed with pip, used through the CLI.

The plugin is installed into a temporary directory (never into the test environment) and put
on ``PYTHONPATH`` of the processes started here, so tunneld finds it through its entry point,
as it would find any third-party plugin.  Its framing, a sans-IO module, is tested on its own.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing

from .test_cli import STARTED_TUNNEL, TUNNELD, EdgeProc, Proc, base_env, logfmt, start_edge

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tunneld-udp"
FRAMING = EXAMPLE / "tunneld_udp" / "_framing.py"


# ---- framing (sans-IO) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def framing() -> ModuleType:
    """The framing module, loaded from its file: the package itself needs tunneld's plugin API."""
    spec = importlib.util.spec_from_file_location("tunneld_udp_framing", FRAMING)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_framing_round_trip_in_any_chunks(framing: ModuleType) -> None:
    datagrams = [b"", b"a", b"hello" * 100, bytes(range(256)) * 200, b"\0" * framing.MAX_DATAGRAM]
    wire = b"".join(framing.encode(d) for d in datagrams)
    assert framing.encode(b"abc") == b"\x00\x03abc"
    for chunk in (1, 2, 3, 1000, len(wire)):
        decoder = framing.Decoder()
        out = []
        for i in range(0, len(wire), chunk):
            out += decoder.feed(wire[i:i + chunk])
        assert out == datagrams, chunk
        assert decoder.pending == 0


def test_framing_partial_datagram_is_pending(framing: ModuleType) -> None:
    decoder = framing.Decoder()
    assert decoder.feed(b"\x00\x05ab") == []
    assert decoder.pending == 4
    assert decoder.feed(b"cde\x00") == [b"abcde"]
    assert decoder.pending == 1


def test_framing_bounds(framing: ModuleType) -> None:
    with pytest.raises(framing.FramingError):
        framing.encode(b"x" * (framing.MAX_DATAGRAM + 1))
    decoder = framing.Decoder()
    # A length no UDP datagram can have: the stream is refused at once, not buffered.
    with pytest.raises(framing.FramingError):
        decoder.feed((framing.MAX_DATAGRAM + 1).to_bytes(2, "big"))
    with pytest.raises(ValueError):  # FramingError is a ValueError
        framing.Decoder().feed(b"\xff\xff")


def test_framing_imports_no_trio() -> None:
    code = (f"import runpy, sys; runpy.run_path({str(FRAMING)!r}); "
            "assert 'trio' not in sys.modules and 'tunneld' not in sys.modules")
    # -I -S: no PYTHONPATH, no site hooks; just the module and the standard library.
    subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True, timeout=30)


def test_the_plugin_imports_only_the_plugin_api_trio_and_the_stdlib() -> None:
    """At run time, that is: annotations may name more (``click.Group``) under TYPE_CHECKING."""
    allowed = {"tunneld.plugin", "trio", *sys.stdlib_module_names}
    for path in sorted(FRAMING.parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                     for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name in allowed or name.split(".")[0] in allowed - {"tunneld"}, (path.name, name)


# ---- edge and agent sides in process (fake contexts, real UDP sockets) --------------------------


@pytest.fixture(scope="module")
def udp() -> Iterator[ModuleType]:
    """The plugin's modules as a package of their own, without its ``__init__``.

    Not ``import tunneld_udp``: that would register the udp tunnel type (and, with its
    directory on sys.path, its entry point) in this process, for every test after this one.
    """
    name = "tunneld_udp_in_process"
    package = ModuleType(name)
    package.__path__ = [str(FRAMING.parent)]
    sys.modules[name] = package
    try:
        for sub in ("_framing", "_edge", "_agent"):
            setattr(package, sub, importlib.import_module(f"{name}.{sub}"))
        yield package
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


class FakeEdge:
    """The bits of an EdgeContext a UDP tunnel uses, recording what it is told."""

    domain = "edge.test"

    def __init__(self) -> None:
        self.stopping = trio.Event()
        self.claims: dict[int, object] = {}
        self.counts: dict[tuple[str, str], float] = {}
        self.lines: list[dict[str, object]] = []
        self.fds = 0

    def port_range(self, transport: str) -> tuple[str, int, int] | None:
        return ("127.0.0.1", 20000, 20010) if transport == "tcp" else None

    def address_available(self, transport: str, port: int, owner: str) -> bool:
        return port not in self.claims

    def claim_address(self, transport: str, port: int, holder: object, owner: str, *,
                      requested: bool = False) -> None:
        assert transport == "udp" and port not in self.claims
        self.claims[port] = holder

    def release_address(self, transport: str, port: int, holder: object) -> None:
        assert self.claims.pop(port) is holder

    def address_name(self, transport: str, port: int) -> tuple[str, str]:
        return transport, str(port)

    def count_listener_fds(self, delta: int) -> None:
        self.fds += delta

    def count(self, metric: str, value: float = 1, **labels: str) -> None:
        key = (metric, labels.get("reason", ""))
        self.counts[key] = self.counts.get(key, 0) + value

    def log_connection(self, **fields: object) -> None:
        self.lines.append(fields)


class FakeSession:
    """A SessionContext whose proxy streams are memory streams; the test plays the agent."""

    owner = "tok"

    def __init__(self, *, stall: bool = False) -> None:
        self.stall = stall
        self.agent_ends: list[trio.abc.HalfCloseableStream] = []

    async def open_stream(self, tunnel_id: str, client_addr: str, proto: str, *,
                          passthrough_tls: bool = False, first: bytes = b"") -> trio.abc.HalfCloseableStream:
        if self.stall:  # an agent that never answers: the flow's queue fills up
            await trio.sleep_forever()
        edge_end, agent_end = trio.testing.memory_stream_pair()
        self.agent_ends.append(agent_end)
        return edge_end


async def _client(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    await sock.connect(("127.0.0.1", port))
    return sock


async def _wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def test_edge_caps_flows_and_drops_when_a_queue_is_full(udp: ModuleType) -> None:
    edge, session = FakeEdge(), FakeSession(stall=True)
    tunnel = udp._edge.UdpEdgeTunnel(edge, session, "tn_1", None, max_flows=2)
    limit = udp._edge.FLOW_QUEUE_DATAGRAMS
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(tunnel.run)
            assert info.proto == "udp" and info.url.startswith("udp://edge.test:")
            port = int(info.url.rsplit(":", 1)[1])
            assert info.name == ("udp", str(port)) and edge.claims == {port: tunnel} and edge.fds == 1
            a, b, c = [await _client(port) for _ in range(3)]
            for i in range(limit + 2):
                await a.send(b"%d" % i)
            await _wait_for(lambda: tunnel.dropped["queue"] == 2)
            await b.send(b"second flow")
            await _wait_for(lambda: len(tunnel.flows) == 2)
            await c.send(b"one flow too many")
            await _wait_for(lambda: tunnel.dropped["flows"] == 1)
            assert len(tunnel.flows) == 2
            assert edge.counts == {(udp._edge.DROPPED, "queue"): 2, (udp._edge.DROPPED, "flows"): 1}
            nursery.cancel_scope.cancel()
    assert edge.claims == {} and edge.fds == 0  # released on the way out
    for s in (a, b, c):
        s.close()


async def test_edge_relays_a_flow_and_closes_it_when_idle(udp: ModuleType) -> None:
    framing = udp._framing
    edge, session = FakeEdge(), FakeSession()
    tunnel = udp._edge.UdpEdgeTunnel(edge, session, "tn_2", None, idle_timeout=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(tunnel.run)
            client = await _client(int(info.url.rsplit(":", 1)[1]))
            await client.send(b"ping")
            await client.send(b"x" * 60_000)
            await _wait_for(lambda: bool(session.agent_ends))
            agent = session.agent_ends[0]
            decoder = framing.Decoder()
            got: list[bytes] = []
            while len(got) < 2:
                got += decoder.feed(await agent.receive_some())
            assert got == [b"ping", b"x" * 60_000]
            await agent.send_all(framing.encode(b"pong"))
            assert await client.recv(65536) == b"pong"
            # Nothing either way for 0.5 s: the edge ends the flow, and the agent sees EOF.
            start = trio.current_time()
            assert await agent.receive_some() == b""
            assert 0.3 < trio.current_time() - start < 2
            await _wait_for(lambda: not tunnel.flows and bool(edge.lines))
            [line] = edge.lines
            assert line["result"] == "ok" and line["proto"] == "udp"
            counts = line["counts"]
            assert (counts.a_to_b, counts.b_to_a) == (60_004, 4)  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()
    client.close()


async def test_edge_port_choice(udp: ModuleType) -> None:
    from tunneld.plugin import TunnelRejected

    edge_mod = udp._edge
    assert edge_mod.requested_port({"Addr": "edge.test:20005"}) == 20005
    assert edge_mod.requested_port({"addr": ":20005"}) == 20005 and edge_mod.requested_port({}) is None
    assert edge_mod.idle_timeout({}) == edge_mod.DEFAULT_IDLE
    assert edge_mod.idle_timeout({"IdleTimeout": 2.5}) == 2.5
    with pytest.raises(TunnelRejected):
        edge_mod.requested_port({"Addr": "edge.test:dns"})
    for bad in (0, 7200, "30", True):
        with pytest.raises(TunnelRejected):
            edge_mod.idle_timeout({"IdleTimeout": bad})
    # Without a UDP range, a port asked for must be in the TCP range (20000-20010 here).
    tunnel = edge_mod.UdpEdgeTunnel(FakeEdge(), FakeSession(), "tn_4", 20011)
    with trio.fail_after(5), pytest.raises(TunnelRejected, match="outside this edge's range"):
        await tunnel.run()
    edge = FakeEdge()
    free = next(p for p in range(20000, 20011) if _udp_port_free(p))
    tunnel = edge_mod.UdpEdgeTunnel(edge, FakeSession(), "tn_5", free)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(tunnel.run)
            assert info.url == f"udp://edge.test:{free}" and edge.claims[free] is tunnel
            nursery.cancel_scope.cancel()


def _udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class FakeTunnel:
    name = "command_line"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream


async def test_agent_relays_to_a_connected_socket(udp: ModuleType) -> None:
    from tunneld.plugin import proto

    framing = udp._framing
    upstream = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await upstream.bind(("127.0.0.1", 0))

    async def echo() -> None:
        while True:
            data, addr = await upstream.recvfrom(65536)
            await upstream.sendto(data[::-1], addr)

    header = proto.ProxyHeader(id="tn_3", client_addr="192.0.2.1:5000", proto="udp")
    with trio.fail_after(10), upstream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            edge_end, agent_end = trio.testing.memory_stream_pair()
            tunnel = FakeTunnel(f"127.0.0.1:{upstream.getsockname()[1]}")
            done = trio.Event()

            async def agent() -> None:
                await udp._agent.relay_flow(tunnel, agent_end, header, 5.0)
                done.set()

            nursery.start_soon(agent)
            await edge_end.send_all(framing.encode(b"abc") + framing.encode(b"") + framing.encode(b"12345"))
            decoder = framing.Decoder()
            got: list[bytes] = []
            while len(got) < 3:
                got += decoder.feed(await edge_end.receive_some())
            assert sorted(got) == [b"", b"54321", b"cba"]
            await edge_end.aclose()  # the edge ends the flow: so does the agent
            await done.wait()
            # And an idle flow ends by itself.
            edge_end, agent_end = trio.testing.memory_stream_pair()
            with trio.fail_after(3):
                await udp._agent.relay_flow(tunnel, agent_end, header, 0.3)
            nursery.cancel_scope.cancel()


# ---- the installed plugin ----------------------------------------------------------------------


def _pip_install(source: Path, target: Path) -> None:
    """``pip install --no-deps --target TARGET SOURCE``, without build isolation when possible.

    setuptools before 70.1 needs the ``wheel`` package to build; without it, pip builds in
    an isolated environment from the configured index.
    """
    args = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
            "--no-input", "--quiet", "--target", str(target)]
    if importlib.util.find_spec("wheel") is not None:
        args.append("--no-build-isolation")
    res = subprocess.run([*args, str(source)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"pip install failed\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed plugin (package and dist-info with its entry point)."""
    tmp = tmp_path_factory.mktemp("udp-plugin")
    # Built from a copy: a build leaves build/ and *.egg-info behind in its source tree.
    source = tmp / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    _pip_install(source, target)
    assert (target / "tunneld_udp" / "__init__.py").is_file()
    [dist] = target.glob("tunneld_udp-*.dist-info")
    assert "tunneld" in (dist / "entry_points.txt").read_text()
    return target


def plugin_env(home: Path, plugin: Path | None) -> dict[str, str]:
    env = base_env(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugin) if plugin else "",
                                                    env.get("PYTHONPATH", "")) if p)
    if plugin is None:
        env.pop("PYTHONPATH", None)
    return env


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELD, *args], capture_output=True, text=True, env=env, timeout=30,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="module")
def udp_edge(procs: list[Proc], plugin_path: Path, tmp_path_factory: pytest.TempPathFactory) -> EdgeProc:
    home = tmp_path_factory.mktemp("udp-edge")
    env = plugin_env(home, plugin_path)

    def start(args: list[str]) -> Proc:
        p = Proc([*TUNNELD, *args], env)
        procs.append(p)
        return p

    edge = start_edge(start, home / "edge-data", "--grace-period", "1", "--log", "stderr")
    edge.env = env
    return edge


@pytest.fixture(scope="module")
def udp_echo() -> Iterator[int]:
    """A UDP echo service on 127.0.0.1 (the tunnel's upstream); yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(0.1)  # closing a socket does not wake a thread blocked on it: poll
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
                sock.sendto(data, addr)
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def exchange(clients: list[socket.socket], port: int, payloads: Callable[[int], list[bytes]],
             timeout: float = 10.0) -> None:
    """Every client sends its payloads to the public port and must get each one back, itself.

    UDP may lose datagrams, even on loopback under load, so what is missing is sent again
    (at most every 0.5 s) until it comes back or ``timeout`` runs out.
    """
    want = {i: set(payloads(i)) for i in range(len(clients))}
    deadline = time.monotonic() + timeout
    while any(want.values()):
        assert time.monotonic() < deadline, f"echoes missing: { {i: len(w) for i, w in want.items()} }"
        for i, client in enumerate(clients):
            for payload in want[i]:
                client.sendto(payload, ("127.0.0.1", port))
        resend_at = time.monotonic() + 0.5
        while any(want.values()) and time.monotonic() < resend_at:
            for i, client in enumerate(clients):
                client.settimeout(0.05)
                try:
                    while True:
                        data = client.recv(65536)
                        # Each echo comes back to the client that sent it.
                        assert data in payloads(i), (i, data[:40])
                        want[i].discard(data)
                except (TimeoutError, BlockingIOError):
                    pass


def test_udp_tunnel_end_to_end(udp_edge: EdgeProc, udp_echo: int, plugin_path: Path, tmp_path: Path,
                               procs: list[Proc]) -> None:
    agent = Proc([*TUNNELD, "udp", str(udp_echo), *udp_edge.agent_flags(), "--web-addr", "false",
                  "--idle-timeout", "1", "--log", "stdout", "--log-format", "logfmt"],
                 plugin_env(tmp_path, plugin_path))
    procs.append(agent)
    try:
        line = agent.wait_line(lambda s: STARTED_TUNNEL in s and "url=" in s, timeout=15)
        url = logfmt(line)["url"]
        m = re.fullmatch(r"udp://([^:]+):(\d+)", url)
        assert m, url
        port = int(m.group(2))
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
        try:
            for c in clients:
                c.bind(("127.0.0.1", 0))
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

            def payloads(i: int) -> list[bytes]:
                small = [f"client {i} datagram {n}".encode() for n in range(5)]
                return small + [bytes([65 + i]) * 60_000] if i == 0 else small

            exchange(clients, port, payloads)
            # Idle for 1 s, each flow is closed: the edge writes its access line.
            flows = udp_edge.proc.wait_lines(lambda s: "proto=udp" in s and "result=ok" in s, 4,
                                             timeout=5, stream="err")
            assert {re.search(r"client=(\S+)", s).group(1) for s in flows} == {  # type: ignore[union-attr]
                f"127.0.0.1:{c.getsockname()[1]}" for c in clients}
            # A client that speaks again gets a new flow.
            exchange(clients[:1], port, lambda i: [b"after the idle timeout"])
        finally:
            for c in clients:
                c.close()
    finally:
        agent.stop()


def test_udp_tunnel_from_the_config_file(udp_edge: EdgeProc, udp_echo: int, plugin_path: Path,
                                        tmp_path: Path, procs: list[Proc]) -> None:
    """``tunneld start`` with the type's keys: the public port asked for (in the edge's range) is used."""
    wanted = udp_edge.tcp[1]  # no UDP range on this edge: requests must lie in its TCP range
    cfg = tmp_path / "tunneld.yml"
    cfg.write_text(f'version: "2"\ntunnels:\n  dns:\n    proto: udp\n    addr: 127.0.0.1:{udp_echo}\n'
                   f'    udp_idle_timeout: 5\n    remote_addr: ":{wanted}"\n')
    agent = Proc([*TUNNELD, "start", "dns", "--config", str(cfg), *udp_edge.agent_flags(), "--web-addr",
                  "false", "--log", "stdout", "--log-format", "logfmt"], plugin_env(tmp_path, plugin_path))
    procs.append(agent)
    try:
        line = agent.wait_line(lambda s: STARTED_TUNNEL in s and "url=" in s, timeout=15)
        assert logfmt(line)["url"].endswith(f":{wanted}") and logfmt(line)["name"] == "dns"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            exchange([client], wanted, lambda i: [b"from the config file"])
    finally:
        agent.stop()


def test_udp_command_help(plugin_path: Path, tmp_path: Path) -> None:
    res = run("udp", "--help", env=plugin_env(tmp_path, plugin_path))
    assert res.returncode == 0, res.stderr
    assert "--idle-timeout" in res.stdout and "--remote-addr" in res.stdout
    assert "tunneld udp 5353" in res.stdout  # the example in the command's help


def test_config_check_knows_the_udp_key(plugin_path: Path, tmp_path: Path) -> None:
    env = plugin_env(tmp_path, plugin_path)
    good = tmp_path / "good.yml"
    good.write_text('version: "2"\ntunnels:\n  dns:\n    proto: udp\n    addr: 5353\n'
                    "    udp_idle_timeout: 30\n")
    res = run("config", "check", "--config", str(good), env=env)
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text('version: "2"\ntunnels:\n  dns:\n    proto: udp\n    addr: 5353\n'
                   "    udp_idle_timeout: forever\n")
    res = run("config", "check", "--config", str(bad), env=env)
    assert res.returncode != 0
    assert "line 6" in res.stderr and "tunnels.dns.udp_idle_timeout" in res.stderr, res.stderr


def test_without_the_plugin_udp_is_refused(tmp_path: Path) -> None:
    env = plugin_env(tmp_path, None)
    cfg = tmp_path / "udp.yml"
    cfg.write_text('version: "2"\ntunnels:\n  dns:\n    proto: udp\n    addr: 5353\n')
    res = run("config", "check", "--config", str(cfg), env=env)
    assert res.returncode != 0 and "udp" in res.stderr, (res.stdout, res.stderr)
    res = run("udp", "--help", env=env)
    assert res.returncode != 0
