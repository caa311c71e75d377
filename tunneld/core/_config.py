"""Agent configuration: the YAML file (ngrok's keys), env vars, and command-line overrides.

Errors name the key path and the line: ``tunneld.yml line 7: tunnels.web.addr: ...``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import yaml

from ._errors import ConfigError

# Re-exported: they lived here before tunnel types declared their own options (issue 12).
from ._options import BASIC_AUTH_MAX_LENGTH as BASIC_AUTH_MAX_LENGTH
from ._options import BASIC_AUTH_MIN_PASSWORD as BASIC_AUTH_MIN_PASSWORD
from ._options import check_host_header as check_host_header
from ._options import parse_proxy_proto as parse_proxy_proto
from ._options import split_basic_auth as split_basic_auth
from ._tunnel import TunnelConfig as TunnelConfig

if TYPE_CHECKING:
    from ._tunnel import TunnelOption, TunnelType, TunnelTypeRegistry


#: Default agent config file (XDG, like ngrok v3's ``~/.config/ngrok/ngrok.yml``).
def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tunneld" / "tunneld.yml"


DEFAULT_SERVER_ADDR = "localhost:4443"
DEFAULT_WEB_ADDR = "127.0.0.1:4040"


@attrs.define
class AgentConfig:
    """Everything the agent needs; built by :func:`load_agent_config` and the CLI."""

    authtoken: str = ""
    server_addr: str = DEFAULT_SERVER_ADDR
    #: PEM file of CAs that sign the edge's certificate; "" or "host"/"trusted" = system store.
    root_cas: str = ""
    #: Local web API/inspector address; None disables it.
    web_addr: str | None = DEFAULT_WEB_ADDR
    log: str = "false"
    log_format: str = "term"
    log_level: str = "info"
    heartbeat_interval: float = 10.0
    heartbeat_tolerance: float = 15.0
    tunnels: dict[str, TunnelConfig] = attrs.field(factory=dict)
    #: Where this configuration was read from (for messages and ``config add-authtoken``).
    path: Path | None = None


_AGENT_KEYS = {
    "version", "authtoken", "server_addr", "root_cas", "web_addr", "log", "log_format", "log_level",
    "heartbeat_interval", "heartbeat_tolerance", "tunnels", "console_ui", "update_check", "region",
    "metadata", "inspect_db_size",
}
#: Keys of every tunnel, whatever its type (the rest are the type's :attr:`TunnelType.options`).
_COMMON_TUNNEL_KEYS = {"proto", "addr", "inspect", "metadata"}
#: Tunnel keys ngrok defines that tunneld does not enforce yet: refused, never ignored.
_TUNNEL_UNSUPPORTED = {"client_cas", "oauth", "oidc",
                       "ip_restriction", "circuit_breaker", "compression", "mutual_tls_cas",
                       "request_header", "response_header", "websocket_tcp_converter", "labels",
                       "verify_webhook", "traffic_policy"}


#: Deepest nesting of YAML collections accepted (the schema needs 4; PyYAML's composer recurses).
MAX_YAML_DEPTH = 32
#: Longest heartbeat interval/tolerance: the Auth message carries them as int64 nanoseconds.
MAX_HEARTBEAT = 86400.0


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # (no stubs for yaml here)
    """SafeLoader that refuses deep nesting with a ConfigError instead of a RecursionError."""

    def __init__(self, stream: str | bytes, path: Path | None) -> None:
        super().__init__(stream)
        self._path = path
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                name = self._path.name if self._path else "config"
                raise ConfigError(f"{name} line {mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _where(path: Path | None, node: yaml.Node) -> str:
    name = path.name if path else "config"
    return f"{name} line {node.start_mark.line + 1}"


def _key(path: Path | None, node: yaml.Node, prefix: str = "") -> str:
    """A mapping key: a plain scalar only (a list or mapping as a key is no config key).

    Keys are echoed in error messages (``tunnels.NAME.KEY``), so control characters such as
    the newlines of a multi-line key are refused: a message must stay one line.
    """
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(path, node)}: {prefix}keys must be plain names, not a list or mapping")
    key = str(node.value)
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigError(f"{_where(path, node)}: {prefix}key {key[:64]!r} contains control characters")
    return key


def _scalar(path: Path | None, key: str, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(path, node)}: {key}: expected a single value")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, KeyError, ...
        detail = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{_where(path, node)}: {key}: invalid value: {detail}"[:300]) from None


def _duration(path: Path | None, key: str, node: yaml.Node) -> float:
    value = _scalar(path, key, node)
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        text = str(value)
    else:
        text = str(value).strip()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        for unit in ("ms", "s", "m", "h"):
            number = text[: -len(unit)]
            if text.endswith(unit) and number.isascii() and number.replace(".", "", 1).isdigit():
                seconds = float(number) * units[unit]
                break
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(f"{_where(path, node)}: {key}: expected a duration such as 10s, got {text[:64]!r}")
    if seconds > MAX_HEARTBEAT:
        raise ConfigError(f"{_where(path, node)}: {key}: must be at most 24h")
    return seconds


def _str(path: Path | None, key: str, node: yaml.Node) -> str:
    value = _scalar(path, key, node)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{_where(path, node)}: {key}: expected a string")
    return str(value)


def _bool(path: Path | None, key: str, node: yaml.Node) -> bool:
    value = _scalar(path, key, node)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(path, node)}: {key}: expected true or false, got {value!r}")
    return value


def parse_agent_config(text: str | bytes, path: Path | None = None, *,
                       registry: TunnelTypeRegistry | None = None) -> AgentConfig:
    """Parse the YAML text (or UTF-8 bytes) of an agent config file; ConfigError if it is wrong.

    Each tunnel's keys are checked against the options of its type in ``registry`` (default:
    the installed plugins').
    """
    name = path.name if path else "config"
    if isinstance(text, bytes):
        data = text
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            lineno = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{name} line {lineno}: not valid UTF-8 (byte {exc.start})") from None
    loader: _Loader | None = None
    try:
        loader = _Loader(text, path)  # the reader already refuses non-printable characters
        root = loader.get_single_node()
    except yaml.reader.ReaderError as exc:  # no mark, and a two-line str(): say it on one line
        lineno = text.count("\n", 0, exc.position) + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ConfigError(f"{name} line {lineno}: not valid YAML: {exc.reason} ({char})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path.name if path else 'config'}{line}: not valid YAML: "
                          f"{getattr(exc, 'problem', exc)}") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # PyYAML's scanner itself fails on some input: '"\U7fffffff"' is chr() out of range.
        line = f" line {loader.get_mark().line + 1}" if loader is not None else ""
        raise ConfigError(f"{name}{line}: not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    cfg = AgentConfig(path=path)
    if root is None:
        return cfg
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{_where(path, root)}: the file must be a mapping of keys to values")
    for knode, vnode in root.value:
        key = _key(path, knode)
        if key not in _AGENT_KEYS:
            raise ConfigError(f"{_where(path, knode)}: unknown key {key!r}")
        if key == "tunnels":
            cfg.tunnels = _parse_tunnels(path, vnode, registry)
        elif key in ("authtoken", "server_addr", "root_cas", "log", "log_format", "log_level"):
            setattr(cfg, key, _str(path, key, vnode))
        elif key == "web_addr":
            value = _scalar(path, key, vnode)
            cfg.web_addr = None if value is False or str(value).lower() == "false" else str(value)
        elif key in ("heartbeat_interval", "heartbeat_tolerance"):
            seconds = _duration(path, key, vnode)
            if seconds < 1:
                raise ConfigError(f"{_where(path, vnode)}: {key}: must be at least 1s")
            setattr(cfg, key, seconds)
        else:
            _scalar(path, key, vnode)  # accepted for compatibility; validated as a scalar only
    return cfg


def _builtin_registry() -> TunnelTypeRegistry:
    """The tunnel types of the installed plugins, built once per set of disabled plugins."""
    from ._plugins import DISABLE_ENV, build_registry, get_plugin_manager

    disabled = os.environ.get(DISABLE_ENV, "")
    if disabled not in _REGISTRIES:
        _REGISTRIES[disabled] = build_registry(get_plugin_manager())
    return _REGISTRIES[disabled]


#: Config files are read a few times per process (tests, fuzzing: many): the plugins are loaded once.
_REGISTRIES: dict[str, TunnelTypeRegistry] = {}


def _declarations(registry: TunnelTypeRegistry) -> dict[str, list[tuple[str, TunnelOption]]]:
    """Config key (own or alias) → the (type name, option) pairs that accept it."""
    found: dict[str, list[tuple[str, TunnelOption]]] = {}
    for name in registry.names():
        for option in registry[name].options:
            for key in (option.key, *option.aliases):
                found.setdefault(key, []).append((name, option))
    return found


def _parse_tunnels(path: Path | None, node: yaml.Node,
                   registry: TunnelTypeRegistry | None) -> dict[str, TunnelConfig]:
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(path, node)}: tunnels: expected a mapping of tunnel names")
    registry = registry if registry is not None else _builtin_registry()
    declared = _declarations(registry)
    tunnels: dict[str, TunnelConfig] = {}
    for knode, vnode in node.value:
        name = _key(path, knode, "tunnels: ")
        prefix = f"tunnels.{name}"
        if not isinstance(vnode, yaml.MappingNode):
            raise ConfigError(f"{_where(path, vnode)}: {prefix}: expected a mapping")
        common: dict[str, Any] = {}
        own: list[tuple[str, yaml.Node, yaml.Node]] = []
        for tk, tv in vnode.value:
            key = _key(path, tk, f"{prefix}: ")
            full = f"{prefix}.{key}"
            if key in _TUNNEL_UNSUPPORTED:
                raise ConfigError(f"{_where(path, tk)}: {full}: not supported by tunneld yet "
                                  "(refused rather than ignored)")
            if key == "inspect":
                common[key] = _bool(path, full, tv)
            elif key in _COMMON_TUNNEL_KEYS:
                common[key] = _str(path, full, tv)
            elif key in declared:
                own.append((key, tk, tv))
            else:
                raise ConfigError(f"{_where(path, tk)}: {full}: unknown key {key!r}")
        for required in ("proto", "addr"):
            if required not in common:
                raise ConfigError(f"{_where(path, vnode)}: {prefix}: missing key {required!r}")
        proto = common["proto"]
        if proto not in registry:
            pnode = next(v for k, v in vnode.value if k.value == "proto")
            raise ConfigError(f"{_where(path, pnode)}: {prefix}.proto: unknown tunnel type {proto[:64]!r} "
                              f"(known: {', '.join(registry.names())})")
        tunnel_type = registry[proto]
        options = _parse_options(path, prefix, tunnel_type, own, declared)
        tunnels[name] = TunnelConfig(name=name, options=options, **common)
    return tunnels


def _parse_options(path: Path | None, prefix: str, tunnel_type: TunnelType,
                   entries: list[tuple[str, yaml.Node, yaml.Node]],
                   declared: dict[str, list[tuple[str, TunnelOption]]]) -> dict[str, Any]:
    """Check a tunnel's own keys against its type's options; their parsed values by target key."""
    mine = {key: option for option in tunnel_type.options for key in (option.key, *option.aliases)}
    by_key = {option.key: option for option in tunnel_type.options}
    options: dict[str, Any] = {}
    given: dict[str, yaml.Node] = {}
    for key, knode, vnode in entries:
        full = f"{prefix}.{key}"
        option = mine.get(key)
        if option is None:
            # Never accepted and then ignored: a tcp tunnel "with basic auth" would be open.
            owners = sorted({owner for owner, _ in declared[key]})
            if len(owners) == 1:
                raise ConfigError(f"{_where(path, knode)}: {full}: only {owners[0]} tunnels have this option")
            raise ConfigError(f"{_where(path, knode)}: {full}: tunneld supports it on "
                              f"{', '.join(owners[:-1])} and {owners[-1]} tunnels only")
        value = _option_value(path, full, option, vnode)
        target = by_key.get(option.target, option)
        if option.target in options and target.multiple:
            options[option.target] = [*options[option.target], *value]
        else:
            options[option.target] = value
        given[option.target] = knode
    for key, knode in given.items():
        option = by_key.get(key)
        for needed in option.requires if option is not None and options[key] else ():
            if not options.get(needed):
                raise ConfigError(f"{_where(path, knode)}: {prefix}.{key}: needs {needed} as well")
    return options


def _option_value(path: Path | None, full: str, option: TunnelOption, node: yaml.Node) -> Any:
    """One option's value from its node: read by kind, then through ``option.parse``."""
    items: list[tuple[Any, yaml.Node]] = []
    if option.multiple:
        if not isinstance(node, yaml.SequenceNode):
            example = option.metavar or "..."
            raise ConfigError(f"{_where(path, node)}: {full}: expected a list such as [{example}]")
        items = [(_kind_value(path, full, option, item), item) for item in node.value]
        value: Any = [v for v, _ in items]
    else:
        value = _kind_value(path, full, option, node)
    if option.parse is None:
        return value
    try:
        return option.parse(value)
    except ValueError as exc:
        if option.multiple:
            for item, item_node in items:  # point at the item at fault, if one is on its own
                try:
                    option.parse([item])
                except ValueError as item_exc:
                    raise ConfigError(f"{_where(path, item_node)}: {full}: {item_exc}"[:300]) from None
        raise ConfigError(f"{_where(path, node)}: {full}: {exc}"[:300]) from None


