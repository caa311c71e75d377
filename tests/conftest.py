"""Shared fixtures: a real edge and agents on loopback, in-process (trio)."""

from __future__ import annotations

import ctypes
import importlib
import random
import shutil
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from tunneld.core import Agent, AgentConfig, Edge, EdgeConfig, EdgeInfo, TunnelConfig
from tunneld.core._certs import ensure_dev_certs
from tunneld.core._store import Store

DOMAIN = "tunneld.test"


@attrs.define
class EdgeEnv:
    edge: Edge
    info: EdgeInfo
    store: Store
    token: str
    ca: Path
    data_dir: Path
    nursery: trio.Nursery
    #: How agents reach the edge: "tls" (muxado over TLS) or "websocket" (wss://).
    carrier: str = "tls"

    @property
    def agent_addr(self) -> str:
        if self.carrier == "websocket":
            return f"wss://127.0.0.1:{self.info.ports['agent']}/tunneld"
        return f"127.0.0.1:{self.info.ports['agent']}"

    @property
    def http_port(self) -> int:
        return self.info.ports["http"]

    @property
    def https_port(self) -> int:
        return self.info.ports["https"]

    def agent_config(self, **kw: object) -> AgentConfig:
        values: dict[str, object] = {"authtoken": self.token, "server_addr": self.agent_addr,
                                     "root_cas": str(self.ca), "web_addr": None}
        values.update(kw)
        return AgentConfig(**values)  # type: ignore[arg-type]

    async def start_agent(self, *tunnels: TunnelConfig, **kw: object) -> Agent:
        """Start an agent in the test nursery; returns once every tunnel is bound."""
        agent = Agent(self.agent_config(**kw), list(tunnels))
        await self.nursery.start(agent.run)
        return agent


def make_edge_config(tmp: Path, **kw: object) -> EdgeConfig:
    certs = ensure_dev_certs(tmp, DOMAIN, ["127.0.0.1", "localhost"])
    low = random.randrange(30000, 60000, 200)
    values: dict[str, object] = dict(data_dir=tmp, domain=DOMAIN, tls_cert=certs.cert, tls_key=certs.key,
                                     agent_addr=("127.0.0.1", 0), http_addr=("127.0.0.1", 0),
                                     https_addr=("127.0.0.1", 0), tcp_host="127.0.0.1",
                                     tcp_ports=(low, low + 199), grace_period=1.0)
    values.update(kw)
    return EdgeConfig(**values)  # type: ignore[arg-type]


def sqlite_memory_used() -> Callable[[], int] | None:
    """SQLite's own count of the memory it holds, read from the very library ``sqlite3`` loaded
    (None where that is not a shared library found in ``/proc/self/maps``)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = [line.split()[-1] for line in maps.splitlines() if "/libsqlite3" in line]
    if not paths:
        return None
    lib = ctypes.CDLL(paths[0])
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lambda: int(lib.sqlite3_memory_used())


def rss_kib(pid: int | str = "self") -> int:
    """A process's resident set in KiB (``VmRSS`` in ``/proc/PID/status``; Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``carriers`` run once per agent carrier (TLS, WebSocket)."""
    if "edge_env" in metafunc.fixturenames and metafunc.definition.get_closest_marker("carriers"):
        metafunc.parametrize("edge_env", ["tls", "websocket"], indirect=True)


def require_compiled(module: str, what: str = "the compiled fast path") -> None:
    """Skip unless the optional compiled extension ``module`` is built (see setup.py).

    It is missing only where no C compiler was found at install time, and then tunneld does
    not use it either.  With a compiler at hand a missing build fails instead: a skip there
    would leave the compiled code untested.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail(f"{module} is not built: run `python3 -m pip install -e .`", pytrace=False)
        pytest.skip(f"{what} is not built here (no C compiler at install time)", allow_module_level=True)


def require_compiled_parser() -> None:
    """Skip unless the compiled head-parser fast path (``tunneld/http1/_speedups.c``) is built."""
    require_compiled("tunneld.http1._speedups")


@pytest.fixture(scope="module", params=["compiled", "python"])
def both_head_parsers(request: pytest.FixtureRequest) -> object:
    """Run a module's tests with the compiled head-parser fast path and without it.

    Module-scoped (hypothesis refuses function-scoped fixtures around ``@given`` tests).
    """
    from tunneld.http1 import _wire

    with pytest.MonkeyPatch.context() as mp:
        if request.param == "python":
            mp.setattr(_wire, "_scan_request", None)
            mp.setattr(_wire, "_scan_response", None)
        else:
            require_compiled_parser()
        yield request.param


@pytest.fixture
async def edge_env(request: pytest.FixtureRequest, tmp_path: Path,
                   nursery: trio.Nursery) -> AsyncIterator[EdgeEnv]:
    config = make_edge_config(tmp_path)
    store = Store.open(tmp_path)
    _rec, token = store.create_token("test")
    edge = Edge(config, store)
    async with trio.open_nursery() as edge_nursery:
        info = await edge_nursery.start(edge.serve)
        yield EdgeEnv(edge, info, store, token, tmp_path / "ca.pem", tmp_path, nursery,
                      getattr(request, "param", "tls"))
        edge_nursery.cancel_scope.cancel()
    # Only now: the edge writes name holds to the store as its tunnels end.
    store.close()


async def start_echo_server(nursery: trio.Nursery) -> int:
    """A TCP echo server honouring half-close; returns its port."""

    async def echo(stream: trio.SocketStream) -> None:
        async for chunk in stream:
            await stream.send_all(chunk)
        await stream.send_eof()

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    return int(listeners[0].socket.getsockname()[1])


async def start_hello_upstream(nursery: trio.Nursery) -> int:
    """An HTTP/1.1 server answering every request with ``hello <Host>`` and closing; its port."""
    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some()
            if not data:
                return
            buf += data
        host = [line for line in buf.split(b"\r\n") if line.lower().startswith(b"host:")][0][5:].strip()
        body = b"hello " + host
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])
