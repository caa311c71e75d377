"""The plugin system: the manager, the tunnel-type registry, and every hook in tunneld.hookspecs.

Every hookspec must have a ``test_hook_<hook name>`` here (checked by the last test), as
datasette does for its plugin hooks.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pluggy
import pytest
import trio
import trio.testing

import tunneld
from tunneld import hookspecs
from tunneld.core import Edge, PluginError, PrefixedStream, TunnelType, TunnelTypeRegistry
from tunneld.core._plugins import BUILTIN_PLUGINS, DISABLE_ENV, build_registry, get_plugin_manager
from tunneld.core._store import Store

from .conftest import make_edge_config

HOOK_NAMES = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "tunneld_spec")
)


@pytest.fixture(autouse=True)
def _no_disabled_plugins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)


def make_type(type_name: str, protos: tuple[str, ...]) -> TunnelType:
    """A minimal third-party tunnel type."""

    class _Type(TunnelType):
        name = type_name
        bind_protos = protos

        def edge_tunnel(self, edge: Any, session: Any, bind: Any, tunnel_id: str) -> Any:
            raise NotImplementedError

        def parse_addr(self, addr: str) -> str:
            return addr

        def agent_binds(self, config: Any) -> list[Any]:
            return []

        async def agent_handle(self, tunnel: Any, stream: Any, header: Any) -> None:
            return None

    return _Type()


class TypesPlugin:
    """A third-party plugin object registering the given tunnel types."""

    def __init__(self, *types: TunnelType) -> None:
        self.types = types

    @tunneld.hookimpl
    def tunneld_register_tunnel_types(self, registry: TunnelTypeRegistry) -> None:
        for t in self.types:
            registry.add(t)


def write_dist(root: Path, dist: str, module: str, ep_name: str, source: str) -> None:
    """Install a real third-party plugin on ``root``: a module and a dist-info with its entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[tunneld]\n{ep_name} = {module}\n")


