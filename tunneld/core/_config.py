"""Agent configuration: the YAML file (ngrok's keys), env vars, and command-line overrides.

Errors name the key path and the line: ``tunneld.yml line 7: tunnels.web.addr: ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import yaml

from ._errors import ConfigError

#: Default agent config file (XDG, like ngrok v3's ``~/.config/ngrok/ngrok.yml``).
def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tunneld" / "tunneld.yml"


DEFAULT_SERVER_ADDR = "localhost:4443"
DEFAULT_WEB_ADDR = "127.0.0.1:4040"


@attrs.define
class TunnelConfig:
    """One tunnel definition (the ``tunnels:`` map of the config file, or the command line)."""

    name: str
    proto: str
    addr: str
    #: Public schemes of an HTTP tunnel.
    schemes: list[str] = attrs.field(factory=lambda: ["https", "http"])
    subdomain: str = ""
    hostname: str = ""
    #: Requested public TCP address (``host:port``) of a TCP tunnel.
    remote_addr: str = ""
    inspect: bool = True
    metadata: str = ""
    #: ``user:password`` pairs the edge demands with HTTP Basic auth (never shown in reprs).
    basic_auth: list[str] = attrs.field(factory=list, repr=False)
    #: HTTP ``Host`` sent upstream: "" keeps the public one, ``rewrite`` = the upstream's
    #: host[:port], anything else is sent as is.
    host_header: str = ""
    #: PEM certificate chain and key with which the agent terminates a TLS tunnel ("": the
    #: upstream gets the client's TLS as is).
    crt: str = ""
    key: str = ""
    #: PROXY protocol version (1 or 2) the edge puts before each TCP/TLS connection; 0: none.
    proxy_proto: int = 0


def parse_proxy_proto(value: object) -> int:
    """``proxy_proto`` / ``--proxy-proto``: "", 0, 1, 2 (ints or strings) → 0, 1 or 2; ValueError else."""
    text = "" if value is None else str(value).strip()
    if text in ("", "0"):
        return 0
    if text in ("1", "2"):
        return int(text)
    raise ValueError(f"expected 1 or 2 (the PROXY protocol version), got {text!r}")


#: ngrok's limits on basic-auth credentials (its errors 359/360).
BASIC_AUTH_MIN_PASSWORD = 8
BASIC_AUTH_MAX_LENGTH = 128


def split_basic_auth(credential: str) -> tuple[str, str]:
    """Split ``user:password`` and check ngrok's limits; ValueError (never quoting it) if bad.

    The username ends at the first ``:`` (RFC 7617: it cannot contain one); it must be 1-128
    characters, the password 8-128.
    """
    user, sep, password = credential.partition(":")
    if not sep:
        raise ValueError("basic auth credentials must look like USERNAME:PASSWORD")
    if not user or len(user) > BASIC_AUTH_MAX_LENGTH:
        raise ValueError(f"a basic auth username must be 1 to {BASIC_AUTH_MAX_LENGTH} characters")
    if not BASIC_AUTH_MIN_PASSWORD <= len(password) <= BASIC_AUTH_MAX_LENGTH:
        raise ValueError(f"a basic auth password must be {BASIC_AUTH_MIN_PASSWORD} to "
                         f"{BASIC_AUTH_MAX_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in credential):
        raise ValueError("basic auth credentials cannot contain control characters")
    return user, password


def check_host_header(value: str) -> str:
    """Normalise a ``--host-header`` value ("" and ``preserve`` keep the Host); ValueError if bad."""
    value = value.strip()
    if value.lower() in ("", "preserve"):
        return ""
    if value.lower() == "rewrite":
        return "rewrite"
    if not value.isascii() or any(ord(c) < 33 or ord(c) == 127 for c in value) or "/" in value:
        raise ValueError(f"{value!r} is not a valid Host (use rewrite, or a name such as example.com or "
                         "example.com:8080)")
    return value


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
_TUNNEL_KEYS = {"proto", "addr", "inspect", "subdomain", "hostname", "schemes", "bind_tls", "remote_addr",
                "metadata", "domain", "auth", "basic_auth", "host_header", "crt", "key", "proxy_proto"}
#: Tunnel keys ngrok defines that tunneld does not enforce yet: refused, never ignored.
_TUNNEL_UNSUPPORTED = {"client_cas", "oauth", "oidc",
                       "ip_restriction", "circuit_breaker", "compression", "mutual_tls_cas",
                       "request_header", "response_header", "websocket_tcp_converter", "labels",
                       "verify_webhook", "traffic_policy"}


def _where(path: Path | None, node: yaml.Node) -> str:
    name = path.name if path else "config"
    return f"{name} line {node.start_mark.line + 1}"


def _scalar(path: Path | None, key: str, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(path, node)}: {key}: expected a single value")
    return yaml.safe_load(yaml.serialize(node))


def _duration(path: Path | None, key: str, node: yaml.Node) -> float:
    value = _scalar(path, key, node)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * units[unit]
    raise ConfigError(f"{_where(path, node)}: {key}: expected a duration such as 10s, got {text!r}")


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


def parse_agent_config(text: str, path: Path | None = None) -> AgentConfig:
    """Parse the YAML text of an agent config file."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path.name if path else 'config'}{line}: not valid YAML: "
                          f"{getattr(exc, 'problem', exc)}") from None
    cfg = AgentConfig(path=path)
    if root is None:
        return cfg
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{_where(path, root)}: the file must be a mapping of keys to values")
    for knode, vnode in root.value:
        key = str(knode.value)
        if key not in _AGENT_KEYS:
            raise ConfigError(f"{_where(path, knode)}: unknown key {key!r}")
        if key == "tunnels":
            cfg.tunnels = _parse_tunnels(path, vnode)
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


