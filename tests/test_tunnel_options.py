"""The tunnel-type contract: options declared by a type (``TunnelOption``), checked by the config
loader and turned into flags by ``tunnel_command``, read with ``TunnelConfig.option``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import trio
from click.testing import CliRunner

from tunneld.plugin import (
    BindRequest,
    ConfigError,
    TunnelConfig,
    TunnelOption,
    TunnelType,
    TunnelTypeRegistry,
    parse_proxy_proto,
    proto,
    tunnel_command,
)


def _level(value: str) -> str:
    if value not in ("low", "high"):
        raise ValueError("expected low or high")
    return value


def _tags(value: list[str]) -> list[str]:
    if any(not t.isalpha() for t in value):
        raise ValueError("tags are letters only")
    return value


def _legacy_loud(value: str) -> str:
    """A spelling that needs converting: ``loud: true`` is ``level: high``."""
    converted = {"true": "high", "false": "low"}.get(value.lower())
    return converted if converted is not None else _level(value)


class DemoType(TunnelType):
    name = "demo"
    bind_protos = ("demo",)
    help = "Forward demo traffic to ADDR.\n\nExample: tunneld demo 7000 --level high"
    options = (
        TunnelOption("level", "--level", "How loud.", default="low", parse=_level, aliases=("volume",)),
        TunnelOption("loud", None, "Old spelling of level.", parse=_legacy_loud, into="level"),
        TunnelOption("tags", "--tag", "Tags (repeatable).", multiple=True, default=("x",), parse=_tags),
        TunnelOption("retries", "--retries", "Retries.", kind=int, default=3),
        TunnelOption("ratio", None, "A ratio.", kind=float, default=0.5),
        TunnelOption("fast", "--fast", "Go fast.", kind=bool, default=False),
        TunnelOption("secret", "--secret", "A password.", default="", secret=True),
        TunnelOption("cert", "--cert", "Certificate.", default="", requires=("pkey",)),
        TunnelOption("pkey", "--pkey", "Key.", default="", requires=("cert",)),
        TunnelOption("pp", "--pp", "PROXY version.", kind=int, default=0, parse=parse_proxy_proto),
    )

    def edge_tunnel(self, edge: Any, session: Any, bind: Any, tunnel_id: str) -> Any:
        raise NotImplementedError

    def parse_addr(self, addr: str) -> str:
        return addr

    def agent_binds(self, config: TunnelConfig) -> list[BindRequest]:
        return [BindRequest(config.name, proto.Bind(proto="demo", forwards_to=config.addr, opts={}))]

    async def agent_handle(self, tunnel: Any, stream: trio.abc.HalfCloseableStream, header: Any) -> None:
        raise NotImplementedError


class OtherType(DemoType):
    name = "other"
    bind_protos = ("other",)
    options = (TunnelOption("only_other", None, "x"), TunnelOption("shared", None, "x"))


class ThirdType(DemoType):
    name = "third"
    bind_protos = ("third",)
    options = (TunnelOption("shared", None, "x"),)


@pytest.fixture
def registry() -> TunnelTypeRegistry:
    registry = TunnelTypeRegistry()
    for t in (DemoType(), OtherType(), ThirdType()):
        registry.add(t)
    return registry


def load(registry: TunnelTypeRegistry, body: str) -> TunnelConfig:
    from tunneld.core._config import parse_agent_config

    cfg = parse_agent_config("tunnels:\n  t:\n    proto: demo\n    addr: 7000\n" + body, Path("t.yml"),
                             registry=registry)
    return cfg.tunnels["t"]


def error(registry: TunnelTypeRegistry, body: str, proto_: str = "demo") -> str:
    from tunneld.core._config import parse_agent_config

    with pytest.raises(ConfigError) as info:
        parse_agent_config(f"tunnels:\n  t:\n    proto: {proto_}\n    addr: 7000\n" + body, Path("t.yml"),
                           registry=registry)
    return str(info.value)


# ---- TunnelConfig ------------------------------------------------------------------------------


def test_option_gives_the_value_or_the_default() -> None:
    config = TunnelConfig("t", "demo", "7000", level="high")
    assert config.option("level") == "high"
    assert config.option("retries") == 3
    tags = config.option("tags")
    assert tags == ["x"]
    tags.append("y")  # a copy: the default is not shared
    assert config.option("tags") == ["x"]
    with pytest.raises(KeyError, match="no option 'nope'"):
        config.option("nope")


def test_repr_hides_secret_options() -> None:
    config = TunnelConfig("t", "demo", "7000", secret="hunter2hunter2", level="high")
    assert "hunter2" not in repr(config) and "'high'" in repr(config)


def test_default_api_config() -> None:
    config = TunnelConfig("t", "demo", "7000")
    assert DemoType().api_config(config, "localhost:7000") == {"addr": "localhost:7000", "inspect": False}


# ---- the config loader -------------------------------------------------------------------------


def test_loader_reads_options_by_kind(registry: TunnelTypeRegistry) -> None:
    t = load(registry, "    level: high\n    tags: [a, b]\n    retries: '5'\n    ratio: 2\n    fast: true\n"
                       "    pp: '2'\n    metadata: m\n    inspect: false\n")
    assert t.options == {"level": "high", "tags": ["a", "b"], "retries": 5, "ratio": 2.0, "fast": True,
                         "pp": 2}
    assert (t.metadata, t.inspect) == ("m", False)
    assert load(registry, "").options == {}


def test_loader_aliases_and_conversions(registry: TunnelTypeRegistry) -> None:
    assert load(registry, "    volume: high\n").options == {"level": "high"}
    assert load(registry, "    loud: true\n").options == {"level": "high"}


@pytest.mark.parametrize(("body", "message"), [
    ("    level: max\n", "t.yml line 5: tunnels.t.level: expected low or high"),
    ("    tags: [a, '1', b]\n", "t.yml line 5: tunnels.t.tags: tags are letters only"),
    ("    tags:\n      - a\n      - '1'\n", "t.yml line 7: tunnels.t.tags: tags are letters only"),
    ("    tags: a\n", "t.yml line 5: tunnels.t.tags: expected a list"),
    ("    retries: many\n", "t.yml line 5: tunnels.t.retries: expected an integer"),
    ("    retries: true\n", "t.yml line 5: tunnels.t.retries: expected an integer"),
    ("    ratio: x\n", "t.yml line 5: tunnels.t.ratio: expected a number"),
    ("    ratio: .nan\n", "t.yml line 5: tunnels.t.ratio: expected a number"),
    ("    fast: 1\n", "t.yml line 5: tunnels.t.fast: expected true or false"),
    ("    level: [a]\n", "t.yml line 5: tunnels.t.level: expected a single value"),
    ("    pp: 7\n", "t.yml line 5: tunnels.t.pp: expected 1 or 2"),
    ("    cert: c\n", "t.yml line 5: tunnels.t.cert: needs pkey as well"),
    ("    only_other: x\n", "t.yml line 5: tunnels.t.only_other: only other tunnels have this option"),
    ("    shared: x\n", "line 5: tunnels.t.shared: tunneld supports it on other and third tunnels only"),
    ("    nope: x\n", "t.yml line 5: tunnels.t.nope: unknown key 'nope'"),
    ("    oauth: x\n", "t.yml line 5: tunnels.t.oauth: not supported by tunneld yet"),
])
def test_loader_errors_name_file_line_and_key(registry: TunnelTypeRegistry, body: str, message: str) -> None:
    assert message in error(registry, body)


def test_unknown_proto_names_the_known_types(registry: TunnelTypeRegistry) -> None:
    assert error(registry, "", "quic") == ("t.yml line 3: tunnels.t.proto: unknown tunnel type 'quic' "
                                           "(known: demo, other, third)")


# ---- tunnel_command ----------------------------------------------------------------------------


@pytest.fixture
def run() -> tuple[click.Group, list[tuple[dict[str, Any], list[TunnelConfig]]]]:
    from tunneld.core._commands import RUN_TUNNELS

    seen: list[tuple[dict[str, Any], list[TunnelConfig]]] = []

    @click.group()
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.meta[RUN_TUNNELS] = lambda flags, tunnels: seen.append((flags, tunnels))

    group.add_command(tunnel_command(DemoType()))
    return group, seen


def test_command_turns_flags_into_options(run: Any) -> None:
    group, seen = run
    result = CliRunner().invoke(group, ["demo", "7000", "--level", "high", "--tag", "a", "--tag", "b",
                                        "--retries", "4", "--fast", "--pp", "1", "--authtoken", "tok",
                                        "--server-addr", "edge:4443", "--log", "stdout"])
    assert result.exit_code == 0, result.output
    ((flags, (tunnel,)),) = seen
    assert (tunnel.name, tunnel.proto, tunnel.addr) == ("command_line", "demo", "7000")
    assert tunnel.options == {"level": "high", "tags": ["a", "b"], "retries": 4, "fast": True, "pp": 1}
    assert (flags["authtoken"], flags["server_addr"], flags["log_target"]) == ("tok", "edge:4443", "stdout")
    assert flags["config_path"] == () and flags["web_addr"] is None  # --config is repeatable


def test_command_without_flags_sets_no_options(run: Any) -> None:
    group, seen = run
    assert CliRunner().invoke(group, ["demo", "7000"]).exit_code == 0
    assert seen[0][1][0].options == {}
    assert seen[0][1][0].option("level") == "low"


@pytest.mark.parametrize(("args", "message"), [
    (["--level", "max"], "Invalid value for --level: expected low or high"),
    (["--pp", "3"], "Invalid value for --pp: expected 1 or 2"),
    (["--retries", "x"], "'x' is not a valid integer"),
    (["--cert", "c"], "--cert and --pkey go together"),
])
def test_command_usage_errors_name_the_flag(run: Any, args: list[str], message: str) -> None:
    group, seen = run
    result = CliRunner().invoke(group, ["demo", "7000", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not seen


def test_command_help_has_the_types_help_and_flags(run: Any) -> None:
    group, _ = run
    out = CliRunner().invoke(group, ["demo", "--help"]).output
    assert "Example: tunneld demo 7000 --level high" in out
    for flag in ("--level", "--tag", "--fast / --no-fast", "--authtoken", "--server-addr", "--root-cas",
                 "--web-addr", "--config", "--log", "--log-format", "--log-level"):
        assert flag in out
    assert "--loud" not in out  # config file only


def test_command_outside_tunneld_says_so() -> None:
    result = CliRunner().invoke(tunnel_command(DemoType()), ["7000"])
    assert result.exit_code == 2 and "run it as a tunneld command" in result.output


# ---- the built-in types on this contract -------------------------------------------------------


def test_builtin_commands_come_from_their_plugins() -> None:
    from tunneld.cli import cli
    from tunneld.core._plugins import get_plugin_manager

    out = CliRunner().invoke(cli, ["--help"]).output
    for name in ("http", "tcp", "tls", "start", "config", "edge"):
        assert f"  {name} " in out, out
    group = click.Group("g")
    get_plugin_manager(entry_points=False).hook.tunneld_add_commands(cli=group)
    assert {"http", "tcp", "tls"} <= set(group.commands)
    for name in ("http", "tcp", "tls", "start"):
        assert "Example" in CliRunner().invoke(cli, [name, "--help"]).output, name


def test_builtin_api_config() -> None:
    from tunneld.core._plugins import build_registry, get_plugin_manager

    registry = build_registry(get_plugin_manager(entry_points=False))
    http = TunnelConfig("w", "http", "8080", inspect=False)
    assert registry["http"].api_config(http, "http://localhost:8080") == {"addr": "http://localhost:8080",
                                                                           "inspect": False}
    assert registry["http"].api_config(attrs_evolve(http, inspect=True), "u")["inspect"] is True
    assert registry["tcp"].api_config(TunnelConfig("t", "tcp", "22"), "localhost:22") == {
        "addr": "localhost:22", "inspect": False}


def attrs_evolve(config: TunnelConfig, **changes: Any) -> TunnelConfig:
    import attrs

    return attrs.evolve(config, **changes)


@pytest.mark.parametrize(("body", "options"), [
    ("    proto: http\n    bind_tls: false\n", {"schemes": ["http"]}),
    ("    proto: http\n    bind_tls: both\n", {"schemes": ["https", "http"]}),
    ("    proto: http\n    domain: a.example.org\n", {"hostname": "a.example.org"}),
    ("    proto: http\n    auth: 'alice:long enough'\n    basic_auth: ['bob:long enough']\n",
     {"basic_auth": ["alice:long enough", "bob:long enough"]}),
    ("    proto: tcp\n    remote_addr: 'edge:20001'\n", {"remote_addr": "edge:20001"}),
    ("    proto: tls\n    subdomain: mail\n    crt: c\n    key: k\n",
     {"subdomain": "mail", "crt": "c", "key": "k"}),
])
def test_builtin_config_keys(body: str, options: dict[str, Any]) -> None:
    from tunneld.core._config import parse_agent_config

    assert parse_agent_config("tunnels:\n  t:\n    addr: 1\n" + body).tunnels["t"].options == options


@pytest.mark.parametrize(("body", "message"), [
    ("    proto: http\n    bind_tls: maybe\n", "line 5: tunnels.t.bind_tls: expected true, false or both"),
    ("    proto: http\n    schemes: [ftp]\n", "line 5: tunnels.t.schemes: schemes are http and/or https"),
    ("    proto: http\n    schemes: []\n", "line 5: tunnels.t.schemes: schemes are http and/or https"),
    ("    proto: tcp\n    subdomain: x\n", "line 5: tunnels.t.subdomain: tunneld supports it on http and"),
    ("    proto: http\n    crt: x\n", "line 5: tunnels.t.crt: only tls tunnels have this option"),
    ("    proto: carrier-pigeon\n", "line 4: tunnels.t.proto: unknown tunnel type 'carrier-pigeon' (known: "),
])
def test_builtin_config_errors(body: str, message: str) -> None:
    from tunneld.core._config import parse_agent_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_agent_config("tunnels:\n  t:\n    addr: 1\n" + body)


@pytest.mark.parametrize("options", [
    (TunnelOption("a", "--config", "x"),),
    (TunnelOption("a", "--x", "x"), TunnelOption("b", "--x", "x")),
    (TunnelOption("a", None, "x"), TunnelOption("b", None, "x", aliases=("a",))),
    (TunnelOption("a", "--inspect", "x", kind=bool),),
])
def test_colliding_options_are_a_plugin_error(options: tuple[TunnelOption, ...]) -> None:
    from tunneld.plugin import PluginError

    class Clash(DemoType):
        name = "clash"

    Clash.options = options
    with pytest.raises(PluginError, match="clash"):
        tunnel_command(Clash())
