"""Edits of a config file that keep the rest of it byte for byte: ``tunneld config add-authtoken``.

The file is not re-dumped (that drops comments, expands flow maps and requotes ``"2"``): the
token's value is replaced at the offsets PyYAML reports for it, or one line is inserted.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import yaml

from . import _config_yaml as Y
from ._config_paths import default_config_path
from ._errors import ConfigError

#: What a tunneld authtoken looks like (``tunneld edge token create``).
TOKEN_SHAPE = "tkd_<12 hex digits>_<40 letters, digits, - or _>"
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_token(token: str) -> str:
    """``token`` stripped, or ValueError saying what an authtoken looks like."""
    from ._store import is_token_format

    token = token.strip()
    if not is_token_format(token):
        shown = f"{token[:8]}..." if len(token) > 12 else "that"
        raise ValueError(f"{shown} is not an authtoken: they look like {TOKEN_SHAPE} "
                         "(`tunneld edge token create` prints one)")
    return token


def _quoted(token: str) -> str:
    if _PLAIN.fullmatch(token) and yaml.safe_load(token) == token:
        return token
    return json.dumps(token)  # a YAML double-quoted scalar


def set_authtoken_text(text: str, token: str, name: str = "config") -> str:
    """``text`` with its authtoken set to ``token`` (v3: ``agent.authtoken``), all else unchanged."""
    root = Y.compose(text, Path(name))
    value = _quoted(token)
    nl = "\r\n" if "\r\n" in text else "\n"
    if root is None or Y.is_null(root):
        sep = "" if not text or text.endswith("\n") else nl
        return f"{text}{sep}version: \"2\"{nl}authtoken: {value}{nl}"
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{Y.where(root)}: the file must be a mapping of keys to values")
    pairs = {k.value: (k, v) for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    version = pairs.get("version")
    if version is not None and str(version[1].value).strip() == "3":
        agent = pairs.get("agent")
        if agent is None:
            return _insert_key(text, root, f"agent:{nl}  authtoken: {value}", nl, after=version[1],
                               flow=f"agent: {{authtoken: {value}}}")
        return _set_in(text, agent[1], "authtoken", value, nl, owner=agent[0])
    return _set_in(text, root, "authtoken", value, nl, after=version[1] if version else None)


def _set_in(text: str, mapping: yaml.Node, key: str, value: str, nl: str, *,
            owner: yaml.Node | None = None, after: yaml.Node | None = None) -> str:
    if isinstance(mapping, yaml.MappingNode):
        for knode, vnode in mapping.value:
            if isinstance(knode, yaml.ScalarNode) and knode.value == key:
                if isinstance(vnode, yaml.ScalarNode) and vnode.style in ("|", ">"):
                    raise ConfigError(f"{Y.where(vnode)}: {key}: a block scalar; write the token on one line")
                start, end = vnode.start_mark.index, vnode.end_mark.index
                if start == end:  # ``authtoken:`` with no value: keep one space after the colon
                    value = value if text[start - 1:start] in (" ", "\t") else f" {value}"
                return text[:start] + value + text[end:]
        return _insert_key(text, mapping, f"{key}: {value}", nl, after=after)
    if Y.is_null(mapping) and owner is not None:  # ``agent:`` with nothing under it
        start, end = mapping.start_mark.index, mapping.end_mark.index
        return text[:start] + f"{nl}  {key}: {value}" + text[end:].lstrip(" ")
    raise ConfigError(f"{Y.where(mapping)}: expected a mapping to hold {key}")


def _insert_key(text: str, mapping: yaml.Node, entry: str, nl: str, *,
                after: yaml.Node | None = None, flow: str | None = None) -> str:
    """A new entry (``key: value`` lines) in ``mapping``: after the line of ``after``, else first.

    ``flow`` is the entry's one-line spelling, for a ``{...}`` mapping.
    """
    assert isinstance(mapping, yaml.MappingNode)
    if mapping.flow_style or text[mapping.start_mark.index:mapping.start_mark.index + 1] == "{":
        brace = mapping.start_mark.index + 1
        rest = ", " if mapping.value else ""
        return f"{text[:brace]}{flow or entry}{rest}{text[brace:]}"
    first = mapping.value[0][0] if mapping.value else None
    indent = " " * (first.start_mark.column if first is not None else 0)
    if after is not None:
        pos = text.find("\n", after.end_mark.index)
        pos = len(text) if pos < 0 else pos + 1
        lead = "" if text[:pos].endswith("\n") or not pos else nl
        return f"{text[:pos]}{lead}{indent}{entry}{nl}{text[pos:]}"
    pos = text.rfind("\n", 0, first.start_mark.index) + 1 if first is not None else 0
    return f"{text[:pos]}{indent}{entry}{nl}{text[pos:]}"


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically; a new file is 0600 (it holds a secret), an old one keeps its mode."""
    target = path.resolve() if path.is_symlink() else path
    if not target.parent.is_dir():
        # The file holds a secret: its folder is the user's alone, whatever the umask.
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(target.parent, 0o700)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o600
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_authtoken(path: Path | None, token: str) -> Path:
    """Set ``authtoken`` in the config file (created 0600 if absent), keeping all else byte for byte.

    ValueError if ``token`` is not shaped like an authtoken; ConfigError if the file cannot be
    read or is not YAML (it is left as it was).
    """
    token = check_token(token)
    path = path or default_config_path()
    try:
        text = Y.decode(path.read_bytes(), path)
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    new = set_authtoken_text(text, token, path.name)
    data = yaml.safe_load(new)  # the edit must read back as the token, or nothing is written
    holder = data.get("agent") if str(data.get("version")) == "3" else data
    if not isinstance(holder, dict) or holder.get("authtoken") != token:  # pragma: no cover - a bug here
        raise ConfigError(f"{path}: could not place the authtoken in this file; edit it by hand "
                          "(tunneld config edit)")
    write_private(path, new)
    return path
