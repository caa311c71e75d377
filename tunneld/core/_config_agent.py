"""The agent's settings: :class:`AgentConfig` and the readers of its keys (both layouts share them)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from . import _config_yaml as Y
from ._config_tunnels import MAX_METADATA
from ._errors import ConfigError
from ._tunnel import TunnelConfig

DEFAULT_SERVER_ADDR = "localhost:4443"
DEFAULT_WEB_ADDR = "127.0.0.1:4040"
#: ngrok's inspection budget when ``inspect_db_size`` is 0 or absent (50 MB).
DEFAULT_INSPECT_DB_SIZE = 50_000_000
UPDATE_CHANNELS = ("stable", "beta", "unstable")
#: The placeholder of ``server_addr`` a region name fills (``tunnel.{region}.example.com:4443``).
REGION_PLACEHOLDER = "{region}"
REGION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


@attrs.define
class AgentConfig:
    """Everything the agent needs; built by :func:`load_agent_config` and the CLI."""

    authtoken: str = ""
    #: The edge's agent ingress; may hold ``{region}`` until :func:`resolve_region` fills it.
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
    #: Where this configuration was read from (the last file; for messages and ``config add-authtoken``).
    path: Path | None = None
    #: The region (``region:``/``--region``): a name for the console, and what fills ``{region}``.
    region: str = ""
    #: Bytes of captured requests the inspector keeps.  **0 = inspection off** (the file's ``-1``);
    #: the file's ``0`` (ngrok: "default") is :data:`DEFAULT_INSPECT_DB_SIZE`.
    inspect_db_size: int = DEFAULT_INSPECT_DB_SIZE
    #: Obey the edge's Stop/Restart/Update commands (ngrok's ``remote_management``).
    remote_management: bool = True
    #: Release channel ``tunneld update`` and the start-up check follow: stable, beta or unstable.
    update_channel: str = "stable"
    #: Check for a newer release on start (ngrok's ``update_check``; v2's ``update: true|false`` too).
    #: Off unless asked for, unlike ngrok: tunneld's releases come from the index pip is
    #: configured for, and an agent should not query it on every start without being told to.
    update_check: bool = False
    #: Keep retrying when the first connection fails for a reason retrying seldom fixes (the
    #: edge's certificate is not trusted); without it the agent says why and exits 1.
    retry: bool = False
    #: The console block: True, False, or None = only when stdout is a terminal (ngrok's ``iftty``).
    console_ui: bool | None = None
    #: Free text for the session, sent to the edge in Auth (ngrok's agent-level ``metadata``).
    metadata: str = ""
    #: Every file read, in order (several ``--config``).
    paths: list[Path] = attrs.field(factory=list)
    #: The layout read: "" (ngrok v2's file, no ``version``), "2" or "3".
    version: str = ""
    #: Messages about keys accepted but not used (unknown v2 keys, ngrok keys tunneld lacks).
    warnings: list[str] = attrs.field(factory=list)

    def console_enabled(self, isatty: bool) -> bool:
        """Whether the console block shows, given whether stdout is a terminal."""
        return isatty if self.console_ui is None else self.console_ui


# ---- agent settings ----------------------------------------------------------------------------------


def _web_addr(full: str, node: yaml.Node) -> str | None:
    value = Y.scalar(full, node)
    if value is False or str(value).lower() in ("false", "off", "none"):
        return None
    if isinstance(value, (bool, int, float)) or value is None or not str(value).strip():
        raise ConfigError(f"{Y.where(node)}: {full}: expected HOST:PORT or false, got {value!r}")
    return str(value)


def _heartbeat(full: str, node: yaml.Node) -> float:
    seconds = Y.duration(full, node)
    if seconds < 1:
        raise ConfigError(f"{Y.where(node)}: {full}: must be at least 1s")
    return seconds


def _inspect_db_size(full: str, node: yaml.Node) -> int:
    size = Y.integer(full, node)
    if size == 0:
        return DEFAULT_INSPECT_DB_SIZE
    if size == -1:
        return 0
    if size < 0 or size > 1 << 40:
        raise ConfigError(f"{Y.where(node)}: {full}: expected bytes (1 to 1 TiB), 0 for the default "
                          f"({DEFAULT_INSPECT_DB_SIZE}) or -1 to turn inspection off, got {size}")
    return size


def _region(full: str, node: yaml.Node) -> str:
    value = Y.string(full, node).strip().lower()
    if value in ("", "auto"):
        return ""
    if not REGION_NAME.fullmatch(value):
        raise ConfigError(f"{Y.where(node)}: {full}: expected a region name such as us or eu, "
                          f"got {value[:64]!r}")
    return value


def _update(full: str, node: yaml.Node) -> dict[str, Any]:
    """ngrok v2's ``update:``: true/false (check for updates) or a channel name."""
    value = Y.scalar(full, node)
    if isinstance(value, bool):
        return {"update_check": value}
    return {"update_channel": Y.choice(full, node, {c: c for c in UPDATE_CHANNELS})}