def _parse_tunnels(path: Path | None, node: yaml.Node) -> dict[str, TunnelConfig]:
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(path, node)}: tunnels: expected a mapping of tunnel names")
    tunnels: dict[str, TunnelConfig] = {}
    for knode, vnode in node.value:
        name = str(knode.value)
        prefix = f"tunnels.{name}"
        if not isinstance(vnode, yaml.MappingNode):
            raise ConfigError(f"{_where(path, vnode)}: {prefix}: expected a mapping")
        values: dict[str, Any] = {}
        http_only: list[tuple[str, yaml.Node]] = []
        key_nodes: dict[str, yaml.Node] = {}
        for tk, tv in vnode.value:
            key = str(tk.value)
            full = f"{prefix}.{key}"
            if key in ("auth", "basic_auth", "host_header"):
                http_only.append((full, tk))
            key_nodes[key] = tk
            if key in _TUNNEL_UNSUPPORTED:
                raise ConfigError(f"{_where(path, tk)}: {full}: not supported by tunneld yet "
                                  "(refused rather than ignored)")
            if key not in _TUNNEL_KEYS:
                raise ConfigError(f"{_where(path, tk)}: {full}: unknown key {key!r}")
            if key == "inspect":
                values[key] = _bool(path, full, tv)
            elif key == "schemes":
                if not isinstance(tv, yaml.SequenceNode):
                    raise ConfigError(f"{_where(path, tv)}: {full}: expected a list such as [https, http]")
                schemes = [_str(path, full, item) for item in tv.value]
                bad = [s for s in schemes if s not in ("http", "https")]
                if bad or not schemes:
                    raise ConfigError(f"{_where(path, tv)}: {full}: schemes are http and/or https")
                values[key] = schemes
            elif key == "bind_tls":
                value = _scalar(path, full, tv)
                mapping = {True: ["https"], False: ["http"], "both": ["https", "http"]}
                if value not in mapping:
                    raise ConfigError(f"{_where(path, tv)}: {full}: expected true, false or both")
                values["schemes"] = mapping[value]
            elif key == "domain":
                values["hostname"] = _str(path, full, tv)
            elif key in ("auth", "basic_auth"):
                # v2 wrote one "user:pass" string under auth; v3 a list under basic_auth.
                if key == "basic_auth" and not isinstance(tv, yaml.SequenceNode):
                    raise ConfigError(f"{_where(path, tv)}: {full}: expected a list such as "
                                      '["user:password"]')
                items = tv.value if isinstance(tv, yaml.SequenceNode) else [tv]
                for item in items:
                    credential = _str(path, full, item)
                    try:
                        split_basic_auth(credential)
                    except ValueError as exc:
                        raise ConfigError(f"{_where(path, item)}: {full}: {exc}") from None
                    values.setdefault("basic_auth", []).append(credential)
            elif key == "host_header":
                try:
                    values[key] = check_host_header(_str(path, full, tv))
                except ValueError as exc:
                    raise ConfigError(f"{_where(path, tv)}: {full}: {exc}") from None
            elif key == "proxy_proto":
                try:
                    values[key] = parse_proxy_proto(_scalar(path, full, tv))
                except ValueError as exc:
                    raise ConfigError(f"{_where(path, tv)}: {full}: {exc}") from None
            else:
                values[key] = _str(path, full, tv)
        if "proto" not in values:
            raise ConfigError(f"{_where(path, vnode)}: {prefix}: missing key 'proto'")
        if "addr" not in values:
            raise ConfigError(f"{_where(path, vnode)}: {prefix}: missing key 'addr'")
        if http_only and values["proto"] != "http":
            # Never accepted and then ignored: a tcp tunnel "with basic auth" would be open.
            full, knode = http_only[0]
            raise ConfigError(f"{_where(path, knode)}: {full}: only http tunnels have this option")
        _check_tls_keys(path, prefix, values, key_nodes)
        tunnels[name] = TunnelConfig(name=name, **values)
    return tunnels


def _check_tls_keys(path: Path | None, prefix: str, values: dict[str, Any],
                    nodes: dict[str, yaml.Node]) -> None:
    """crt/key only on tls tunnels and only together; proxy_proto only where the edge writes it."""
    proto = values["proto"]
    for key in ("crt", "key"):
        if key in nodes and proto != "tls":
            raise ConfigError(f"{_where(path, nodes[key])}: {prefix}.{key}: only tls tunnels have this "
                              "option")
    if bool(values.get("crt")) != bool(values.get("key")):
        given, missing = ("crt", "key") if values.get("crt") else ("key", "crt")
        raise ConfigError(f"{_where(path, nodes[given])}: {prefix}.{given}: needs {missing} as well")
    if "proxy_proto" in nodes and values["proxy_proto"] and proto not in ("tcp", "tls"):
        # Refused, not ignored: the upstream would otherwise trust no header at all.
        raise ConfigError(f"{_where(path, nodes['proxy_proto'])}: {prefix}.proxy_proto: "
                          "tunneld supports it on tcp and tls tunnels only")


def load_agent_config(path: Path | None, *, required: bool = False) -> AgentConfig:
    """Read ``path`` (default location when None); a missing default file is an empty config."""
    explicit = path is not None
    path = path or default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit or required:
            raise ConfigError(f"config file {path} does not exist") from None
        return AgentConfig(path=path)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_agent_config(text, path)


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