def _kind_value(path: Path | None, full: str, option: TunnelOption, node: yaml.Node) -> Any:
    if option.kind is str:
        return _str(path, full, node)
    if option.kind is bool:
        return _bool(path, full, node)
    value = _scalar(path, full, node)
    if option.parse is not None:
        return value  # as YAML typed it: the parser accepts what it can (proxy_proto: '2')
    if isinstance(value, str):
        try:
            value = option.kind(value.strip())
        except ValueError:
            pass
    elif option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (not isinstance(value, option.kind) or isinstance(value, bool)
            or (isinstance(value, float) and not math.isfinite(value))):
        what = "an integer" if option.kind is int else "a number"
        raise ConfigError(f"{_where(path, node)}: {full}: expected {what}, got {str(value)[:64]!r}")
    return value


def load_agent_config(path: Path | None, *, required: bool = False,
                      registry: TunnelTypeRegistry | None = None) -> AgentConfig:
    """Read ``path`` (default location when None); a missing default file is an empty config."""
    explicit = path is not None
    path = path or default_config_path()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        if explicit or required:
            raise ConfigError(f"config file {path} does not exist") from None
        return AgentConfig(path=path)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_agent_config(text, path, registry=registry)


def save_authtoken(path: Path | None, token: str) -> Path:
    """Write ``authtoken: TOKEN`` into the config file, keeping its other keys."""
    path = path or default_config_path()
    data: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            data = loaded
    data.setdefault("version", "2")
    data["authtoken"] = token
    if not path.parent.is_dir():
        # The file holds a secret: its folder is the user's alone, whatever the umask.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)
    return path