def _metadata(full: str, node: yaml.Node) -> str:
    value = Y.string(full, node)
    if len(value) > MAX_METADATA:
        raise ConfigError(f"{Y.where(node)}: {full}: at most {MAX_METADATA} characters")
    return value


def _attr(name: str, read: Callable[[str, yaml.Node], Any]) -> Callable[[str, yaml.Node], dict[str, Any]]:
    return lambda full, node: {name: read(full, node)}


#: The agent settings both layouts share (v3: under ``agent:``), by key: a reader giving attributes.
SETTINGS: dict[str, Callable[[str, yaml.Node], dict[str, Any]]] = {
    **{k: _attr(k, Y.string) for k in ("authtoken", "log", "log_format", "log_level")},
    "web_addr": _attr("web_addr", _web_addr),
    "heartbeat_interval": _attr("heartbeat_interval", _heartbeat),
    "heartbeat_tolerance": _attr("heartbeat_tolerance", _heartbeat),
    "region": _attr("region", _region),
    "inspect_db_size": _attr("inspect_db_size", _inspect_db_size),
    "remote_management": _attr("remote_management", Y.boolean),
    "retry": _attr("retry", Y.boolean),
    "update_check": _attr("update_check", Y.boolean),
    "update_channel": _attr("update_channel",
                            lambda f, n: Y.choice(f, n, {c: c for c in UPDATE_CHANNELS})),
    "console_ui": _attr("console_ui", lambda f, n: Y.choice(f, n, {"true": True, "false": False,
                                                                    "iftty": None})),
    "metadata": _attr("metadata", _metadata),
}
#: v2's names of the ingress settings (v3: ``connect_url``, ``connect_cas``; both accepted there).
V2_SETTINGS = {**SETTINGS, "server_addr": _attr("server_addr", Y.string),
               "root_cas": _attr("root_cas", Y.string), "update": _update}

#: ngrok agent keys tunneld has no use for: a warning names them (the file still works).
NGROK_IGNORED = frozenset({
    "api_key", "console_ui_color", "crl_noverify", "dns_resolver_ips", "json_resolver_url", "connect_timeout",
    "web_allow_hosts", "crl_url", "local_storage",
})
#: ngrok agent keys whose absence would change where traffic goes: refused.
NGROK_REFUSED = frozenset({"proxy_url", "http_proxy", "socks5_proxy", "connect_interface"})


def apply_settings(cfg: AgentConfig, pairs: list[tuple[str, yaml.Node, yaml.Node]], prefix: str,
                   readers: Mapping[str, Callable[[str, yaml.Node], dict[str, Any]]], *,
                   strict: bool) -> None:
    """Set ``cfg``'s attributes from an agent-settings mapping; unknown keys: error if ``strict``."""
    for key, knode, vnode in pairs:
        full = Y.join(prefix, key)
        reader = readers.get(key)
        if reader is not None:
            for attr, value in reader(full, vnode).items():
                setattr(cfg, attr, value)
        elif key in NGROK_REFUSED:
            raise ConfigError(f"{Y.where(knode)}: {full}: not supported by tunneld (the agent connects to "
                              "the edge directly); refused rather than ignored")
        elif key in NGROK_IGNORED:
            cfg.warnings.append(f"{Y.where(knode)}: {full}: an ngrok setting tunneld does not use (ignored)")
        elif strict:
            raise ConfigError(f"{Y.where(knode)}: unknown key {full!r}")
        else:
            cfg.warnings.append(f"{Y.where(knode)}: unknown key {full!r} (ignored, as ngrok v2 did; an error "
                                "with version: \"3\")")
