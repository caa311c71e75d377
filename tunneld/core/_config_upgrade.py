"""``tunneld config upgrade``: a version "2" (or ngrok v2) file rewritten in the version "3" layout.

Done on the text, not by re-dumping YAML (PyYAML drops comments): each top-level entry is a
run of lines (with the comment lines just above its key); agent settings are indented under a
new ``agent:``, the rest is kept as written.  Renames (``server_addr`` → ``connect_url``,
``auth`` → ``basic_auth``, ...) replace single-line spans at the offsets PyYAML reports.  A
flow-style file (``{...}``) has no lines to move: it is re-dumped, without comments (said so).
The result is parsed and must mean exactly what the old file meant, or nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import yaml

from . import _config_yaml as Y
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._config import AgentConfig
    from ._tunnel import TunnelTypeRegistry

_AGENT_RENAMES = {"server_addr": "connect_url", "root_cas": "connect_cas"}
_BIND_TLS = {"true": "[https]", "false": "[http]", "both": "[https, http]"}


def upgrade_text(text: str, name: str, registry: TunnelTypeRegistry | None) -> tuple[str, list[str]]:
    """The v3 text of v2 ``text`` and notes on what changed; ConfigError if it cannot be upgraded."""
    from ._config import NGROK_IGNORED, NGROK_REFUSED, V2_SETTINGS, parse_agent_config

    path = Path(name)
    old = parse_agent_config(text, path, registry=registry)
    if old.version == "3":
        raise ConfigError(f"{name}: already version 3")
    root = Y.compose(text, path)
    if root is None or Y.is_null(root):
        return 'version: "3"\nagent: {}\n', ["the file was empty"]
    assert isinstance(root, yaml.MappingNode)
    agent_keys = set(V2_SETTINGS) | NGROK_IGNORED | NGROK_REFUSED
    unknown = [f"{k} ({Y.where(kn)})" for k, kn, _ in Y.items(root, "")
               if k not in agent_keys | {"version", "tunnels"}]
    if unknown:
        raise ConfigError(f"{name}: unknown keys are errors in version 3; remove or fix them first: "
                          + ", ".join(unknown))
    notes: list[str] = []
    edits = _edits(text, root, notes)
    if root.flow_style or edits is None:
        new = _redump(text, path)
        notes.append("the file is not in block style: rewritten without its comments")
    else:
        new = _restructure(_apply(text, edits), root, agent_keys)
    try:
        upgraded = parse_agent_config(new, path, registry=registry)
    except ConfigError as exc:  # pragma: no cover - a bug of this module, not of the file
        raise ConfigError(f"{name}: the upgraded file would not be valid ({exc}); "
                          "nothing was written") from None
    if _meaning(upgraded) != _meaning(old):
        raise ConfigError(f"{name}: the upgrade would change what the file means; nothing was written")
    return new, notes


def _meaning(cfg: AgentConfig) -> dict[str, Any]:
    return attrs.asdict(cfg, recurse=False, filter=lambda a, _: a.name not in ("path", "paths", "version",
                                                                                "warnings"))


def _edits(text: str, root: yaml.MappingNode, notes: list[str]) -> list[tuple[int, int, str]] | None:
    """Single-line replacements (start, end, text); None if one would span lines."""
    edits: list[tuple[int, int, str]] = []

    def span(node: yaml.Node) -> tuple[int, int] | None:
        if node.start_mark.line != node.end_mark.line:
            return None
        return node.start_mark.index, node.end_mark.index

    for key, knode, vnode in Y.items(root, ""):
        if key == "version":
            s = span(vnode)
            if s is None:
                return None
            edits.append((s[0], s[1], text[s[0]:s[1]].replace("2", "3")))
        elif key in _AGENT_RENAMES or key == "update":
            new = _AGENT_RENAMES.get(key)
            if new is None:
                value = Y.scalar("update", vnode)
                new = "update_check" if isinstance(value, bool) else "update_channel"
            s = span(knode)
            if s is None:
                return None
            edits.append((s[0], s[1], new))
            notes.append(f"{Y.where(knode)}: {key} is now agent.{new}")
        elif key == "tunnels" and isinstance(vnode, yaml.MappingNode):
            for tname, _, tnode in Y.items(vnode, "tunnels"):
                if not isinstance(tnode, yaml.MappingNode):
                    continue
                for tkey, tk, tv in Y.items(tnode, f"tunnels.{tname}"):
                    if tkey not in ("auth", "bind_tls"):
                        continue
                    ks, vs = span(tk), span(tv)
                    if ks is None or vs is None:
                        return None
                    if tkey == "auth":
                        edits += [(ks[0], ks[1], "basic_auth"), (vs[0], vs[1], f"[{text[vs[0]:vs[1]]}]")]
                        notes.append(f"{Y.where(tk)}: tunnels.{tname}.auth is now basic_auth (a list)")
                    else:
                        value = str(Y.scalar(f"tunnels.{tname}.bind_tls", tv)).lower()
                        if value not in _BIND_TLS:
                            return None
                        edits += [(ks[0], ks[1], "schemes"), (vs[0], vs[1], _BIND_TLS[value])]
                        notes.append(f"{Y.where(tk)}: tunnels.{tname}.bind_tls is now schemes")
    return edits


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _restructure(text: str, root: yaml.MappingNode, agent_keys: set[str]) -> str:
    """Move the agent settings' lines under ``agent:`` (line numbers are the old file's: edits kept them)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    keys = [(Y.key(k), k.start_mark.line) for k, _ in root.value]
    starts: list[int] = []
    for i, (_, line) in enumerate(keys):
        floor = keys[i - 1][1] + 1 if i else line  # the file's opening comments stay on top
        while line > floor and lines[line - 1].startswith("#"):  # its own comments, just above it
            line -= 1
        starts.append(line)
    # A document end ("...") or trailing comment stays at the end of the file.
    header = lines[:starts[0]]
    chunks = [(name, lines[start:end]) for (name, _), start, end in
              zip(keys, starts, [*starts[1:], len(lines)], strict=True)]
    version = [line for name, chunk in chunks if name == "version" for line in chunk] or ['version: "3"\n']
    agent = [("  " + line if line.strip() else line) for name, chunk in chunks if name in agent_keys
             for line in chunk]
    rest = [line for name, chunk in chunks if name not in agent_keys and name != "version" for line in chunk]
    return "".join([*header, *version, *(["agent:\n", *agent] if agent else ["agent: {}\n"]), *rest])