THIRD_PARTY_SOURCE = """
    import click
    from tunneld.plugin import TunnelType, hookimpl

    class QuicType(TunnelType):
        name = "quic"
        bind_protos = ("quic",)

        def edge_tunnel(self, edge, session, bind, tunnel_id):
            raise NotImplementedError

        def parse_addr(self, addr):
            return addr

        def agent_binds(self, config):
            return []

        async def agent_handle(self, tunnel, stream, header):
            pass

    @hookimpl
    def tunneld_register_tunnel_types(registry):
        registry.add(QuicType())

    @click.command()
    @click.argument("who")
    def hello(who):
        '''Say hello from a plugin.'''
        click.echo(f"hello {who} from a plugin")

    @hookimpl
    def tunneld_add_commands(cli):
        cli.add_command(hello)
"""


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A third-party plugin installed through the ``tunneld`` entry-point group."""
    site = tmp_path / "site"
    site.mkdir()
    write_dist(site, "tunneld_quic", "tunneld_quic_plugin", "quic", THIRD_PARTY_SOURCE)
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import/metadata caches
    yield site
    sys.modules.pop("tunneld_quic_plugin", None)


# ---- the manager ---------------------------------------------------------------------------


def test_builtin_plugins_are_registered() -> None:
    pm = get_plugin_manager(entry_points=False)
    assert BUILTIN_PLUGINS == ("tunneld.plugins.http", "tunneld.plugins.tcp", "tunneld.plugins.tls",
                               "tunneld.plugins.file", "tunneld.plugins.ssh", "tunneld.plugins.labeled")
    for name in BUILTIN_PLUGINS:
        plugin = pm.get_plugin(name)
        assert plugin is not None
        assert plugin.__name__ == name
    assert pm.get_plugins() == {pm.get_plugin(n) for n in BUILTIN_PLUGINS}


def test_labeled_tunnels_go_through_the_registry() -> None:
    """StartTunnelWithLabel is dispatched like every other kind; the built-in plugin serves them."""
    registry = build_registry(get_plugin_manager(entry_points=False))
    labeled = registry.for_labels()
    assert type(labeled).__module__.startswith("tunneld.plugins.labeled")
    with pytest.raises(PluginError, match="labeled tunnels are served by"):
        registry.add_labeled(labeled)
    pm = get_plugin_manager(entry_points=False, blocked=["tunneld.plugins.labeled"])
    assert build_registry(pm).for_labels() is None


def test_each_call_builds_a_fresh_manager() -> None:
    pm1 = get_plugin_manager(entry_points=False)
    pm1.register(TypesPlugin(make_type("extra", ("extra",))))
    assert "extra" not in build_registry(get_plugin_manager(entry_points=False))


def test_builtin_registry() -> None:
    registry = build_registry(get_plugin_manager(entry_points=False))
    assert registry.names() == ["http", "tcp", "tls", "tunnel"]  # "tunnel": the labeled plugin's
    assert "http" in registry and "tcp" in registry and "quic" not in registry
    http = registry["http"]
    assert http.name == "http"
    assert http.bind_protos == ("http", "https")
    assert registry.for_bind_proto("http") is http
    assert registry.for_bind_proto("https") is http
    tcp = registry["tcp"]
    assert tcp.bind_protos == ("tcp",)
    assert registry.for_bind_proto("tcp") is tcp
    assert registry.for_bind_proto("tls") is registry["tls"]
    assert registry.for_bind_proto("quic") is None


def test_unknown_type_is_a_plugin_error_naming_the_known_ones() -> None:
    registry = build_registry(get_plugin_manager(entry_points=False))
    with pytest.raises(PluginError, match="unknown tunnel type 'quic'.*http, tcp, tls"):
        registry["quic"]


def test_third_party_plugin_object_adds_a_type() -> None:
    pm = get_plugin_manager(entry_points=False)
    quic = make_type("quic", ("quic", "quic+h3"))
    pm.register(TypesPlugin(quic), name="quic-plugin")
    registry = build_registry(pm)
    assert registry.names() == ["http", "quic", "tcp", "tls", "tunnel"]
    assert registry["quic"] is quic
    assert registry.for_bind_proto("quic+h3") is quic


def test_duplicate_type_name_is_a_plugin_error() -> None:
    pm = get_plugin_manager(entry_points=False)
    pm.register(TypesPlugin(make_type("tcp", ("tcp2",))))
    with pytest.raises(PluginError, match="'tcp' is registered twice"):
        build_registry(pm)


def test_duplicate_bind_proto_is_a_plugin_error() -> None:
    pm = get_plugin_manager(entry_points=False)
    pm.register(TypesPlugin(make_type("h2", ("h2", "https"))))
    with pytest.raises(PluginError, match="bind protocol 'https' is claimed by") as info:
        build_registry(pm)
    # pluggy calls the newest plugin first, so either type may be the one that got there first
    assert "'http'" in str(info.value) and "'h2'" in str(info.value)


def test_failed_add_leaves_the_registry_unchanged() -> None:
    registry = TunnelTypeRegistry()
    registry.add(make_type("a", ("a",)))
    with pytest.raises(PluginError):
        registry.add(make_type("b", ("b", "a")))
    assert registry.names() == ["a"]
    assert registry.for_bind_proto("b") is None


def test_duplicate_proto_within_one_type_is_accepted_once() -> None:
    # Not an error today: a type may list a proto twice without conflicting with itself.
    registry = TunnelTypeRegistry()
    registry.add(make_type("a", ("a", "a")))
    assert registry.for_bind_proto("a") is registry["a"]


def test_misspelled_hookimpl_is_caught_by_check_pending() -> None:
    class Typo:
        @tunneld.hookimpl
        def tunneld_register_tunel_types(self, registry: TunnelTypeRegistry) -> None:
            raise AssertionError("never called")

    pm = get_plugin_manager(entry_points=False)
    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError, match="tunneld_register_tunel_types"):
        pm.check_pending()


def test_hookimpl_with_an_unknown_argument_is_rejected() -> None:
    class BadArgs:
        @tunneld.hookimpl
        def tunneld_register_tunnel_types(self, registry: TunnelTypeRegistry, config: Any) -> None:
            raise AssertionError("never called")

    pm = get_plugin_manager(entry_points=False)
    with pytest.raises(pluggy.PluginValidationError):
        pm.register(BadArgs())


def test_disable_env_blocks_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "tunneld.plugins.tcp")
    pm = get_plugin_manager(entry_points=False)
    assert pm.is_blocked("tunneld.plugins.tcp")
    assert pm.get_plugin("tunneld.plugins.tcp") is None
    assert pm.get_plugin("tunneld.plugins.http") is not None
    registry = build_registry(pm)
    assert registry.names() == ["http", "tls", "tunnel"]
    assert registry.for_bind_proto("tcp") is None


def test_disable_env_takes_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " tunneld.plugins.http , tunneld.plugins.tcp ,tunneld.plugins.tls,"
                       "tunneld.plugins.labeled")
    assert build_registry(get_plugin_manager(entry_points=False)).names() == []


def test_blocked_argument() -> None:
    pm = get_plugin_manager(entry_points=False, blocked=["tunneld.plugins.http"])
    assert build_registry(pm).names() == ["tcp", "tls", "tunnel"]


def test_entry_point_plugin_is_loaded(third_party: Path) -> None:
    pm = get_plugin_manager()
    assert pm.get_plugin("quic") is not None
    assert build_registry(pm).names() == ["http", "quic", "tcp", "tls", "tunnel"]
    # and never without entry points
    assert "quic" not in build_registry(get_plugin_manager(entry_points=False))


def test_disable_env_blocks_an_entry_point_plugin(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "quic")
    pm = get_plugin_manager()
    assert pm.get_plugin("quic") is None
    assert build_registry(pm).names() == ["http", "tcp", "tls", "tunnel"]


# ---- one test per hook -------------------------------------------------------------------------


def test_hook_tunneld_register_tunnel_types(third_party: Path) -> None:
    pm = get_plugin_manager()
    registry = TunnelTypeRegistry()
    results = pm.hook.tunneld_register_tunnel_types(registry=registry)
    assert results == []  # the hook returns nothing; it adds to the registry
    assert registry.names() == ["http", "quic", "tcp", "tls", "tunnel"]
    assert registry.for_bind_proto("quic").name == "quic"  # type: ignore[union-attr]


async def test_hook_tunneld_edge_services(tmp_path: Path) -> None:
    record: list[str] = []

    class Service:
        def __init__(self, edge: Edge) -> None:
            self.edge = edge

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            record.append("service starting")
            task_status.started()
            record.append("service started")
            await self.edge.stopping.wait()
            record.append("service stopping")

    class ServicePlugin:
        @tunneld.hookimpl
        def tunneld_edge_services(self, edge: Edge) -> list[Service]:
            record.append("hook called")
            return [Service(edge)]

    pm = get_plugin_manager(entry_points=False)
    pm.register(ServicePlugin())
    store = Store.open(tmp_path)
    try:
        edge = Edge(make_edge_config(tmp_path), store, pm=pm)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                info = await nursery.start(edge.serve)
                record.append("edge ready")
                # the built-in http plugin's ingress was started too: its listeners are up
                assert {"agent", "http", "https"} <= set(info.ports)
                await trio.testing.wait_all_tasks_blocked()
                edge.shutdown()
            await edge.stopped.wait()
    finally:
        store.close()
    assert record == ["hook called", "service starting", "service started", "edge ready", "service stopping"]


async def test_hook_tunneld_edge_tls_front(tmp_path: Path) -> None:
    import ssl

    seen: list[tuple[str, bytes]] = []

    class Front:
        async def route(self, stream: trio.SocketStream, client_addr: str) -> trio.abc.Stream | None:
            first = await stream.receive_some(1)
            seen.append((client_addr, first))
            if first == b"T":  # "take": the front answers itself; the edge must not terminate
                await stream.send_all(b"taken by the front\n")
                return None
            return PrefixedStream(stream, first)

    class FrontPlugin:
        @tunneld.hookimpl
        def tunneld_edge_tls_front(self, edge: Edge) -> Front:
            return Front()

    # The built-in tls plugin contributes a front of its own: two fronts are a PluginError.
    store = Store.open(tmp_path)
    try:
        pm = get_plugin_manager(entry_points=False)
        pm.register(FrontPlugin())
        with pytest.raises(PluginError, match="more than one plugin wants to front HTTPS: .*Front, SniFront"):
            await Edge(make_edge_config(tmp_path), store, pm=pm).serve()

        pm = get_plugin_manager(entry_points=False, blocked=["tunneld.plugins.tls"])
        pm.register(FrontPlugin())
        edge = Edge(make_edge_config(tmp_path), store, pm=pm)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                info = await nursery.start(edge.serve)
                port = info.ports["https"]
                taken = await trio.open_tcp_stream("127.0.0.1", port)
                await taken.send_all(b"T")
                assert await taken.receive_some(100) == b"taken by the front\n"
                await taken.aclose()
                # Handed back: the edge's own TLS handshake runs on what the front returned.
                ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
                tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                                     server_hostname="x.tunneld.test")
                await tls.do_handshake()
                assert tls.transport_stream.socket.getsockname()[1] == int(seen[1][0].rsplit(":", 1)[1])  # type: ignore[attr-defined]
                await tls.aclose()
                edge.shutdown()
    finally:
        store.close()
    assert [data for _addr, data in seen] == [b"T", b"\x16"]


def test_hook_tunneld_add_commands(third_party: Path) -> None:
    # In-process: the hook is handed the tunneld click group.
    group = click.Group("tunneld")
    get_plugin_manager().hook.tunneld_add_commands(cli=group)
    assert "hello" in group.commands

    # End to end: `python -m tunneld hello` finds the command through the entry point.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(third_party), *sys.path]))
    env.pop(DISABLE_ENV, None)
    result = subprocess.run([sys.executable, "-m", "tunneld", "hello", "world"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello world from a plugin"
    assert "warning" not in result.stderr


async def test_hook_tunneld_agent_upstream(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tunneld.core import Metrics

    served: list[object] = []

    class Handler:
        url = "echo://one"

        async def serve(self, stream: Any, header: Any, request_done: Any = None) -> None:
            served.append(header)
            request_done(0.5)
            await stream.send_all(b"answered by the plugin")

    class EchoPlugin:
        @tunneld.hookimpl
        def tunneld_agent_upstream(self, url: str) -> Handler | None:
            return Handler() if url.startswith("echo://") else None

    pm = get_plugin_manager(entry_points=False)
    pm.register(EchoPlugin())
    # the built-in file plugin claims file: URLs only, and refuses bad ones with ValueError
    assert pm.hook.tunneld_agent_upstream(url="8080") is None
    assert pm.hook.tunneld_agent_upstream(url=tmp_path.as_uri()).url == tmp_path.as_uri()
    with pytest.raises(ValueError, match="relative"):
        pm.hook.tunneld_agent_upstream(url="file:relative")
    # the http tunnel type asks the hook first, and hands the claimed tunnel's streams over
    http = build_registry(pm)["http"]
    assert http.parse_addr("echo://anything") == "echo://one"
    assert http.parse_addr("127.0.0.1:80") == "http://127.0.0.1:80"
    metrics = Metrics()
    # What agent_handle gets: an AgentTunnelContext (only what the http type reads of it here).
    tunnel = SimpleNamespace(upstream="echo://one", request_done=metrics.request_done)
    ours, theirs = trio.testing.memory_stream_pair()
    header = object()
    with trio.fail_after(5):
        await http.agent_handle(tunnel, theirs, header)  # type: ignore[arg-type]
        assert await ours.receive_some() == b"answered by the plugin"
    assert served == [header] and metrics.http_count == 1
    # nobody claims echo:// without the plugin
    with pytest.raises(ValueError, match="unsupported scheme 'echo'"):
        build_registry(get_plugin_manager(entry_points=False))["http"].parse_addr("echo://anything")


# ---- meta -----------------------------------------------------------------------------------------


def test_hookspec_discovery() -> None:
    # A sanity check that the discovery works; new hooks simply extend the list.
    known = {"tunneld_add_commands", "tunneld_edge_services", "tunneld_register_tunnel_types"}
    assert known <= set(HOOK_NAMES)
    assert all(name.startswith("tunneld_") for name in HOOK_NAMES)


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_has_a_test(hook: str) -> None:
    test = globals().get(f"test_hook_{hook}")
    assert test is not None, f"tunneld.hookspecs.{hook} has no test_hook_{hook} in {__name__}"
    assert callable(test)


def test_every_hook_test_names_a_real_hook() -> None:
    stale = [name[len("test_hook_"):] for name in globals() if name.startswith("test_hook_")]
    assert sorted(stale) == HOOK_NAMES
