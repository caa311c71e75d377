"""The plugin API (``tunneld.plugin``): its import graph, the layering of plugins, and the contexts.

The import graph is read from the source (``ast``), not from ``sys.modules``: every import
statement counts, ``if TYPE_CHECKING:`` ones and those inside functions too, and so do the
``_EXPORTS`` tables of the lazy facades (PEP 562 re-exports).  An edge ``a → b`` means that
``a`` names module ``b``: ``from pkg import name`` depends on ``pkg.name`` when that is a
module, else on ``pkg``'s ``__init__``.  Importing ``pkg.mod`` also runs ``pkg/__init__.py``,
but that is not counted as ``pkg.mod → pkg``: the facades (``tunneld``, ``tunneld.core``) import
nothing of ours at run time (checked below), and a plugin package's ``__init__`` importing its
own modules is no cycle worth the name.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import trio

import tunneld
from tunneld import plugin
from tunneld.core import Edge, TunnelConfig, TunnelRejected
from tunneld.core._agent import AgentTunnelAdapter
from tunneld.core._edge import AgentSession, EdgeAdapter
from tunneld.core._store import Store

from .conftest import EdgeEnv, make_edge_config, start_echo_server

ROOT = Path(tunneld.__file__).parent

#: Public modules a plugin may import (besides its own package, the stdlib and third parties).
PUBLIC = frozenset({"tunneld", "tunneld.plugin", "tunneld.http1", "tunneld.tlsutil"})
#: The implementation: what the plugin API must never reach, even through type-only imports.
IMPLEMENTATION = frozenset({"tunneld.core", "tunneld.core._edge", "tunneld.core._agent",
                            "tunneld.core._plugins"})


# ---- the graph ---------------------------------------------------------------------------------


def module_files(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Module name → (file, is a package) for every module of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        found[".".join(parts)] = (path, is_pkg)
    return found


def _base(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    parts = module.split(".")
    if not is_pkg:
        parts.pop()
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, name] if name else parts)


def _exports(tree: ast.Module) -> dict[str, str]:
    """A facade's ``_EXPORTS = {name: module}`` table, if it has one."""
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and isinstance(value, ast.Dict):
            pairs = zip(value.keys, value.values, strict=True)
            return {ast.literal_eval(k): ast.literal_eval(v) for k, v in pairs if k is not None}
    return {}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports (see the module docstring for what counts)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for module, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, is_pkg, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in modules else base)
        pkg = module if is_pkg else module.rsplit(".", 1)[0]
        for name, target in _exports(tree).items():
            if not target:
                deps.add(f"{pkg}.{name}")
            elif target.startswith("."):
                deps.add(_base(module, is_pkg, len(target) - len(target.lstrip(".")), target.lstrip(".")))
            else:
                deps.add(target)
        graph[module] = {d for d in deps if d in modules and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` reaches → the module that imports it on one path (for messages)."""
    seen = {start: ""}
    todo = [start]
    while todo:
        node = todo.pop()
        for dep in graph[node]:
            if dep not in seen:
                seen[dep] = node
                todo.append(dep)
    return seen


def path_to(seen: dict[str, str], end: str) -> str:
    hops = [end]
    while seen[hops[-1]]:
        hops.append(seen[hops[-1]])
    return " → ".join(reversed(hops))


def layering_violations(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """Plugin package name → the imports of its modules outside the API and itself."""
    prefix = f"{package}.plugins."
    bad: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if not module.startswith(prefix):
            continue
        name = module[len(prefix):].split(".")[0]
        own = f"{prefix}{name}"
        public = {m.replace("tunneld", package, 1) for m in PUBLIC}
        for dep in deps:
            if dep in public or dep == own or dep.startswith(own + "."):
                continue
            bad.setdefault(name, set()).add(dep)
    return bad


def unexpected_reach(graph: dict[str, set[str]], roots: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    found = []
    for root in roots:
        seen = reachable(graph, root)
        found += [path_to(seen, m) for m in sorted(set(forbidden) & seen.keys())]
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, "tunneld")


# ---- (a) no cycle through the implementation ------------------------------------------------


def test_the_api_never_reaches_the_implementation(graph: dict[str, set[str]]) -> None:
    """hookspecs, the API and its public modules do not import the edge/agent, even for types."""
    roots = ["tunneld.plugin", "tunneld.hookspecs", "tunneld.core._tunnel", "tunneld.tlsutil",
             "tunneld.http1"]
    plugins = {m for m in graph if m.startswith("tunneld.plugins")}
    assert unexpected_reach(graph, roots, IMPLEMENTATION | plugins) == []


def test_the_core_never_imports_a_plugin(graph: dict[str, set[str]]) -> None:
    """The core finds plugins by name (``BUILTIN_PLUGINS``, entry points), like third-party ones."""
    core = [m for m in graph if m == "tunneld.core" or m.startswith("tunneld.core.")]
    plugins = {m for m in graph if m.startswith("tunneld.plugins")}
    assert unexpected_reach(graph, core, plugins) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_facades_import_nothing_of_ours_at_run_time() -> None:
    """Why ``pkg.mod → pkg`` is not an edge: the facades' imports are all type-only."""
    for facade in ("tunneld/__init__.py", "tunneld/core/__init__.py"):
        tree = ast.parse((ROOT.parent / facade).read_text())
        runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [n.module or "" for n in runtime if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in runtime if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.startswith("tunneld") or n.startswith(".")], (facade, names)
        assert all(not isinstance(n, ast.ImportFrom) or not n.level for n in runtime), facade


def test_importing_the_api_imports_no_implementation() -> None:
    code = ("import sys, tunneld.plugin, tunneld.hookspecs\n"
            "from tunneld.plugin import TunnelType, EdgeContext, proto\n"
            "bad = sorted(m for m in sys.modules if m in ('tunneld.core._edge', 'tunneld.core._agent', "
            "'tunneld.core._plugins') or m.startswith('tunneld.plugins'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- (b) plugins import only the API and their own package -------------------------------------


def test_plugins_import_only_the_api_and_themselves(graph: dict[str, set[str]]) -> None:
    assert {n: sorted(d) for n, d in layering_violations(graph, "tunneld").items()} == {}


def test_public_modules_do_not_import_plugins(graph: dict[str, set[str]]) -> None:
    for public in sorted(PUBLIC):
        wrong = sorted(d for d in graph[public] if d.startswith("tunneld.plugins"))
        assert wrong == [], public


# ---- (c) each check can fail -------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """On a synthetic package: a type-only cycle, a reach into the implementation, a bad plugin."""
    root = write_package(tmp_path, {
        "__init__.py": "",
        "plugin.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .core._tunnel import T\n",
        "core/__init__.py": "_EXPORTS = {'Edge': '._edge'}\n",
        "core/_tunnel.py": "def f():\n    from . import _edge\n",
        "core/_edge.py": "from ..plugin import X\n",
        "plugins/__init__.py": "",
        "plugins/good/__init__.py": "from pkg import hookimpl\nfrom pkg.plugin import X\n"
                                    "from . import _own\n",
        "plugins/good/_own.py": "import os\nfrom pkg.plugins.good._util import y\n",
        "plugins/good/_util.py": "",
        "plugins/bad/__init__.py": "from pkg.core import Edge\nfrom ..good import _own\n",
    })
    graph = import_graph(root, "pkg")
    # relative imports, imports inside functions, TYPE_CHECKING imports and _EXPORTS all count
    assert graph["pkg.core._tunnel"] == {"pkg.core._edge"}
    assert graph["pkg.core"] == {"pkg.core._edge"}
    assert cycles(graph) == [frozenset({"pkg.plugin", "pkg.core._tunnel", "pkg.core._edge"})]
    assert unexpected_reach(graph, ["pkg.plugin"], ["pkg.core._edge"]) == [
        "pkg.plugin → pkg.core._tunnel → pkg.core._edge"]
    assert layering_violations(graph, "pkg") == {"bad": {"pkg.core", "pkg.plugins.good._own"}}


# ---- (d) the adapters --------------------------------------------------------------------------


def _shape(function: object) -> list[tuple[str, object, object]]:
    """A signature without its annotations (the implementation may spell types its own way)."""
    params = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    # ``self`` aside: a staticmethod may implement a protocol method.
    return [(p.name, p.kind, p.default) for p in params if p.name != "self"]


def _members(protocol: type) -> list[str]:
    return [n for n in vars(protocol) if not n.startswith("_")]


@pytest.mark.parametrize(("protocol", "adapter"), [
    (plugin.EdgeContext, EdgeAdapter),
    (plugin.SessionContext, AgentSession),
    (plugin.AgentTunnelContext, AgentTunnelAdapter),
])
def test_adapters_implement_every_member(protocol: type, adapter: type) -> None:
    for name in _members(protocol):
        theirs, ours = getattr(protocol, name), getattr(adapter, name, None)
        assert ours is not None, name
        if isinstance(theirs, property):
            # A read-only property, or a plain attribute of the implementing class.
            assert not callable(ours) or isinstance(ours, property), name
        else:
            assert not isinstance(ours, property), name
        if not isinstance(theirs, property):
            assert _shape(ours) == _shape(theirs), name
            assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name


def test_the_api_documents_every_member() -> None:
    for protocol in (plugin.EdgeContext, plugin.SessionContext, plugin.AgentTunnelContext):
        assert protocol.__doc__
        for name in _members(protocol):
            member = getattr(protocol, name)
            doc = member.fget.__doc__ if isinstance(member, property) else member.__doc__
            assert doc, f"{protocol.__name__}.{name}"


def test_every_export_resolves() -> None:
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None, name
    with pytest.raises(AttributeError):
        plugin.Edge  # noqa: B018 - the implementation is not part of the API


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    store = Store.open(tmp_path)
    yield Edge(make_edge_config(tmp_path), store)
    store.close()


async def test_addresses_are_keyed_by_transport(edge: Edge) -> None:
    ctx = edge.context
    tcp, udp, other = object(), object(), object()
    ctx.claim_address("tcp", 20001, tcp, "alice")
    ctx.claim_address("udp", 20001, udp, "alice")  # the same number, another transport: no clash
    assert ctx.lookup_address("tcp", 20001) is tcp
    assert ctx.lookup_address("udp", 20001) is udp
    assert edge.routes.ports[20001] is tcp  # TCP is the edge's own port table
    for transport in ("tcp", "udp"):
        with pytest.raises(TunnelRejected, match="already in use"):
            ctx.claim_address(transport, 20001, other, "alice")
        assert not ctx.address_available(transport, 20001, "alice")
    assert ctx.address_name("tcp", 20001) == ("port", "20001")  # as resume tokens already say
    assert ctx.address_name("udp", 20001) == ("udp", "20001")
    with pytest.raises(ValueError, match="cannot name a transport"):
        ctx.claim_address("host", 1, other, "alice")

    ctx.release_address("udp", 20001, other)  # not the holder: nothing happens
    assert ctx.lookup_address("udp", 20001) is udp
    ctx.release_address("udp", 20001, udp)
    assert ctx.lookup_address("udp", 20001) is None
    assert ctx.lookup_address("tcp", 20001) is tcp
    # Released, the address is held for its owner: free for alice, not for bob.
    assert ctx.address_owner("udp", 20001) == "alice"
    assert ctx.address_available("udp", 20001, "alice")
    assert not ctx.address_available("udp", 20001, "bob")
    with pytest.raises(TunnelRejected, match="udp port 20001 is held for its previous owner"):
        ctx.claim_address("udp", 20001, other, "bob")
    ctx.claim_address("udp", 20001, other, "alice")
    assert ctx.lookup_address("udp", 20001) is other
    ctx.release_address("tcp", 20001, tcp)
    assert ctx.address_available("tcp", 20001, "alice") and not ctx.address_available("tcp", 20001, "bob")
    # Without an owner nothing is held.
    ctx.claim_address("udp", 20002, other, "")
    ctx.release_address("udp", 20002, other)
    assert ctx.address_available("udp", 20002, "bob") and ctx.address_owner("udp", 20002) is None


async def test_hostnames(edge: Edge) -> None:
    ctx = edge.context
    web, tls = object(), object()
    ctx.claim_host("https", "a.tunneld.test", web, "alice")
    ctx.claim_host("http", "a.tunneld.test", web, "alice")  # a host's routes share one owner
    assert ctx.lookup_host("https", "a.tunneld.test") is web
    assert ctx.lookup_host("tls", "a.tunneld.test") is None
    with pytest.raises(TunnelRejected, match="already in use"):
        ctx.claim_host("tls", "a.tunneld.test", tls, "alice")  # SNI cannot tell https from tls
    assert not ctx.host_available("a.tunneld.test", "alice")
    ctx.release_host("https", "a.tunneld.test", web)
    ctx.release_host("http", "a.tunneld.test", web)
    assert ctx.host_available("a.tunneld.test", "alice") and not ctx.host_available("a.tunneld.test", "bob")
    with pytest.raises(TunnelRejected, match="held for its previous owner"):
        ctx.claim_host("tls", "a.tunneld.test", tls, "bob")
    ctx.claim_host("tls", "a.tunneld.test", tls, "alice")
    assert ctx.lookup_host("tls", "a.tunneld.test") is tls


async def test_edge_context_reads_through_and_counts(edge: Edge, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    ctx = edge.context
    again = edge.context  # one per edge
    assert again is ctx
    assert again.domain == "tunneld.test" and again.data_dir == tmp_path and again.store is edge.store
    assert again.registry is edge.registry and again.stopping is edge.stopping
    assert again.port_range("tcp") == (edge.config.tcp_host, *edge.config.tcp_ports)
    assert again.port_range("udp") is None
    assert again.listen_addr("https") == edge.config.https_addr and again.listen_addr("nope") is None
    assert again.listen_addr("ssh") == edge.config.ssh_addr and again.limiter is edge.limiter
    # Another edge's state is apart.
    ctx.count("tunneld_test_total", proto="tcp")
    again.count("tunneld_test_total", 2, proto="tcp")
    assert isinstance(again, EdgeAdapter)
    assert again.counted("tunneld_test_total", proto="tcp") == 3
    assert again.counted("tunneld_test_total") == 0
    holder = object()
    ctx.claim_address("udp", 5, holder, "")
    assert again.lookup_address("udp", 5) is holder
    store = Store.open(tmp_path / "other")
    try:
        other = Edge(make_edge_config(tmp_path / "other"), store).context
        assert other.lookup_address("udp", 5) is None
    finally:
        store.close()
    caplog.set_level("INFO", "tunneld.access")
    ctx.log_request(client="198.51.100.1:4000", host="a.tunneld.test", tunnel_id="", method="GET",
                    path='/x"y', status=404, started=time.monotonic())
    ctx.log_connection(client="198.51.100.1:4001", proto="udp", result="ok", started=time.monotonic())
    lines = [r.getMessage() for r in caplog.records if r.name == "tunneld.access"]
    assert lines[0].startswith('client=198.51.100.1:4000 host=a.tunneld.test tunnel=- method=GET '
                               'path="/x%22y" status=404 duration_ms=')
    assert lines[1].startswith("client=198.51.100.1:4001 proto=udp host=- tunnel=- url=- result=ok ")


async def test_open_stream_through_a_real_edge_and_agent(edge_env: EdgeEnv) -> None:
    echo = await start_echo_server(edge_env.nursery)
    agent = await edge_env.start_agent(TunnelConfig("c", "tcp", str(echo)))
    [tunnel] = agent.tunnels
    [raw] = edge_env.edge.sessions
    # Plugins see the edge through the API: the built-in tls plugin got its context.
    assert getattr(edge_env.edge.tls_front, "edge", None) is edge_env.edge.context
    session: plugin.SessionContext = raw  # the session is its own context
    assert session.owner == raw.token_id != ""
    assert session.remote_addr == raw.remote_addr and session.client_type == "tunneld"
    with trio.fail_after(10):
        # The first bytes ride in the SYN frame; the agent relays them to the echo server.
        stream = await session.open_stream(tunnel.tunnel_id, "203.0.113.7:5555", "tcp", first=b"hello ")
        await stream.send_all(b"world")
        got = b""
        while got != b"hello world":
            data = await stream.receive_some()
            assert data
            got += data
        await stream.aclose()


async def test_agent_tunnel_context(edge_env: EdgeEnv) -> None:
    echo = await start_echo_server(edge_env.nursery)
    agent = await edge_env.start_agent(TunnelConfig("c", "tcp", str(echo)))
    [raw] = agent.tunnels
    tunnel = raw.context
    assert isinstance(tunnel, AgentTunnelAdapter)
    assert (tunnel.name, tunnel.config, tunnel.upstream, tunnel.public_url) == \
        (raw.name, raw.config, raw.upstream, raw.public_url)
    tunnel.request_done(0.25)
    assert raw.metrics.http_count == 1


async def test_labeled_tunnels_are_served_through_the_registry(edge_env: EdgeEnv) -> None:
    echo = await start_echo_server(edge_env.nursery)
    await edge_env.start_agent(TunnelConfig("c", "tcp", str(echo)))
    [session] = edge_env.edge.sessions
    # The built-in labeled plugin serves them (issue 13); malformed labels are its to refuse.
    resp = await session.start_labeled(plugin.proto.StartTunnelWithLabel(labels={"edge": "edghts_x"}))
    assert resp.error == "" and resp.id.startswith("tn_")
    resp = await session.start_labeled(plugin.proto.StartTunnelWithLabel(labels={"bad key": "x"}))
    assert resp.id == "" and resp.error.endswith(f"ERR_NGROK_{int(plugin.Code.BIND_MALFORMED)}")
    assert len(session.tunnels) == 2  # the tcp tunnel and the labeled one