def _redump(text: str, path: Path) -> str:
    from ._config import NGROK_IGNORED, NGROK_REFUSED, V2_SETTINGS

    data = yaml.safe_load(text) or {}
    agent: dict[str, Any] = {}
    out: dict[str, Any] = {"version": "3", "agent": agent}
    for key, value in data.items():
        if key in set(V2_SETTINGS) | NGROK_IGNORED | NGROK_REFUSED:
            if key == "update":
                key = "update_check" if isinstance(value, bool) else "update_channel"
            agent[_AGENT_RENAMES.get(key, key)] = value
        elif key == "tunnels" and isinstance(value, dict):
            for tunnel in value.values():
                if isinstance(tunnel, dict) and "auth" in tunnel:
                    tunnel["basic_auth"] = [tunnel.pop("auth")]
                if isinstance(tunnel, dict) and "bind_tls" in tunnel:
                    flag = str(tunnel.pop("bind_tls")).lower()
                    tunnel["schemes"] = yaml.safe_load(_BIND_TLS.get(flag, "[https]"))
            out["tunnels"] = value
        elif key != "version":
            out[key] = value
    dumped: str = yaml.safe_dump(out, sort_keys=False, allow_unicode=True)
    return dumped


def upgrade_file(path: Path, registry: TunnelTypeRegistry | None, *,
                 write: bool = True) -> tuple[str, list[str], Path]:
    """Upgrade ``path`` in place (the old file kept as ``FILE.v2.bak``); (new text, notes, backup)."""
    from ._config_edit import write_private

    try:
        text = Y.decode(path.read_bytes(), path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    new, notes = upgrade_text(text, path.name, registry)
    backup = path.with_name(path.name + ".v2.bak")
    if write:
        shutil.copy2(path, backup)  # its mode too: it holds the authtoken
        write_private(path, new)
    return new, notes, backup
