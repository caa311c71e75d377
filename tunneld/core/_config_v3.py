"""ngrok's config layout ``version: "3"``: ``agent:`` settings, an ``endpoints:`` list, ``tunnels:``.

An endpoint is turned into the tunnel it describes: its ``url`` scheme picks the type
(``https://`` and ``http://`` an http tunnel with that scheme, ``tcp://`` a tcp one,
``tls://`` a tls one), its host the hostname, ``upstream.url`` the address to forward to.
Unknown keys are errors here (ngrok 3 made them fatal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from . import _config_yaml as Y
from ._config_agent import SETTINGS, V2_SETTINGS, apply_settings
from ._config_tunnels import builtin_registry, metadata, parse_tunnel, parse_tunnels
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._config_agent import AgentConfig
    from ._tunnel import TunnelConfig, TunnelTypeRegistry

#: v3's names for v2's ingress settings (v2's are accepted too).
RENAMED = {"connect_url": "server_addr", "connect_cas": "root_cas"}
_ENDPOINT_KEYS = frozenset({"name", "url", "upstream", "metadata", "description", "bindings",
                            "pooling_enabled", "traffic_policy", "traffic_policy_file",
                            "agent_tls_termination", "inspect"})
_UPSTREAM_KEYS = frozenset({"url", "protocol", "proxy_protocol"})
_TLS_TERMINATION_KEYS = {"server_certificate": "crt", "server_private_key": "key",
                         "mutual_tls_certificate_authorities": ""}
_SCHEMES = {"https": ("http", "https"), "http": ("http", "http"), "tcp": ("tcp", ""), "tls": ("tls", "")}


def parse_v3(cfg: AgentConfig, root: yaml.Node, registry: TunnelTypeRegistry | None) -> None:
    """Fill ``cfg`` from a v3 root mapping; ConfigError naming file, line and key path."""
    readers = {**SETTINGS, **{k: V2_SETTINGS[v] for k, v in RENAMED.items()},
               "server_addr": V2_SETTINGS["server_addr"], "root_cas": V2_SETTINGS["root_cas"]}
    registry = registry if registry is not None else builtin_registry()
    endpoints: dict[str, TunnelConfig] = {}
    seen_agent = False
    for key, knode, vnode in Y.items(root, ""):
        if key == "version":
            continue
        if key == "agent":
            seen_agent = True
            apply_settings(cfg, Y.items(vnode, "agent"), "agent", readers, strict=True)
        elif key == "tunnels":
            cfg.tunnels = parse_tunnels(vnode, registry)
        elif key == "endpoints":
            endpoints = _endpoints(vnode, registry)
        else:
            raise ConfigError(f"{Y.where(knode)}: unknown key {key!r} (version 3 has agent, endpoints and "
                              "tunnels)")
    if not seen_agent:
        raise ConfigError(f"{Y.where(root)}: version 3 needs an agent: block (its settings moved there)")
    for name, tunnel in endpoints.items():
        if name in cfg.tunnels:
            raise ConfigError(f"{Y.where(root)}: endpoint {name!r} has the name of a tunnel of tunnels:")
        cfg.tunnels[name] = tunnel


def _endpoints(node: yaml.Node, registry: TunnelTypeRegistry) -> dict[str, TunnelConfig]:
    if Y.is_null(node):
        return {}
    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError(f"{Y.where(node)}: endpoints: expected a list of endpoints (- name: ...)")
    out: dict[str, TunnelConfig] = {}
    first: dict[str, yaml.Node] = {}
    for index, item in enumerate(node.value):
        tunnel = endpoint(item, registry, f"endpoints[{index}]")
        if tunnel.name in out:
            raise ConfigError(f"{Y.where(item)}: endpoints[{index}].name: {tunnel.name!r} is also the name "
                              f"of the endpoint at {Y.where(first[tunnel.name])}")
        out[tunnel.name] = tunnel
        first[tunnel.name] = item
    return out


def endpoint(node: yaml.Node, registry: TunnelTypeRegistry, prefix: str) -> TunnelConfig:
    """One ``endpoints:`` entry as the tunnel it describes."""
    pairs = {key: (knode, vnode) for key, knode, vnode in Y.items(node, prefix)}
    for key, (knode, _) in pairs.items():
        if key not in _ENDPOINT_KEYS:
            raise ConfigError(f"{Y.where(knode)}: unknown key {Y.join(prefix, key)!r}")
    if "name" not in pairs:
        raise ConfigError(f"{Y.where(node)}: {prefix}: missing key 'name'")
    name = Y.string(f"{prefix}.name", pairs["name"][1]).strip()
    if not name:
        raise ConfigError(f"{Y.where(pairs['name'][1])}: {prefix}.name: must not be empty")
    prefix = f"endpoints.{name}"
    mark = node.start_mark
    definition: list[tuple[str, yaml.Node]] = []

    def put(key: str, value: Any, at: yaml.Node | None = None) -> None:
        item = Y.from_data(value, "x")
        for sub in [item, *(item.value if isinstance(item, yaml.SequenceNode) else [])]:
            sub.start_mark = sub.end_mark = (at.start_mark if at is not None else mark)
        definition.append((key, item))

    url_node = pairs.get("url", (None, None))[1]
    url = Y.string(f"{prefix}.url", url_node) if url_node is not None else ""
    proto, options = _from_url(url, url_node if url_node is not None else node, f"{prefix}.url")
    put("proto", proto, url_node)
    for key, value in options.items():
        put(key, value, url_node)
    if "upstream" not in pairs:
        raise ConfigError(f"{Y.where(node)}: {prefix}: missing key 'upstream' (upstream: {{url: 8080}})")
    definition += _upstream(pairs["upstream"][1], proto, f"{prefix}.upstream")
    for key, (knode, vnode) in pairs.items():
        full = f"{prefix}.{key}"
        if key in ("traffic_policy", "traffic_policy_file"):
            raise ConfigError(f"{Y.where(knode)}: {full}: not supported by tunneld yet (refused rather than "
                              "ignored)")
        if key == "bindings":
            values = [vnode] if isinstance(vnode, yaml.ScalarNode) else list(getattr(vnode, "value", []))
            for item in values:
                if Y.string(full, item).strip().lower() != "public":
                    raise ConfigError(f"{Y.where(item)}: {full}: tunneld endpoints are public only")
        elif key == "pooling_enabled" and Y.boolean(full, vnode):
            raise ConfigError(f"{Y.where(vnode)}: {full}: pooling is not supported by tunneld (one agent per "
                              "URL); refused rather than ignored")
        elif key in ("metadata", "inspect"):
            definition.append((key, vnode))
        elif key == "description":
            metadata(full, vnode)  # shown by ngrok's cloud API only: checked, kept nowhere
        elif key == "agent_tls_termination":
            definition += _tls_termination(vnode, proto, full)
    mapping = yaml.MappingNode("tag:yaml.org,2002:map",
                               [(yaml.ScalarNode("tag:yaml.org,2002:str", k, v.start_mark, v.start_mark), v)
                                for k, v in definition], mark, mark)
    return parse_tunnel(name, mapping, registry, prefix)


def _from_url(url: str, node: yaml.Node, full: str) -> tuple[str, dict[str, Any]]:
    """Type and options of an endpoint ``url`` (empty or scheme only: a random name)."""
    text = url.strip()
    if "://" not in text:
        text = f"https://{text}" if text else "https://"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(f"{Y.where(node)}: {full}: expected an https://, http://, tcp:// or tls:// URL, "
                          f"got {url[:64]!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{Y.where(node)}: {full}: a URL of scheme and host only, got {url[:64]!r}")
    proto, scheme_option = _SCHEMES[scheme]
    options: dict[str, Any] = {}
    if scheme_option:
        options["schemes"] = [scheme_option]
    host = parts.netloc
    if not host:
        return proto, options
    if proto == "tcp":
        options["remote_addr"] = host
        return proto, options
    name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    if port and port not in ("443" if scheme in ("https", "tls") else "80",):
        raise ConfigError(f"{Y.where(node)}: {full}: the edge chooses the port of {scheme} URLs; "
                          f"remove :{port}")
    options["hostname"] = name or host
    return proto, options


def _upstream(node: yaml.Node, proto: str, prefix: str) -> list[tuple[str, yaml.Node]]:
    out: list[tuple[str, yaml.Node]] = []
    pairs = {key: (knode, vnode) for key, knode, vnode in Y.items(node, prefix)}
    for key, (knode, vnode) in pairs.items():
        full = f"{prefix}.{key}"
        if key not in _UPSTREAM_KEYS:
            raise ConfigError(f"{Y.where(knode)}: unknown key {full!r}")
        if key == "protocol" and Y.string(full, vnode).strip().lower() not in ("", "http1"):
            raise ConfigError(f"{Y.where(vnode)}: {full}: tunneld speaks HTTP/1.1 to upstreams (http1); "
                              "refused rather than ignored")
        if key == "proxy_protocol":
            out.append(("proxy_proto", vnode))
    if "url" not in pairs:
        raise ConfigError(f"{Y.where(node)}: {prefix}: missing key 'url' (the local port, HOST:PORT or URL)")
    unode = pairs["url"][1]
    addr = Y.string(f"{prefix}.url", unode).strip()
    if proto in ("tcp", "tls") and "://" in addr:
        scheme, _, rest = addr.partition("://")
        if scheme.lower() not in ("tcp", "tls") or not rest:
            raise ConfigError(f"{Y.where(unode)}: {prefix}.url: a {proto} endpoint forwards to a port, "
                              f"HOST:PORT or tcp://HOST:PORT, got {addr[:64]!r}")
        addr = rest
    value = Y.from_data(addr, "x")
    value.start_mark = value.end_mark = unode.start_mark
    out.append(("addr", value))
    return out


def _tls_termination(node: yaml.Node, proto: str, prefix: str) -> list[tuple[str, yaml.Node]]:
    out: list[tuple[str, yaml.Node]] = []
    for key, knode, vnode in Y.items(node, prefix):
        full = f"{prefix}.{key}"
        target = _TLS_TERMINATION_KEYS.get(key)
        if target is None:
            raise ConfigError(f"{Y.where(knode)}: unknown key {full!r}")
        if not target:
            raise ConfigError(f"{Y.where(knode)}: {full}: not supported by tunneld yet (refused rather than "
                              "ignored)")
        if proto != "tls":
            raise ConfigError(f"{Y.where(knode)}: {full}: for tls:// endpoints only")
        out.append((target, vnode))
    return out
