"""Agent configuration: the YAML files (ngrok's keys, layouts v2 and v3), env vars, command-line overrides.

Errors name the file, line and key path: ``tunneld.yml line 7: tunnels.web.addr: ...``.

Layouts: a file without ``version`` (ngrok agent v2's) and ``version: "2"`` have the agent's
settings at the top and a ``tunnels:`` map; ``version: "3"`` has them under ``agent:`` and
adds an ``endpoints:`` list (see :mod:`._config_v3`).  Several files merge (:func:`load_agent_config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import _config_yaml as Y
from ._config_agent import DEFAULT_INSPECT_DB_SIZE as DEFAULT_INSPECT_DB_SIZE
from ._config_agent import DEFAULT_SERVER_ADDR as DEFAULT_SERVER_ADDR
from ._config_agent import DEFAULT_WEB_ADDR as DEFAULT_WEB_ADDR
from ._config_agent import NGROK_IGNORED as NGROK_IGNORED
from ._config_agent import NGROK_REFUSED as NGROK_REFUSED
from ._config_agent import REGION_NAME, apply_settings
from ._config_agent import REGION_PLACEHOLDER as REGION_PLACEHOLDER
from ._config_agent import SETTINGS as SETTINGS
from ._config_agent import UPDATE_CHANNELS as UPDATE_CHANNELS
from ._config_agent import V2_SETTINGS as V2_SETTINGS
from ._config_agent import AgentConfig as AgentConfig
from ._config_edit import save_authtoken as save_authtoken
from ._config_paths import default_config_path as default_config_path
from ._config_paths import ngrok_config_path as ngrok_config_path
from ._config_tunnels import builtin_registry, parse_tunnel, parse_tunnels
from ._config_v3 import parse_v3
from ._config_yaml import MAX_HEARTBEAT as MAX_HEARTBEAT
from ._config_yaml import MAX_YAML_DEPTH as MAX_YAML_DEPTH
from ._errors import ConfigError

# Re-exported: they lived here before tunnel types declared their own options (issue 12).
from ._options import BASIC_AUTH_MAX_LENGTH as BASIC_AUTH_MAX_LENGTH
from ._options import BASIC_AUTH_MIN_PASSWORD as BASIC_AUTH_MIN_PASSWORD
from ._options import check_host_header as check_host_header
from ._options import parse_proxy_proto as parse_proxy_proto
from ._options import split_basic_auth as split_basic_auth
from ._tunnel import TunnelConfig as TunnelConfig

if TYPE_CHECKING:
    from ._tunnel import TunnelTypeRegistry


# ---- files ---------------------------------------------------------------------------------------------


def _version(root: yaml.Node) -> str:
    """"" (no version key), "2" or "3"; ConfigError for anything else."""
    for knode, vnode in Y.mapping(root, ""):
        if isinstance(knode, yaml.ScalarNode) and knode.value == "version":
            text = Y.string("version", vnode).strip()
            if text not in ("2", "3"):
                raise ConfigError(f"{Y.where(vnode)}: version: expected \"2\" or \"3\", got {text[:16]!r}")
            return text
    return ""


def _root(root: yaml.Node | None) -> yaml.Node | None:
    if root is not None and not isinstance(root, yaml.MappingNode):
        if Y.is_null(root):
            return None
        raise ConfigError(f"{Y.where(root)}: the file must be a mapping of keys to values")
    return root


def parse_agent_config(text: str | bytes, path: Path | None = None, *,
                       registry: TunnelTypeRegistry | None = None) -> AgentConfig:
    """Parse the YAML text (or UTF-8 bytes) of one agent config file; ConfigError if it is wrong.

    Each tunnel's keys are checked against the options of its type in ``registry`` (default:
    the installed plugins').
    """
    return _parse_files([(path, text)], registry)


def _parse_files(files: Sequence[tuple[Path | None, str | bytes]],
                 registry: TunnelTypeRegistry | None) -> AgentConfig:
    roots: list[tuple[Path | None, yaml.Node, str]] = []
    for path, text in files:
        root = _root(Y.compose(text, path))
        if root is not None:
            roots.append((path, root, _version(root)))
    last = files[-1][0] if files else None
    cfg = AgentConfig(path=last, paths=[p for p, _ in files if p is not None])
    if not roots:
        return cfg
    layouts = {"3" if version == "3" else "2" for _, _, version in roots}
    if len(layouts) > 1:
        names = ", ".join(f"{Y.source_name(p)} (version {v or 'none'})" for p, _, v in roots)
        raise ConfigError(f"{names}: files of one layout merge; run `tunneld config upgrade` on the v2 ones")
    merged = roots[0][1]
    for _, root, _ in roots[1:]:
        merged = merge_roots(merged, root)
    cfg.version = roots[-1][2] or next((v for _, _, v in reversed(roots) if v), "")
    if layouts == {"3"}:
        parse_v3(cfg, merged, registry)
    else:
        _parse_v2(cfg, merged, registry, strict=False)
    return cfg


def merge_roots(base: yaml.MappingNode, top: yaml.MappingNode) -> yaml.MappingNode:
    """Two files' top-level mappings merged (later wins for scalars and lists; maps merge by key).

    A tunnel of ``tunnels:`` (v2, and v3's deprecated map) is one value: the later file's
    definition replaces the earlier one whole, as ngrok does; ``agent:`` merges key by key.
    """
    merged = _merge_map(base, top, "")
    assert isinstance(merged, yaml.MappingNode)
    return merged


def _merge_map(base: yaml.Node, top: yaml.Node, prefix: str, *, whole_entries: bool = False) -> yaml.Node:
    if not (isinstance(base, yaml.MappingNode) and isinstance(top, yaml.MappingNode)):
        return top
    # Through Y.items: a key given twice in one file is an error, not silently merged away.
    merged = {name: (knode, vnode) for name, knode, vnode in Y.items(base, prefix)}
    for name, knode, vnode in Y.items(top, prefix):
        if name in merged and not whole_entries:
            vnode = _merge_map(merged[name][1], vnode, Y.join(prefix, name),
                               whole_entries=not prefix and name == "tunnels")
        merged[name] = (knode, vnode)
    return yaml.MappingNode(base.tag, list(merged.values()), base.start_mark, base.end_mark)


def _parse_v2(cfg: AgentConfig, root: yaml.Node, registry: TunnelTypeRegistry | None, *,
              strict: bool) -> None:
    pairs = []
    for key, knode, vnode in Y.items(root, ""):
        if key == "version":
            continue
        if key == "tunnels":
            cfg.tunnels = parse_tunnels(vnode, registry)
        else:
            pairs.append((key, knode, vnode))
    apply_settings(cfg, pairs, "", V2_SETTINGS, strict=strict)


def load_agent_config(path: Path | Sequence[Path] | None, *, required: bool = False,
                      registry: TunnelTypeRegistry | None = None) -> AgentConfig:
    """Read and merge the files ``path`` names, in order (default location when None or empty).

    A missing default file is an empty config; a missing file that was named is an error.
    """
    paths = [path] if isinstance(path, Path) else list(path or ())
    explicit = bool(paths)
    paths = paths or [default_config_path()]
    files: list[tuple[Path | None, str | bytes]] = []
    for one in paths:
        try:
            files.append((one, one.read_bytes()))
        except FileNotFoundError:
            if explicit or required:
                raise ConfigError(f"config file {one} does not exist") from None
            return AgentConfig(path=one)
        except IsADirectoryError:
            raise ConfigError(f"config file {one} is a directory") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {one}: {exc.strerror}") from None
    return _parse_files(files, registry)


def split_config_paths(values: Sequence[str | Path] | str | Path | None) -> list[Path]:
    """``--config`` values (repeatable, each possibly comma-separated) as paths, ``~`` expanded."""
    if values is None:
        return []
    if isinstance(values, (str, Path)):
        values = [values]
    out: list[Path] = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                out.append(Path(os.path.expanduser(part.strip())))
    return out


def parse_tunnel_definition(name: str, data: Mapping[str, Any],
                            registry: TunnelTypeRegistry | None = None) -> TunnelConfig:
    """A tunnel from its JSON definition (the local API's ``POST /api/tunnels`` body).

    The keys are a config file tunnel's (``proto``, ``addr``, ``basic_auth``, ``labels``, ...);
    ``name`` may be among them and must then equal ``name``.  ConfigError naming the key
    (``basic_auth: a basic auth password must be 8 to 128 characters``) if it is wrong.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("tunnel definition: expected a JSON object")
    node = Y.from_data(dict(data), "tunnel definition")
    registry = registry if registry is not None else builtin_registry()
    return parse_tunnel(name, node, registry, "", api=True)


def resolve_region(cfg: AgentConfig, region: str | None = None) -> None:
    """Fill ``{region}`` of ``cfg.server_addr`` with ``region`` (``--region``) or ``cfg.region``.

    A region without a ``{region}`` in ``server_addr``, or the reverse, is a ConfigError:
    a region that changes nothing would be a key that does nothing.
    """
    if region is not None:
        value = region.strip().lower()
        if value and value != "auto" and not REGION_NAME.fullmatch(value):
            raise ConfigError(f"--region: expected a region name such as us or eu, got {region[:64]!r}")
        cfg.region = "" if value == "auto" else value
    has = REGION_PLACEHOLDER in cfg.server_addr
    if has and not cfg.region:
        raise ConfigError(f"server_addr {cfg.server_addr} has {REGION_PLACEHOLDER}: give a region "
                          "(region: in the config file, or --region)")
    if cfg.region and not has:
        raise ConfigError(f"region {cfg.region!r}: the edge's address has no {REGION_PLACEHOLDER} to fill "
                          f"(server_addr {cfg.server_addr}); set server_addr to a template such as "
                          "tunnel.{region}.example.com:4443, or remove the region")
    cfg.server_addr = cfg.server_addr.replace(REGION_PLACEHOLDER, cfg.region)
