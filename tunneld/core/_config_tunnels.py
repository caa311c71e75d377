"""Tunnel definitions: ``tunnels: {NAME: {...}}`` of a config file, and the local API's JSON body.

Keys every tunnel has are attributes of :class:`TunnelConfig`; the rest are checked against the
options of the tunnel's type (its plugin declares them).  A definition with ``labels`` and no
``proto`` is a labeled tunnel, as in ngrok.  ngrok keys tunneld does not enforce are refused,
never ignored: a tunnel "with OAuth" that is in fact open would be worse than an error.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import yaml

from . import _config_yaml as Y
from ._errors import ConfigError
from ._tunnel import TunnelConfig

if TYPE_CHECKING:
    from ._tunnel import TunnelOption, TunnelType, TunnelTypeRegistry

#: Keys of every tunnel, whatever its type (the rest are the type's :attr:`TunnelType.options`).
COMMON_TUNNEL_KEYS = frozenset({"proto", "addr", "inspect", "metadata"})
#: Tunnel keys ngrok defines that tunneld does not enforce yet: refused, never ignored.
TUNNEL_UNSUPPORTED = frozenset({
    "client_cas", "oauth", "oidc", "ip_restriction", "circuit_breaker", "compression", "mutual_tls_cas",
    "request_header", "response_header", "websocket_tcp_converter", "verify_webhook", "traffic_policy",
    "policy", "user_agent_filter", "terminate_at", "pooling_enabled", "bindings", "url", "description",
})
#: The type a definition with ``labels`` and no ``proto`` gets (the labeled plugin's).
LABELED_TYPE = "tunnel"
#: Longest ``metadata`` (ngrok's limit).
MAX_METADATA = 4096


def builtin_registry() -> TunnelTypeRegistry:
    """The tunnel types of the installed plugins, built once per set of disabled plugins."""
    from ._plugins import DISABLE_ENV, build_registry, get_plugin_manager

    disabled = os.environ.get(DISABLE_ENV, "")
    if disabled not in _REGISTRIES:
        _REGISTRIES[disabled] = build_registry(get_plugin_manager())
    return _REGISTRIES[disabled]


#: Config files are read a few times per process (tests, fuzzing: many): the plugins are loaded once.
_REGISTRIES: dict[str, TunnelTypeRegistry] = {}


def declarations(registry: TunnelTypeRegistry) -> dict[str, list[tuple[str, TunnelOption]]]:
    """Config key (own or alias) → the (type name, option) pairs that accept it."""
    found: dict[str, list[tuple[str, TunnelOption]]] = {}
    for name in registry.names():
        for option in registry[name].options:
            for key in (option.key, *option.aliases):
                found.setdefault(key, []).append((name, option))
    return found


def metadata(full: str, node: yaml.Node) -> str:
    value = Y.string(full, node)
    if len(value) > MAX_METADATA:
        raise ConfigError(f"{Y.where(node)}: {full}: at most {MAX_METADATA} characters")
    return value


def parse_tunnels(node: yaml.Node, registry: TunnelTypeRegistry | None,
                  prefix: str = "tunnels") -> dict[str, TunnelConfig]:
    """The ``tunnels:`` mapping (null: none); a name given twice is an error."""
    if Y.is_null(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{Y.where(node)}: {prefix}: expected a mapping of tunnel names")
    registry = registry if registry is not None else builtin_registry()
    return {name: parse_tunnel(name, vnode, registry, f"{prefix}.{name}")
            for name, _, vnode in Y.items(node, prefix)}


def parse_tunnel(name: str, node: yaml.Node, registry: TunnelTypeRegistry, prefix: str, *,
                 api: bool = False) -> TunnelConfig:
    """One definition; ``prefix`` is its key path in messages ("" for an API body: bare keys)."""
    what = f"{prefix}: " if prefix else ""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{Y.where(node)}: {what}expected a mapping")
    declared = declarations(registry)
    common: dict[str, Any] = {}
    nodes: dict[str, yaml.Node] = {}
    own: list[tuple[str, yaml.Node, yaml.Node]] = []
    unknown: list[tuple[str, yaml.Node]] = []
    for key, knode, vnode in Y.items(node, prefix):
        full = Y.join(prefix, key)
        nodes[key] = vnode
        if key in TUNNEL_UNSUPPORTED:
            raise ConfigError(f"{Y.where(knode)}: {full}: not supported by tunneld yet "
                              "(refused rather than ignored)")
        if api and key == "name":
            if Y.string(full, vnode) not in ("", name):
                raise ConfigError(f"{Y.where(vnode)}: {full}: does not match the tunnel's name {name!r}")
        elif key == "inspect":
            common[key] = Y.boolean(full, vnode)
        elif key == "metadata":
            common[key] = metadata(full, vnode)
        elif key in COMMON_TUNNEL_KEYS:
            common[key] = Y.string(full, vnode)
        elif key in declared:
            own.append((key, knode, vnode))
        else:
            unknown.append((key, knode))
    if unknown:
        # Even in a v2 file (whose unknown top-level keys only warn): a typo such as
        # ``basic_aut`` must not leave a tunnel open.
        key, knode = unknown[0]
        raise ConfigError(f"{Y.where(knode)}: {Y.join(prefix, key)}: unknown key {key!r}")
    if "addr" not in common or not common["addr"].strip():
        raise ConfigError(f"{Y.where(node)}: {what}missing key 'addr' (the local port, HOST:PORT or URL "
                          "to forward to)")
    if "labels" in nodes and "proto" not in common:
        common["proto"] = LABELED_TYPE  # ngrok: a tunnel with labels and no proto is a labeled tunnel
    elif "labels" in nodes and common.get("proto") != LABELED_TYPE:
        raise ConfigError(f"{Y.where(nodes['proto'])}: {Y.join(prefix, 'proto')}: a labeled tunnel has no "
                          "proto (the edge that routes to it decides): remove proto or labels")
    if "proto" not in common:
        raise ConfigError(f"{Y.where(node)}: {what}missing key 'proto' (http, tcp, tls; or labels for a "
                          "labeled tunnel)")
    proto = common["proto"]
    if proto not in registry:
        raise ConfigError(f"{Y.where(nodes.get('proto', node))}: {Y.join(prefix, 'proto')}: unknown tunnel "
                          f"type {proto[:64]!r} (known: {', '.join(registry.names())})")
    tunnel_type = registry[proto]
    options = parse_options(prefix, tunnel_type, own, declared)
    return TunnelConfig(name=name, options=options, **common)


def parse_options(prefix: str, tunnel_type: TunnelType, entries: list[tuple[str, yaml.Node, yaml.Node]],
                  declared: dict[str, list[tuple[str, TunnelOption]]]) -> dict[str, Any]:
    """Check a tunnel's own keys against its type's options; their parsed values by target key."""
    mine = {key: option for option in tunnel_type.options for key in (option.key, *option.aliases)}
    by_key = {option.key: option for option in tunnel_type.options}
    options: dict[str, Any] = {}
    given: dict[str, yaml.Node] = {}
    for key, knode, vnode in entries:
        full = Y.join(prefix, key)
        option = mine.get(key)
        if option is None:
            # Never accepted and then ignored: a tcp tunnel "with basic auth" would be open.
            owners = sorted({owner for owner, _ in declared[key]})
            if len(owners) == 1:
                raise ConfigError(f"{Y.where(knode)}: {full}: only {owners[0]} tunnels have this option")
            raise ConfigError(f"{Y.where(knode)}: {full}: tunneld supports it on "
                              f"{', '.join(owners[:-1])} and {owners[-1]} tunnels only")
        value = option_value(full, option, vnode)
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
                raise ConfigError(f"{Y.where(knode)}: {Y.join(prefix, key)}: needs {needed} as well")
    return options


def option_value(full: str, option: TunnelOption, node: yaml.Node) -> Any:
    """One option's value from its node: read by kind, then through ``option.parse``."""
    items: list[tuple[Any, yaml.Node]] = []
    if option.multiple:
        if not isinstance(node, yaml.SequenceNode):
            example = option.metavar or "..."
            raise ConfigError(f"{Y.where(node)}: {full}: expected a list such as [{example}]")
        items = [(_kind_value(full, option, item), item) for item in node.value]
        value: Any = [v for v, _ in items]
    else:
        value = _kind_value(full, option, node)
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
                    raise ConfigError(f"{Y.where(item_node)}: {full}: {item_exc}"[:300]) from None
        raise ConfigError(f"{Y.where(node)}: {full}: {exc}"[:300]) from None


def _kind_value(full: str, option: TunnelOption, node: yaml.Node) -> Any:
    if option.kind is str:
        return Y.string(full, node)
    if option.kind is bool:
        return Y.boolean(full, node)
    value = Y.scalar(full, node)
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
        raise ConfigError(f"{Y.where(node)}: {full}: expected {what}, got {str(value)[:64]!r}")
    return value
